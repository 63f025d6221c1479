"""The shapes world: a procedural captioned-image dataset, an attribute classifier, and metrics built on it.

Images are 32x32 RGB renderings of one shape on a plain background, captioned by a fixed grammar:

    "a {size} {color} {shape} at the {position} on a {background} background"

e.g. "a small red circle at the top left on a blue background". The stream is infinite and deterministic:
item `i` of stream `seed` depends only on (seed, i), never on batch size or start offset. Besides its five
attributes each item has a small continuous jitter (position +-1 px, scale +-10%) so that every caption has
many images.

The attribute classifier (a small CNN) gives two metrics that need no download:
- prompt adherence: share of images whose predicted attributes all match their caption;
- shapes-FD: Frechet distance between two image sets in the classifier's penultimate feature space.

Image ranges: the generator (`render`, `sample`) returns training images in [-1, 1]; the metrics take
images in [0, 1], what `Pipeline.decode` returns (map generator output with `(x + 1) / 2`).

CLI: `python shapes.py {train-classifier,evaluate,preview,prompts} --help`.
"""
import argparse
import json
import os
import shlex
import sys
import time
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from scipy import ndimage
from tqdm import tqdm

from sampler import to_uint8
from utils import UserError, atomic_write, atomic_write_text, run_cli, save_grid

IMAGE_SIZE = 32
ATTRIBUTES = ("shape", "color", "size", "position", "background")
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# Colours in [0, 1] RGB, pairwise Euclidean distance >= 0.6 so that no two are confusable.
COLORS = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.10, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "cyan": (0.10, 0.85, 0.90),
    "magenta": (0.85, 0.15, 0.85),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
}
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
VOCAB: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": SIZES,
    "position": POSITIONS,
    "background": tuple(COLORS),  # any colour but the object's
}
NUM_CLASSES = tuple(len(VOCAB[a]) for a in ATTRIBUTES)

# Geometry in pixels: half-extent of a shape per size, grid-cell centres, jitter amplitudes, supersampling.
HALF_SIZE = (3.25, 5.5)
CELL_OFFSET = 9.5  # cell centres at IMAGE_SIZE / 2 + {-1, 0, 1} * CELL_OFFSET
JITTER_PX, JITTER_SCALE = 1.0, 0.1
SUPERSAMPLE = 4
# Std of generator pixels in [-1, 1] (`pixel_std(20000, seed=0)` = 0.7876): the sigma_data of a pixel-space teacher.
PIXEL_STD = 0.788

DEFAULT_CLASSIFIER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "shapes_classifier.safetensors")
CLASSIFIER_FORMAT = "shapes-classifier-v1"

# ----------------------------------------------------------------------------------------------------------
# Generator


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele et al. 2014) on a uint64 array; wrapping arithmetic is intended."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


_NUM_STREAMS = 8  # random numbers per item: 5 attributes + 3 jitter values
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _uniform(n: int, seed: int, start: int) -> np.ndarray:
    """(n, _NUM_STREAMS) float64 uniforms in [0, 1); row k depends only on (seed, start + k).

    Number j of item i is output i * _NUM_STREAMS + j of a SplitMix64 generator whose state is derived from seed.
    """
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0, got n={n}, start={start}")
    state = _splitmix64(np.array([seed % 2**64], dtype=np.uint64))
    counter = (np.arange(start, start + n, dtype=np.uint64)[:, None] * np.uint64(_NUM_STREAMS)
               + np.arange(_NUM_STREAMS, dtype=np.uint64) + np.uint64(1))
    bits = _splitmix64(state + counter * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def sample_attributes(n: int, seed: int, start: int = 0) -> torch.Tensor:
    """Attributes of items start..start+n-1 of stream `seed`: LongTensor (n, 5), columns in `ATTRIBUTES` order.

    Every attribute is uniform over its vocabulary; the background is uniform over the colours other than the
    object's.
    """
    u = _uniform(n, seed, start)[:, : len(ATTRIBUTES)]
    sizes = np.array(NUM_CLASSES, dtype=np.float64)
    sizes[ATTRIBUTES.index("background")] -= 1
    attrs = np.floor(u * sizes).astype(np.int64)
    color, bg = ATTRIBUTES.index("color"), ATTRIBUTES.index("background")
    attrs[:, bg] += attrs[:, bg] >= attrs[:, color]
    return torch.from_numpy(attrs)


def sample_jitter(n: int, seed: int, start: int = 0) -> torch.Tensor:
    """Jitter of items start..start+n-1 of stream `seed`: float32 (n, 3) = (dx, dy, scale) uniform in [-1, 1]."""
    u = _uniform(n, seed, start)[:, len(ATTRIBUTES):]
    return torch.from_numpy(u * 2 - 1).float()


def _shape_masks(dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Inside-tests of every shape at offsets (dx, dy) px from the centre, half-extent r px: bool (len(SHAPES), ...)."""
    ax, ay = dx.abs(), dy.abs()
    return torch.stack([
        dx**2 + dy**2 <= r**2,  # circle
        torch.maximum(ax, ay) <= 0.85 * r,  # square
        (ay <= 0.9 * r) & (ax <= (dy + 0.9 * r) / 1.8),  # triangle, apex up (image y grows downwards)
        ax + ay <= 1.15 * r,  # diamond
        ((ax <= 0.33 * r) & (ay <= r)) | ((ay <= 0.33 * r) & (ax <= r)),  # cross
    ])


def render(attrs: torch.Tensor, jitter: Optional[torch.Tensor] = None, chunk: int = 256) -> torch.Tensor:
    """Rasterise attribute rows (n, 5) -> float32 images (n, 3, 32, 32) in [-1, 1].

    jitter: (n, 3) in [-1, 1] from `sample_jitter`, or None for the canonical (centred, unscaled) image.
    Antialiased by SUPERSAMPLE x SUPERSAMPLE supersampling; the result of each row depends on that row only.
    """
    attrs = torch.as_tensor(attrs, dtype=torch.long).reshape(-1, len(ATTRIBUTES))
    for k, a in enumerate(ATTRIBUTES):
        if attrs.numel() and not (0 <= attrs[:, k].min() and attrs[:, k].max() < NUM_CLASSES[k]):
            raise ValueError(f"attribute '{a}' out of range [0, {NUM_CLASSES[k]})")
    if jitter is None:
        jitter = torch.zeros(len(attrs), 3)
    if jitter.shape != (len(attrs), 3):
        raise ValueError(f"jitter must have shape ({len(attrs)}, 3), got {tuple(jitter.shape)}")
    return torch.cat([_render_chunk(attrs[i:i + chunk], jitter[i:i + chunk].float())
                      for i in range(0, len(attrs), chunk)]) if len(attrs) else torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE)


def _render_chunk(attrs: torch.Tensor, jitter: torch.Tensor) -> torch.Tensor:
    shape, color, size, position, bg = attrs.unbind(1)
    row, col = torch.div(position, 3, rounding_mode="floor"), position % 3
    cx = IMAGE_SIZE / 2 + (col - 1) * CELL_OFFSET + jitter[:, 0] * JITTER_PX
    cy = IMAGE_SIZE / 2 + (row - 1) * CELL_OFFSET + jitter[:, 1] * JITTER_PX
    r = torch.tensor(HALF_SIZE)[size] * (1 + jitter[:, 2] * JITTER_SCALE)
    grid = (torch.arange(IMAGE_SIZE * SUPERSAMPLE, dtype=torch.float32) + 0.5) / SUPERSAMPLE  # sub-pixel centres
    dx = grid[None, None, :] - cx[:, None, None]
    dy = grid[None, :, None] - cy[:, None, None]
    masks = _shape_masks(dx, dy, r[:, None, None])  # (S, n, H*ss, W*ss)
    inside = masks[shape, torch.arange(len(attrs))].float()
    alpha = F.avg_pool2d(inside[:, None], SUPERSAMPLE)  # (n, 1, 32, 32) coverage
    palette = torch.tensor(list(COLORS.values()))
    fg, bgc = palette[color][:, :, None, None], palette[bg][:, :, None, None]
    return (bgc + alpha * (fg - bgc)) * 2 - 1


def sample(n: int, seed: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Items start..start+n-1 of stream `seed`: (images float32 (n, 3, 32, 32) in [-1, 1], attrs LongTensor (n, 5))."""
    attrs = sample_attributes(n, seed, start)
    return render(attrs, sample_jitter(n, seed, start)), attrs


def caption(attrs_row: Sequence[int]) -> str:
    """One attribute row (5 ints, `ATTRIBUTES` order) -> its caption."""
    words = {a: VOCAB[a][int(v)] for a, v in zip(ATTRIBUTES, attrs_row)}
    return f"a {words['size']} {words['color']} {words['shape']} at the {words['position']} on a {words['background']} background"


def captions(attrs: torch.Tensor) -> list[str]:
    """Attribute rows (n, 5) -> n captions."""
    return [caption(row) for row in attrs.tolist()]


def parse_caption(text: str) -> torch.Tensor:
    """Inverse of `caption`: LongTensor (5,). Case, surrounding/repeated whitespace and a final '.' are ignored.

    Raises UserError naming the caption if it does not follow the grammar of the shapes world.
    """
    words = text.lower().strip().removesuffix(".").split()
    try:
        at, on = words.index("at"), words.index("on")
        ok = (words[0] == "a" and words[at + 1] == "the" and words[on + 1] == "a" and words[-1] == "background"
              and at == 4 and on > at + 2 and len(words) == on + 4)
        if ok:
            values = {"size": words[1], "color": words[2], "shape": words[3],
                      "position": " ".join(words[at + 2:on]), "background": words[on + 2]}
            row = [VOCAB[a].index(values[a]) for a in ATTRIBUTES]
            if row[ATTRIBUTES.index("color")] != row[ATTRIBUTES.index("background")]:
                return torch.tensor(row)
    except (ValueError, IndexError):
        pass
    raise UserError(f"caption {text!r} is not a shapes-world caption "
                    "('a {small|large} {color} {shape} at the {position} on a {color} background')")


# ----------------------------------------------------------------------------------------------------------
# Classifier


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class ShapesClassifier(nn.Module):
    """Small CNN with one softmax head per attribute. Input (N, 3, 32, 32) in [-1, 1].

    A fourth input channel |x - background| (summed over RGB) highlights the object whatever its colours; the
    background colour is the per-image median, as the object covers at most ~15% of the pixels. This makes the
    shape features colour-invariant from the first layer and training several times faster.
    The head sees a global max-pool of the 8x8 feature map (what the object is) and a squeezed flattened copy
    of it (where it is).

    `features(x)` -> (N, feature_dim) penultimate activations (shapes-FD space);
    `forward(x)` -> list of logits (N, K_a), one per attribute in `ATTRIBUTES` order.
    """

    def __init__(self, width: int = 16, feature_dim: int = 128, where_channels: int = 8):
        super().__init__()
        self.config = dict(width=width, feature_dim=feature_dim, where_channels=where_channels)
        w = width
        self.trunk = nn.Sequential(
            *_conv_bn_relu(4, w),  # 32x32
            *_conv_bn_relu(w, 2 * w, stride=2),  # 16x16
            *_conv_bn_relu(2 * w, 2 * w),
            *_conv_bn_relu(2 * w, 4 * w, stride=2),  # 8x8
        )
        self.where = nn.Conv2d(4 * w, where_channels, 1)
        self.fc = nn.Linear(4 * w + where_channels * (IMAGE_SIZE // 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, sum(NUM_CLASSES))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        background = x.flatten(2).median(2).values[:, :, None, None]
        h = self.trunk(torch.cat([x, (x - background).abs().sum(1, keepdim=True)], 1))
        return F.relu(self.fc(torch.cat([h.amax((2, 3)), F.relu(self.where(h)).flatten(1)], 1)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.head(self.features(x)).split(NUM_CLASSES, dim=1))


def _vocab_json() -> str:
    return json.dumps({a: list(VOCAB[a]) for a in ATTRIBUTES})


def load_classifier(path: str = DEFAULT_CLASSIFIER) -> ShapesClassifier:
    """The trained attribute classifier from a safetensors file, in eval mode, gradients off (cached per file)."""
    if not os.path.isfile(path):
        raise UserError(f"shapes classifier weights not found at {path}; train them with "
                        f"'python shapes.py train-classifier --out {path} --seed 0'")
    return _load_classifier(os.path.abspath(path), os.path.getmtime(path))


@lru_cache(maxsize=4)
def _load_classifier(path: str, mtime: float) -> ShapesClassifier:
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a corrupt file
        raise UserError(f"cannot read shapes classifier {path}: {e}") from e
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise UserError(f"{path} is not a shapes classifier (metadata format != {CLASSIFIER_FORMAT})")
    if meta.get("vocab") != _vocab_json():
        raise UserError(f"shapes classifier {path} was trained on another vocabulary; retrain it with "
                        "'python shapes.py train-classifier'")
    model = ShapesClassifier(**json.loads(meta["config"]))
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def _to_classifier_input(images: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Metric images (N, 3, 32, 32) in [0, 1] -> classifier input in [-1, 1] on the classifier's device."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"images must have shape (N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(images.shape)}")
    if len(images) and images.min() < -0.5:
        raise ValueError(f"images must be in [0, 1] (min is {images.min().item():.2f}); "
                         "map [-1, 1] images with (x + 1) / 2")
    device = next(model.parameters()).device
    return images.to(device, torch.float32).clamp(0, 1) * 2 - 1


@torch.no_grad()
def predict_attributes(images: torch.Tensor, classifier: Optional[ShapesClassifier] = None,
                       batch_size: int = 500) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [0, 1] -> predicted attributes LongTensor (N, 5) on CPU."""
    model = classifier if classifier is not None else load_classifier()
    x = _to_classifier_input(images, model)
    preds = [torch.stack([l.argmax(1) for l in model(x[i:i + batch_size])], 1) for i in range(0, len(x), batch_size)]
    return torch.cat(preds).cpu() if preds else torch.zeros(0, len(ATTRIBUTES), dtype=torch.long)


def attribute_accuracy(images: torch.Tensor, prompts: Sequence[str],
                       classifier: Optional[ShapesClassifier] = None) -> dict[str, float]:
    """Per-attribute agreement between predicted attributes of `images` ([0, 1]) and their captions.

    Returns {attribute: share correct, ..., "all": share with every attribute correct}.
    """
    if len(images) != len(prompts) or not len(prompts):
        raise ValueError(f"need as many images as captions (>0), got {len(images)} and {len(prompts)}")
    target = torch.stack([parse_caption(p) for p in prompts])
    correct = predict_attributes(images, classifier) == target
    acc = {a: correct[:, k].float().mean().item() for k, a in enumerate(ATTRIBUTES)}
    acc["all"] = correct.all(1).float().mean().item()
    return acc


def prompt_adherence(images: torch.Tensor, prompts: Sequence[str],
                     classifier: Optional[ShapesClassifier] = None) -> float:
    """Share of images ([0, 1], (N, 3, 32, 32)) whose predicted attributes all match their caption."""
    return attribute_accuracy(images, prompts, classifier)["all"]


def count_objects(images: torch.Tensor, threshold: float = 0.3, min_pixels: int = 4) -> torch.Tensor:
    """Objects per image: 8-connected components of at least `min_pixels` foreground pixels, where a pixel is
    foreground when its summed |RGB - per-image median| exceeds `threshold`. Images (N, 3, 32, 32) in [0, 1];
    returns LongTensor (N,). Every real image of the world has exactly one."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
    x = images.detach().float().cpu().clamp(0, 1)
    foreground = ((x - x.flatten(2).median(2).values[:, :, None, None]).abs().sum(1) > threshold).numpy()
    counts = []
    for mask in foreground:
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        counts.append(int((np.bincount(labels.ravel(), minlength=n + 1)[1:] >= min_pixels).sum()))
    return torch.tensor(counts, dtype=torch.long)


def score(images: torch.Tensor, prompts: Sequence[str], references: Optional[dict[str, torch.Tensor]] = None,
          classifier: Optional[ShapesClassifier] = None) -> dict[str, float]:
    """The shapes-world scores of images ([0, 1], (N, 3, 32, 32)) against their captions, under one name each
    wherever they are reported: `adherence` (every attribute right), `acc_<attribute>` per attribute,
    `one_object` (share of images with exactly one object, `count_objects`) and, for every reference set
    {name: its `shapes_features`} (e.g. "data": real images of the captions, "teacher": the teacher's images of
    the same prompts and seeds), `shapes_fd_<name>`, the shapes-FD to it."""
    acc = attribute_accuracy(images, prompts, classifier)
    metrics = {"adherence": acc.pop("all"), **{f"acc_{a}": v for a, v in acc.items()},
               "one_object": (count_objects(images) == 1).float().mean().item()}
    if references:
        features = shapes_features(images, classifier)
        metrics.update({f"shapes_fd_{name}": frechet_distance(features, ref) for name, ref in references.items()})
    return metrics


@torch.no_grad()
def shapes_features(images: torch.Tensor, classifier: Optional[ShapesClassifier] = None,
                    batch_size: int = 500) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [0, 1] -> penultimate classifier features float64 (N, feature_dim) on CPU."""
    model = classifier if classifier is not None else load_classifier()
    x = _to_classifier_input(images, model)
    return torch.cat([model.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).double().cpu()


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition (negative round-off -> 0)."""
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(w.clip(min=0))) @ v.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N_a, D), (N_b, D) (Heusel et al. 2017, eq. 6):

    |mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2)), in float64. The last trace is computed as
    Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)) (same eigenvalues, but a symmetric PSD matrix), which stays exact for
    the singular covariances that dead ReLU features give, where a general sqrtm of S_a S_b is ill-conditioned.
    """
    if len(feats_a) < 2 or len(feats_b) < 2:
        raise ValueError("the Frechet distance needs at least 2 samples per set")
    a, b = feats_a.double().numpy(), feats_b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _sqrtm_psd(cov_a)
    eig = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_covmean = np.sqrt(eig.clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_covmean)


def shapes_fd(images_a: torch.Tensor, images_b: torch.Tensor, classifier: Optional[ShapesClassifier] = None) -> float:
    """shapes-FD: Frechet distance between two image sets ([0, 1], (N, 3, 32, 32)) in classifier feature space."""
    return frechet_distance(shapes_features(images_a, classifier), shapes_features(images_b, classifier))


def pixel_std(n: int = 10000, seed: int = 0) -> float:
    """Std of generator pixels in [-1, 1], pooled over n images, all channels and positions."""
    images, _ = sample(n, seed)
    return images.double().std().item()


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Training-time degradations so that slightly blurry or noisy generated images keep their attributes:
    half of the images blend by a U(0, 1) weight towards a 3x3 box blur; all get Gaussian pixel noise with
    std U(0, 0.1) ([-1, 1] units). x: (N, 3, 32, 32) in [-1, 1] -> same shape, clamped to [-1, 1]."""
    def per_image() -> torch.Tensor:
        return torch.rand(len(x), 1, 1, 1, generator=generator)

    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = x + per_image() * (per_image() < 0.5) * (blurred - x)
    x = x + 0.1 * per_image() * torch.randn(x.shape, generator=generator)
    return x.clamp(-1, 1)


def train_classifier(seed: int = 0, steps: int = 800, batch_size: int = 64, lr: float = 3e-3) -> ShapesClassifier:
    """Train a ShapesClassifier on fresh draws of stream `seed` (step s uses items s*batch_size...), degraded by
    `_augment`; returns it in eval mode."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = ShapesClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.train()
    for step in (bar := tqdm(range(steps), desc="train classifier")):
        x, y = sample(batch_size, seed, start=step * batch_size)
        x = _augment(x, generator)
        loss = sum(F.cross_entropy(logits, y[:, k]) for k, logits in enumerate(model(x)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval().requires_grad_(False)


def evaluate(classifier: ShapesClassifier, seed: int, n: int = 2000) -> dict[str, float]:
    """Held-out metrics on stream `seed`: per-attribute accuracy, all-correct rate, pixel std and the shapes-FD
    noise floor (FD between items 0..n-1 and n..2n-1 of the stream)."""
    images, attrs = sample(2 * n, seed)
    images = (images + 1) / 2
    acc = attribute_accuracy(images[:n], captions(attrs[:n]), classifier)
    return dict(**{f"acc_{k}": v for k, v in acc.items()},
                fd_floor=shapes_fd(images[:n], images[n:], classifier), pixel_std=pixel_std(2 * n, seed))


def _save_classifier(path: str, model: ShapesClassifier, metadata: dict[str, str]) -> None:
    meta = dict(format=CLASSIFIER_FORMAT, vocab=_vocab_json(), config=json.dumps(model.config), **metadata)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def _print_metrics(metrics: dict[str, float], n: int) -> None:
    accs = "  ".join(f"{k[4:]} {v:.4f}" for k, v in metrics.items() if k.startswith("acc_"))
    print(f"held-out accuracy ({n} images): {accs}")
    print(f"shapes-FD noise floor ({n} vs {n} real images): {metrics['fd_floor']:.4f}")
    print(f"pixel std in [-1, 1] ({2 * n} images): {metrics['pixel_std']:.4f}")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train-classifier", help="train the attribute classifier on fresh generated images")
    p.add_argument("--out", default=DEFAULT_CLASSIFIER, help="output .safetensors path")
    p.add_argument("--seed", type=int, default=0, help="training stream and init seed; held-out stream is seed + 1")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-n", type=int, default=2000, help="held-out images (and FD set size)")
    p = sub.add_parser("evaluate", help="held-out accuracy, shapes-FD noise floor and pixel std of a classifier")
    p.add_argument("--classifier", default=DEFAULT_CLASSIFIER)
    p.add_argument("--seed", type=int, default=1000, help="held-out stream seed")
    p.add_argument("--n", type=int, default=1000, help="images per set")
    p = sub.add_parser("preview", help="PNG grid of generated images with their captions")
    p.add_argument("--out", default="shapes_preview.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=16)
    p = sub.add_parser("prompts", help="write n captions of stream seed, one per line (a .txt prompt file)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=1000)
    args = parser.parse_args(argv)

    if args.command == "train-classifier":
        command = "python " + shlex.join(["shapes.py"] + (sys.argv[1:] if argv is None else argv))
        t0 = time.time()
        model = train_classifier(args.seed, args.steps, args.batch_size)
        train_s = time.time() - t0
        metrics = evaluate(model, args.seed + 1, args.eval_n)
        _print_metrics(metrics, args.eval_n)
        print(f"training time: {train_s:.0f} s ({args.steps} steps of {args.batch_size})")
        _save_classifier(args.out, model, dict(command=command, seed=str(args.seed), train_seconds=f"{train_s:.0f}",
                                               heldout=json.dumps({k: round(v, 5) for k, v in metrics.items()})))
        print(f"wrote {args.out}")
    elif args.command == "evaluate":
        _print_metrics(evaluate(load_classifier(args.classifier), args.seed, args.n), args.n)
    elif args.command == "preview":
        images, attrs = sample(args.n, args.seed)
        save_grid(args.out, [(f"shapes world\nstream {args.seed}", to_uint8((images + 1) / 2))], captions(attrs))
        print(f"wrote {args.out}")
    elif args.command == "prompts":
        atomic_write_text(args.out, "".join(c + "\n" for c in captions(sample_attributes(args.n, args.seed))))
        print(f"wrote {args.n} captions to {args.out}")


if __name__ == "__main__":
    run_cli(main)
