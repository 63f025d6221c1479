"""The shapes world: a procedural captioned-image dataset, an attribute classifier, and metrics built on it.

Images are 32x32 RGB renderings of one shape on a plain background, captioned by a fixed grammar:

    "a {size} {color} {shape} at the {position} on a {background} background"

e.g. "a small red circle at the top left on a blue background". A partial caption drops any of "{size} ",
"{color} ", " at the {position}" and " on a {background} background", and an omitted shape becomes the noun
"shape" ("a red circle", "a small shape on a blue background", "a shape"): its images draw what it omits from the
world, so "a red circle" has 9 positions x 2 sizes x 7 backgrounds as modes. The stream is infinite and
deterministic: item `i` of stream `seed` (its attributes, jitter of position +-1 px and scale +-10%, and caption
form in the training mix, `sample_named`) depends only on (seed, i), never on batch size or start offset.

The attribute classifier (a small CNN) gives metrics that need no download (`score`, `score_by_form`):
- adherence: share of images whose predicted attributes match all their caption names, with one sharp object;
- coverage: how the seeds of a partial caption spread over what it omits, against the world's distribution;
- precision and recall (k-NN manifolds) and shapes-FD (Frechet distance) in the classifier's feature space.

Image ranges: the generator (`render`, `sample`) returns training images in [-1, 1]; the metrics take
images in [0, 1], what `Pipeline.decode` returns (map generator output with `(x + 1) / 2`).

CLI: `python shapes.py {train-classifier,evaluate,preview,prompts} --help`.
"""
import argparse
import json
import math
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
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
OMITTED = -1  # an attribute row's entry for an attribute its caption does not name
# The training stream's caption mix (`sample_named`): full captions 1/3, the 31 partial forms 2/3 (each attribute
# named in 2/3 * 15/31 + 1/3 = 66% of captions).
FULL_CAPTION_SHARE = 1 / 3

# Geometry in pixels: half-extent of a shape per size, grid-cell centres, jitter amplitudes, supersampling.
HALF_SIZE = (3.25, 5.5)
CELL_OFFSET = 9.5  # cell centres at IMAGE_SIZE / 2 + {-1, 0, 1} * CELL_OFFSET
JITTER_PX, JITTER_SCALE = 1.0, 0.1
SUPERSAMPLE = 4
# Std of generator pixels in [-1, 1] (`pixel_std(20000, seed=0)` = 0.7876): the sigma_data of a pixel-space teacher.
PIXEL_STD = 0.788

# Precision and recall: k of the k-NN radii. Kynkaanniemi et al. 2019 use k = 3 on 50k images; on our sets of
# 10^2-10^3 images k = 3 leaves real-vs-real precision at 0.93 (320 partial-caption images), k = 5 at 0.98.
MANIFOLD_NEIGHBOURS = 5
DATA_REFERENCE = "data"  # the name under which `score` gets the reference set of real renders
# The classifier's degradation reading (blur, noise strengths in [0, 1], `ShapesClassifier.degradation`) joins its
# features multiplied by DEGRADATION_SCALE: a full training blur then moves an image by about one k-NN radius of
# 10^2-10^3 real images (~30), so precision sees blur that the attribute features read through. An image is
# sharp when its blur reading is below SHARP_BLUR: real images read ~0.03, the teacher's 30-step samples
# ~0.1-0.2, its 1-step mean (and a Gaussian blur of sigma 0.7 px) ~0.7.
DEGRADATION_SCALE = 30.0
SHARP_BLUR = 0.5

DEFAULT_CLASSIFIER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "shapes_classifier.safetensors")
CLASSIFIER_FORMAT = "shapes-classifier-v2"  # v2: the degradation head

# ----------------------------------------------------------------------------------------------------------
# Generator


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele et al. 2014) on a uint64 array; wrapping arithmetic is intended."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


_NUM_STREAMS = 8  # random numbers per item: 5 attributes + 3 jitter values
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_CAPTION_FORM_SALT = 0xC0FFEE  # the stream of caption forms (`sample_named`)


def _uniform(n: int, seed: int, start: int, salt: int = 0) -> np.ndarray:
    """(n, _NUM_STREAMS) float64 uniforms in [0, 1); row k depends only on (seed, salt, start + k).

    Number j of item i is output i * _NUM_STREAMS + j of a SplitMix64 generator whose state is derived from seed
    (and from `salt`, which gives a per-item draw that is independent of the attributes and jitter: salt 0).
    """
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0, got n={n}, start={start}")
    state = _splitmix64(np.array([seed % 2**64], dtype=np.uint64))
    if salt:
        state = _splitmix64(state + np.uint64(salt))
    counter = (np.arange(start, start + n, dtype=np.uint64)[:, None] * np.uint64(_NUM_STREAMS)
               + np.arange(_NUM_STREAMS, dtype=np.uint64) + np.uint64(1))
    bits = _splitmix64(state + counter * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def sample_attributes(n: int, seed: int, start: int = 0) -> torch.Tensor:
    """Attributes of items start..start+n-1 of stream `seed`: LongTensor (n, 5), columns in `ATTRIBUTES` order.

    Every attribute is uniform over its vocabulary; the background is uniform over the colours other than the
    object's.
    """
    return fill_omitted(torch.full((n, len(ATTRIBUTES)), OMITTED), seed, start)


def fill_omitted(attrs: torch.Tensor, seed: int, start: int = 0) -> torch.Tensor:
    """Attribute rows (n, 5) with OMITTED entries -> complete rows: each omitted attribute of row k drawn from the
    world's distribution given the row's named ones, from the numbers of item start+k of stream `seed`.

    Shape, size and position are uniform; an omitted colour is uniform over the colours other than a named
    background, an omitted background over those other than the (named or drawn) colour. Rows with every
    attribute omitted are `sample_attributes`' rows of the same items.
    """
    attrs = torch.as_tensor(attrs, dtype=torch.long).reshape(-1, len(ATTRIBUTES))
    u = torch.from_numpy(_uniform(len(attrs), seed, start)[:, : len(ATTRIBUTES)])
    drawn = (u * torch.tensor(NUM_CLASSES, dtype=torch.float64)).long()
    color, bg = ATTRIBUTES.index("color"), ATTRIBUTES.index("background")
    out = torch.where(attrs == OMITTED, drawn, attrs)

    def draw_except(k: int, excluded: torch.Tensor) -> torch.Tensor:  # uniform over the colours but `excluded`
        v = (u[:, k] * (len(COLORS) - 1)).long()
        return v + (v >= excluded).long()

    bg_named = attrs[:, bg] != OMITTED
    out[:, color] = torch.where(attrs[:, color] != OMITTED, attrs[:, color],
                                torch.where(bg_named, draw_except(color, attrs[:, bg]), drawn[:, color]))
    out[:, bg] = torch.where(bg_named, attrs[:, bg], draw_except(bg, out[:, color]))
    return out


def sample_named(n: int, seed: int, start: int = 0, full_share: float = FULL_CAPTION_SHARE) -> torch.Tensor:
    """Which attributes the captions of items start..start+n-1 of stream `seed` name: bool (n, 5).

    The caption mix of the training stream: a full caption with probability `full_share`, else one of the 31
    partial forms (any subset of the five attributes but all of them, "a shape" included), uniformly. Drawn from
    a stream of its own, so the items' attributes and jitter are those of `sample`.
    """
    u = _uniform(n, seed, start, salt=_CAPTION_FORM_SALT)
    forms = 2 ** len(ATTRIBUTES)
    form = np.where(u[:, 0] < full_share, forms - 1, np.floor(u[:, 1] * (forms - 1)).astype(np.int64))
    return torch.from_numpy((form[:, None] >> np.arange(len(ATTRIBUTES))) & 1).bool()


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


def render_captions(prompts: Sequence[str], seed: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images of captions: (images float32 (n, 3, 32, 32) in [-1, 1], attrs LongTensor (n, 5)); what caption
    i omits is drawn from item start+i of stream `seed` (`fill_omitted`), as is its jitter. For the full captions
    of items 0..n-1 of a stream these are `sample(n, seed)`'s images."""
    attrs = fill_omitted(torch.stack([parse_caption(p) for p in prompts]), seed, start)
    return render(attrs, sample_jitter(len(prompts), seed, start)), attrs


def stream_captions(n: int, seed: int, start: int = 0) -> list[str]:
    """The captions of items start..start+n-1 of stream `seed` in the training mix (`sample_named`): the tiny
    preset's prompts for teacher data."""
    return captions(sample_attributes(n, seed, start), sample_named(n, seed, start))


def lab_prompts(num_full: int, num_partial: int, seeds_per_caption: int, seed: int) -> list[str]:
    """The lab's evaluation captions: the full captions of items 0..num_full-1 of stream `seed`, then
    `num_partial` partial captions (items num_full.., a partial form each) each repeated `seeds_per_caption`
    times in a row, so that a sampler that draws image i from seed + i shows each its spread over seeds."""
    full = captions(sample_attributes(num_full, seed))
    partial = captions(sample_attributes(num_partial, seed, num_full), sample_named(num_partial, seed, num_full, 0.0))
    return full + [c for c in partial for _ in range(seeds_per_caption)]


def caption(attrs_row: Sequence[int], named: Optional[Sequence[bool]] = None) -> str:
    """One attribute row (5 ints, `ATTRIBUTES` order) -> its caption, naming the attributes `named` (5 bools;
    default all) and those only: an omitted shape becomes the noun "shape", any other omitted attribute drops its
    words ("a red circle", "a small shape on a blue background", "a shape")."""
    named = [True] * len(ATTRIBUTES) if named is None else [bool(v) for v in named]
    words = {a: VOCAB[a][int(v)] if keep else None for a, v, keep in zip(ATTRIBUTES, attrs_row, named)}
    return ("a" + (f" {words['size']}" if words["size"] else "") + (f" {words['color']}" if words["color"] else "")
            + f" {words['shape'] or 'shape'}" + (f" at the {words['position']}" if words["position"] else "")
            + (f" on a {words['background']} background" if words["background"] else ""))


def captions(attrs: torch.Tensor, named: Optional[torch.Tensor] = None) -> list[str]:
    """Attribute rows (n, 5) -> n captions, naming the attributes `named` ((n, 5) bools; default all)."""
    rows = attrs.tolist()
    return [caption(row, None if named is None else keep) for row, keep in
            zip(rows, [None] * len(rows) if named is None else named.tolist())]


def _caption_pattern() -> re.Pattern:
    def one_of(a: str) -> str:
        return "(" + "|".join(VOCAB[a]) + ")"

    return re.compile(rf"a(?: {one_of('size')})?(?: {one_of('color')})? (?:{one_of('shape')}|shape)"
                      rf"(?: at the {one_of('position')})?(?: on a {one_of('background')} background)?")


_CAPTION_RE = _caption_pattern()


def parse_caption(text: str) -> torch.Tensor:
    """Inverse of `caption`: LongTensor (5,), OMITTED (-1) for an attribute the caption does not name. Case,
    surrounding/repeated whitespace and a final '.' are ignored.

    Raises UserError naming the caption if it does not follow the grammar of the shapes world.
    """
    match = _CAPTION_RE.fullmatch(" ".join(text.lower().strip().removesuffix(".").split()))
    if match:
        values = dict(zip(("size", "color", "shape", "position", "background"), match.groups()))
        row = [VOCAB[a].index(values[a]) if values[a] else OMITTED for a in ATTRIBUTES]
        color, bg = row[ATTRIBUTES.index("color")], row[ATTRIBUTES.index("background")]
        if color == OMITTED or color != bg:
            return torch.tensor(row)
    raise UserError(f"caption {text!r} is not a shapes-world caption ('a [small|large] [colour] <shape or the word "
                    "shape> [at the <position>] [on a <colour> background]', the object's colour not the background's)")


def omitted_distribution(row: Sequence[int], attribute: str) -> torch.Tensor:
    """The world's distribution of an attribute that a parsed caption `row` (5 ints, OMITTED where not named)
    omits, given what it names: float64 (K_attribute,). Uniform, but a colour never equals a named background
    (nor a background a named colour); with both omitted each is uniform over all colours by symmetry."""
    k = ATTRIBUTES.index(attribute)
    if row[k] != OMITTED:
        raise ValueError(f"the caption names {attribute}")
    p = torch.ones(NUM_CLASSES[k], dtype=torch.float64)
    other = {"color": "background", "background": "color"}.get(attribute)
    if other is not None and row[ATTRIBUTES.index(other)] != OMITTED:
        p[row[ATTRIBUTES.index(other)]] = 0
    return p / p.sum()


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
    of it (where it is). A second head regresses the strength of the training degradations (`_augment`: blur,
    noise): the attribute heads learn to read through them, so without it the features would be blind to them
    and a blurred image would sit on the data's k-NN manifold (`on_manifold`) as a sharp one does.

    `features(x)` -> (N, feature_dim) penultimate activations (shapes-FD, precision and recall space);
    `forward(x)` -> list of logits (N, K_a), one per attribute in `ATTRIBUTES` order;
    `degradation(x)` -> (N, 2) predicted (blur, noise) strengths in [0, 1] units.
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
        self.degradation_head = nn.Linear(feature_dim, 2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        background = x.flatten(2).median(2).values[:, :, None, None]
        h = self.trunk(torch.cat([x, (x - background).abs().sum(1, keepdim=True)], 1))
        return F.relu(self.fc(torch.cat([h.amax((2, 3)), F.relu(self.where(h)).flatten(1)], 1)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.head(self.features(x)).split(NUM_CLASSES, dim=1))

    def degradation(self, x: torch.Tensor) -> torch.Tensor:
        return self.degradation_head(self.features(x))


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
    """Agreement between the predicted attributes of `images` ([0, 1]) and what their captions name.

    Returns {attribute: share correct among the captions that name it (absent if none does), ..., "all": share of
    images with every named attribute correct}.
    """
    if len(images) != len(prompts) or not len(prompts):
        raise ValueError(f"need as many images as captions (>0), got {len(images)} and {len(prompts)}")
    return _accuracy(_named_right(predict_attributes(images, classifier), prompts), prompts)


def _named_right(predicted: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """bool (N, 5): predicted attribute k of image i is right, or caption i does not name attribute k."""
    target = torch.stack([parse_caption(p) for p in prompts])
    return (predicted == target) | (target == OMITTED)


def _accuracy(right: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    named = torch.stack([parse_caption(p) for p in prompts]) != OMITTED
    acc = {a: right[named[:, k], k].float().mean().item() for k, a in enumerate(ATTRIBUTES) if named[:, k].any()}
    acc["all"] = right.all(1).float().mean().item()
    return acc


def prompt_adherence(images: torch.Tensor, prompts: Sequence[str],
                     classifier: Optional[ShapesClassifier] = None) -> float:
    """Share of images ([0, 1], (N, 3, 32, 32)) whose predicted attributes match everything their caption names."""
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


@torch.no_grad()
def shapes_features(images: torch.Tensor, classifier: Optional[ShapesClassifier] = None,
                    batch_size: int = 500) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [0, 1] -> the classifier's features float64 (N, feature_dim + 2) on CPU: its
    penultimate activations, then DEGRADATION_SCALE x its (blur, noise) reading."""
    model = classifier if classifier is not None else load_classifier()
    x = _to_classifier_input(images, model)

    def read(batch: torch.Tensor) -> torch.Tensor:
        h = model.features(batch)
        return torch.cat([h, DEGRADATION_SCALE * model.degradation_head(h)], 1)

    return torch.cat([read(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).double().cpu()


def blur_reading(features: torch.Tensor) -> torch.Tensor:
    """The classifier's blur reading (N,) in training-blur units, from `shapes_features` (N, D)."""
    return features[:, -2] / DEGRADATION_SCALE


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


def on_manifold(feats: torch.Tensor, reference: torch.Tensor, k: int = MANIFOLD_NEIGHBOURS) -> torch.Tensor:
    """Which rows of `feats` (N, D) lie on the k-NN manifold of `reference` (M, D) (Kynkaanniemi et al. 2019,
    eq. 1): inside the ball around some reference point whose radius is that point's distance to its k-th nearest
    neighbour in the reference set. Returns bool (N,)."""
    if len(reference) <= k:
        raise ValueError(f"the k-NN manifold needs more than k={k} reference points, got {len(reference)}")
    a, b = feats.double(), reference.double()
    radii = torch.cdist(b, b).kthvalue(k + 1, dim=1).values  # the (k+1)-th smallest: the first is the point itself
    return (torch.cdist(a, b) <= radii[None]).any(1)


def precision_recall(feats: torch.Tensor, reference: torch.Tensor,
                     k: int = MANIFOLD_NEIGHBOURS) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, eq. 2) of a sample's features (N, D) against a
    reference's (M, D): precision = share of the sample on the reference's k-NN manifold (fidelity), recall =
    share of the reference on the sample's manifold (diversity)."""
    return (on_manifold(feats, reference, k).double().mean().item(),
            on_manifold(reference, feats, k).double().mean().item())


def coverage_tv(predicted: torch.Tensor, prompts: Sequence[str], reference: Optional[torch.Tensor] = None) -> float:
    """How far the seeds of each partial caption spread over what it omits: for every caption that occurs at
    least twice (K images of K seeds) and every attribute it omits, the total-variation distance between the
    histogram of the attribute's predicted values over the K images and (reference None) the world's
    distribution of it given the caption (`omitted_distribution`), or the histogram over the `reference`
    images of the same prompts (e.g. the teacher's, same seeds); the mean over (caption, attribute) pairs.
    predicted, reference: LongTensor (N, 5) from `predict_attributes`. NaN if no caption repeats and omits.

    16 real renders per caption read ~0.2 against the world (sampling noise); one image per caption ~0.8.
    """
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    distances = []
    for prompt, index in groups.items():
        row = parse_caption(prompt).tolist()
        for k, a in enumerate(ATTRIBUTES):
            if len(index) < 2 or row[k] != OMITTED:
                continue
            histogram = torch.bincount(predicted[index, k], minlength=NUM_CLASSES[k]).double() / len(index)
            target = (omitted_distribution(row, a) if reference is None else
                      torch.bincount(reference[index, k], minlength=NUM_CLASSES[k]).double() / len(index))
            distances.append(0.5 * (histogram - target).abs().sum().item())
    return float(np.mean(distances)) if distances else float("nan")


@dataclass(frozen=True)
class Reference:
    """A reference image set for `score`, read once by `reference_set`: classifier features (N, D) and predicted
    attributes (N, 5). Image i is of the scored set's prompt i (coverage pairs their seeds by caption)."""

    features: torch.Tensor
    attributes: torch.Tensor

    def subset(self, index: Sequence[int]) -> "Reference":
        return Reference(self.features[list(index)], self.attributes[list(index)])


def reference_set(images: torch.Tensor, classifier: Optional[ShapesClassifier] = None) -> Reference:
    """Images (N, 3, 32, 32) in [0, 1] -> their `Reference` (features and predicted attributes)."""
    return Reference(shapes_features(images, classifier), predict_attributes(images, classifier))


def score(images: torch.Tensor, prompts: Sequence[str], references: Optional[dict[str, Reference]] = None,
          classifier: Optional[ShapesClassifier] = None) -> dict[str, float]:
    """The shapes-world scores of images ([0, 1], (N, 3, 32, 32)) against their captions, under one name each
    wherever they are reported:
    - `attributes_right`: every attribute the caption names is read right; `acc_<attribute>` per attribute;
    - `one_object`: share of images with exactly one object (`count_objects`), as every real image has;
    - `sharp`: share of images whose blur reading (`blur_reading`) is below SHARP_BLUR, as every real image's is;
    - `adherence`: attributes right *and* one object *and* sharp (blur reading < SHARP_BLUR): an averaged or
      blurred image that the classifier still reads right does not count;
    - `coverage_tv` (when partial captions repeat, K seeds each): each omitted attribute's histogram to the
      world's distribution (`coverage_tv`);
    - for every reference set {name: `reference_set` of images of the same prompts, e.g. "data": real renders of
      the captions, "teacher": the teacher's images, same seeds}: `shapes_fd_<name>` (shapes-FD),
      `precision_<name>`, `recall_<name>` (k-NN manifolds; sets of more than MANIFOLD_NEIGHBOURS images) and
      `coverage_tv_<name>` (histograms against its own).
    """
    if len(images) != len(prompts) or not len(prompts):
        raise ValueError(f"need as many images as captions (>0), got {len(images)} and {len(prompts)}")
    references = references or {}
    predicted = predict_attributes(images, classifier)
    right = _named_right(predicted, prompts)
    acc = _accuracy(right, prompts)
    one_object = count_objects(images) == 1
    features = shapes_features(images, classifier)
    sharp = blur_reading(features) < SHARP_BLUR
    metrics = {"adherence": (right.all(1) & one_object & sharp).float().mean().item(),
               "attributes_right": acc.pop("all"), **{f"acc_{a}": v for a, v in acc.items()},
               "one_object": one_object.float().mean().item(),
               "sharp": sharp.float().mean().item()}
    coverage = coverage_tv(predicted, prompts)  # NaN: no caption both repeats and omits an attribute
    if not math.isnan(coverage):
        metrics["coverage_tv"] = coverage
    for name, ref in references.items():
        metrics[f"shapes_fd_{name}"] = frechet_distance(features, ref.features)
        if min(len(features), len(ref.features)) > MANIFOLD_NEIGHBOURS:
            metrics[f"precision_{name}"], metrics[f"recall_{name}"] = precision_recall(features, ref.features)
        if not math.isnan(coverage):
            metrics[f"coverage_tv_{name}"] = coverage_tv(predicted, prompts, ref.attributes)
    return metrics


def split_by_form(prompts: Sequence[str]) -> dict[str, list[int]]:
    """{"full": indices of the captions naming all five attributes, "partial": the others}; empty forms left out."""
    full = [bool((parse_caption(p) != OMITTED).all()) for p in prompts]
    forms = {"full": [i for i, f in enumerate(full) if f], "partial": [i for i, f in enumerate(full) if not f]}
    return {form: index for form, index in forms.items() if index}


def score_by_form(images: torch.Tensor, prompts: Sequence[str], references: Optional[dict[str, Reference]] = None,
                  classifier: Optional[ShapesClassifier] = None) -> dict[str, float]:
    """`score` of the full and of the partial captions apart: {"full/<metric>": ..., "partial/<metric>": ...}."""
    metrics = {}
    for form, index in split_by_form(prompts).items():
        refs = {name: ref.subset(index) for name, ref in (references or {}).items()}
        scores = score(images[index], [prompts[i] for i in index], refs, classifier)
        metrics.update({f"{form}/{name}": v for name, v in scores.items()})
    return metrics


def pixel_std(n: int = 10000, seed: int = 0) -> float:
    """Std of generator pixels in [-1, 1], pooled over n images, all channels and positions."""
    images, _ = sample(n, seed)
    return images.double().std().item()


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation


def _augment(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-time degradations so that slightly blurry or noisy generated images keep their attributes:
    half of the images blend by a U(0, 1) weight towards a 3x3 box blur; all get Gaussian pixel noise with
    std U(0, 0.1) ([-1, 1] units). x: (N, 3, 32, 32) in [-1, 1] -> (same shape, clamped to [-1, 1], their
    strengths (N, 2): the blur weight and the noise std / 0.1, the degradation head's targets)."""
    def per_image() -> torch.Tensor:
        return torch.rand(len(x), 1, 1, 1, generator=generator)

    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    blur = per_image() * (per_image() < 0.5)
    noise = per_image()
    x = x + blur * (blurred - x)
    x = x + 0.1 * noise * torch.randn(x.shape, generator=generator)
    return x.clamp(-1, 1), torch.cat([blur, noise], 1).flatten(1)


DEGRADATION_LOSS_WEIGHT = 3.0  # the degradation head's MSE (targets in [0, 1]) against the sum of 5 cross-entropies


def train_classifier(seed: int = 0, steps: int = 2400, batch_size: int = 64, lr: float = 3e-3) -> ShapesClassifier:
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
        x, strength = _augment(x, generator)
        features = model.features(x)
        logits = model.head(features).split(NUM_CLASSES, dim=1)
        loss = (sum(F.cross_entropy(logit, y[:, k]) for k, logit in enumerate(logits))
                + DEGRADATION_LOSS_WEIGHT * F.mse_loss(model.degradation_head(features), strength))
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
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-n", type=int, default=2000, help="held-out images (and FD set size)")
    p = sub.add_parser("evaluate", help="held-out accuracy, shapes-FD noise floor and pixel std of a classifier")
    p.add_argument("--classifier", default=DEFAULT_CLASSIFIER)
    p.add_argument("--seed", type=int, default=1000, help="held-out stream seed")
    p.add_argument("--n", type=int, default=1000, help="images per set")
    p = sub.add_parser("preview", help="PNG grid of generated images with their captions (the training mix)")
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
        images, _ = sample(args.n, args.seed)
        save_grid(args.out, [(f"shapes world\nstream {args.seed}", to_uint8((images + 1) / 2))],
                  stream_captions(args.n, args.seed))
        print(f"wrote {args.out}")
    elif args.command == "prompts":
        atomic_write_text(args.out, "".join(c + "\n" for c in captions(sample_attributes(args.n, args.seed))))
        print(f"wrote {args.n} captions to {args.out}")


if __name__ == "__main__":
    run_cli(main)
