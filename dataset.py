"""Training data for distillation: the teacher-data folder written by generate_data.py, and an image folder.

DATA_DIR layout (generate_data.py writes all of it; a hand-made image folder needs only images/ and captions):
    images/NNNN.png     image of item NNNN (zero-padded, >= 4 digits; `image_name`)
    captions.json       {file name: caption}, or captions.csv with columns file_name, caption
    latents/shard_*.safetensors   one per generated batch (`save_shard`): latents (B, C, h, w) float16 = the
                        teacher's final latents, embeddings (B, 1, 77, D) float16 = its text embeddings,
                        indices (B,) int64 = prompt indices; metadata {SHARD_FORMAT: '{"prompts": [B prompts]}'}
    manifest.json       the generation settings and counts

`get_dataloader` prefers the latent shards (training then needs neither the VAE nor the text encoder) and falls
back to images + captions. `python dataset.py DATA_DIR` prints a summary and checks every file.

Latents people already have (`import_latent_files`; `python dataset.py --import SRC`, or `train.py --data-dir SRC`):
    SRC/latents/STEM.pt   one tensor (C, h, w) per image: VAE latents, with or without the scaling factor
    SRC/prompts/STEM.txt  its caption
become latent shards (the captions encoded once by the preset's text encoder) in DATA_DIR/latents, next to the
.pt files when DATA_DIR is SRC, with manifest.json saying what was imported and how it was scaled.
"""
import argparse
import csv
import hashlib
import json
import math
import os
import sys
import zlib
from collections import Counter
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from pipeline import add_pipeline_args, get_preset, load_text_encoder
from utils import UserError, atomic_write, atomic_write_json, load_torch_file, run_cli

IMAGES_DIR, LATENTS_DIR = "images", "latents"
CAPTIONS_JSON, CAPTIONS_CSV, MANIFEST_JSON = "captions.json", "captions.csv", "manifest.json"
SHARD_FORMAT = "microdit-teacher-latents-v1"
SHARD_DTYPE = torch.float16
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
PROMPTS_DIR = "prompts"  # captions of imported latent files: SRC/prompts/STEM.txt beside SRC/latents/STEM.pt
IMPORT_SHARD_SIZE = 256  # items per shard (and per text-encoder batch) of an import


# ----------------------------------------------------------------------------------------------------------
# On-disk format


def image_name(index: int, num_items: int) -> str:
    """File name of image `index` of `num_items` (teacher data, benchmark folders): NNNN.png, zero-padded to
    max(4, digits of the largest index)."""
    return f"{index:0{max(4, len(str(num_items - 1)))}d}.png"


def shard_name(indices: Sequence[int]) -> str:
    """Deterministic shard file name: first prompt index + CRC32 of all of them, so different item sets never
    collide (a resumed run may batch the remaining items differently)."""
    crc = zlib.crc32(np.asarray(indices, dtype=np.int64).tobytes())
    return f"shard_{indices[0]:05d}_{crc:08x}.safetensors"


def save_shard(path: str, latents: torch.Tensor, embeddings: torch.Tensor, indices: Sequence[int],
               prompts: Sequence[str]) -> None:
    """Atomically write one latent shard: latents (B, C, h, w), embeddings (B, 1, L, D) as float16, indices (B,)."""
    tensors = {
        "latents": latents.to(SHARD_DTYPE).contiguous(),
        "embeddings": embeddings.to(SHARD_DTYPE).contiguous(),
        "indices": torch.as_tensor(indices, dtype=torch.int64),
    }
    # One metadata key: safetensors writes the metadata map in hash order, so several keys would make the
    # file bytes differ between identical runs.
    metadata = {SHARD_FORMAT: json.dumps({"prompts": list(prompts)}, ensure_ascii=False)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_shard_index(path: str) -> tuple[list[int], list[str]]:
    """(prompt indices, prompts) of a shard, reading only its header and index tensor. UserError if unreadable."""
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            if SHARD_FORMAT not in meta or set(f.keys()) != {"latents", "embeddings", "indices"}:
                raise ValueError(f"not a {SHARD_FORMAT} file")
            indices = f.get_tensor("indices").tolist()
            prompts = json.loads(meta[SHARD_FORMAT])["prompts"]
            if len(prompts) != len(indices) or f.get_slice("latents").get_shape()[0] != len(indices):
                raise ValueError("row counts of latents, indices and prompts differ")
    except (OSError, SafetensorError, ValueError, KeyError) as e:
        raise UserError(f"corrupt latent shard {path} ({e}); delete it and rerun generate_data.py to redo its items")
    return indices, prompts


def shard_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Per-item shapes of a shard, from its header: {'latents': (C, h, w), 'embeddings': (1, L, D)}."""
    with safe_open(path, "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()[1:]) for k in ("latents", "embeddings")}


def has_captions(data_dir: str) -> bool:
    """Whether DATA_DIR has a captions file (captions.json or captions.csv) for its images."""
    return any(os.path.isfile(os.path.join(data_dir, n)) for n in (CAPTIONS_JSON, CAPTIONS_CSV))


def list_shards(data_dir: str) -> list[str]:
    """Sorted paths of the latent shards in DATA_DIR/latents (empty if there are none)."""
    folder = os.path.join(data_dir, LATENTS_DIR)
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".safetensors")
                  and not n.startswith("."))


def _require_dir(data_dir: str) -> None:
    if not os.path.isdir(data_dir):
        raise UserError(f"data folder not found: {data_dir}")


# ----------------------------------------------------------------------------------------------------------
# Datasets


def read_captions(data_dir: str) -> dict[str, str]:
    """{image file name: caption} from DATA_DIR/captions.json, else DATA_DIR/captions.csv (columns file_name, caption).

    UserError (naming the file) for: neither file, malformed JSON/CSV, a duplicate file name, an empty or
    non-string caption.
    """
    json_path, csv_path = os.path.join(data_dir, CAPTIONS_JSON), os.path.join(data_dir, CAPTIONS_CSV)
    if os.path.isfile(json_path):
        path = json_path

        def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            dup = [k for k, n in Counter(k for k, _ in pairs).items() if n > 1]
            if dup:
                raise UserError(f"{path}: file name '{dup[0]}' appears more than once")
            return dict(pairs)

        try:
            with open(path, encoding="utf-8") as f:
                pairs = json.load(f, object_pairs_hook=no_duplicates)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid UTF-8 JSON ({e})") from None
        if not isinstance(pairs, dict):
            raise UserError(f"{path}: expected a JSON object {{file name: caption}}")
        pairs = list(pairs.items())
    elif os.path.isfile(csv_path):
        path = csv_path
        try:
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames or not {"file_name", "caption"} <= set(reader.fieldnames):
                    raise UserError(f"{path}: needs the columns file_name and caption")
                pairs = [(row["file_name"], row["caption"]) for row in reader]
        except (csv.Error, UnicodeDecodeError) as e:
            raise UserError(f"{path}: malformed CSV ({e})") from None
        dup = [k for k, n in Counter(k for k, _ in pairs).items() if n > 1]
        if dup:
            raise UserError(f"{path}: file name '{dup[0]}' appears more than once")
    else:
        raise UserError(f"no {CAPTIONS_JSON} or {CAPTIONS_CSV} in {data_dir}")
    for name, text in pairs:
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{path}: the caption of '{name}' is empty or not a string")
    return dict(pairs)


def load_image(path: str, resolution: int) -> torch.Tensor:
    """An image file -> float32 (3, resolution, resolution) in [-1, 1]: shorter side resized to `resolution`
    (LANCZOS), then center-cropped. UserError naming the file if it cannot be decoded."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports truncated/corrupt files as OSError/SyntaxError
        raise UserError(f"cannot read image {path} ({e})") from None
    w, h = im.size
    scale = resolution / min(w, h)
    if (w, h) != (resolution, resolution):
        im = im.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.LANCZOS)
        left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
    return x.float() / 127.5 - 1


class ImageCaptionDataset(Dataset):
    """Images of DATA_DIR/images with their captions (`read_captions`), sorted by file name.

    Item: dict(image=float32 (3, resolution, resolution) in [-1, 1], caption=str, index=int position).
    A caption whose image is missing is skipped and counted in `self.missing` (a partial folder is still usable);
    an image without a caption is ignored; a corrupt image raises UserError naming it when it is loaded.
    """

    def __init__(self, data_dir: str, resolution: int):
        _require_dir(data_dir)
        captions = read_captions(data_dir)
        image_dir = os.path.join(data_dir, IMAGES_DIR)
        names = sorted(captions)
        present = [n for n in names if os.path.isfile(os.path.join(image_dir, n))]
        self.missing = len(names) - len(present)
        if self.missing:
            first = next(n for n in names if not os.path.isfile(os.path.join(image_dir, n)))
            print(f"warning: {data_dir}: skipped {self.missing} captions whose image is missing (first: {first})",
                  file=sys.stderr)
        if not present:
            raise UserError(f"{data_dir}: no captioned images in {image_dir}")
        self.paths = [os.path.join(image_dir, n) for n in present]
        self.captions = [captions[n] for n in present]
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return dict(image=load_image(self.paths[i], self.resolution), caption=self.captions[i], index=i)


class LatentCaptionDataset(Dataset):
    """Teacher latents and text embeddings from DATA_DIR/latents, sorted by prompt index.

    Item: dict(latents float16 (C, h, w), embeddings float16 (1, 77, D), index=int prompt index (image NNNN),
    caption=str). Tensors come as stored (float16, half the host-to-device traffic): the trainer casts them.
    Rows are read lazily through a memory map (only the headers are read here). An index stored in two shards
    (a regenerated item) is used once, from the first shard in file order.
    """

    def __init__(self, data_dir: str):
        _require_dir(data_dir)
        self.shards = list_shards(data_dir)
        if not self.shards:
            raise UserError(f"{data_dir}: no latent shards in {os.path.join(data_dir, LATENTS_DIR)}")
        items: dict[int, tuple[int, int, str]] = {}  # prompt index -> (shard number, row, caption)
        for s, path in enumerate(self.shards):
            indices, prompts = read_shard_index(path)
            for row, (index, prompt) in enumerate(zip(indices, prompts)):
                items.setdefault(index, (s, row, prompt))
        self.indices = sorted(items)
        self.rows = [items[i][:2] for i in self.indices]
        self.captions = [items[i][2] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        shard, row = self.rows[i]
        with safe_open(self.shards[shard], "pt") as f:
            latents, embeddings = f.get_slice("latents")[row], f.get_slice("embeddings")[row]
        return dict(latents=latents, embeddings=embeddings, index=self.indices[i], caption=self.captions[i])

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-item shapes: {'latents': (C, h, w), 'embeddings': (1, L, D)}."""
        return shard_shapes(self.shards[0])


def check_data_dir(data_dir: str, latent_shape: Optional[Sequence[int]] = None,
                   text_width: Optional[int] = None) -> None:
    """Read what training will read, in seconds, before any expensive work.

    With latent shards (what `get_dataloader` prefers): every shard's header, and latents (C, h, w) equal to
    `latent_shape` and embeddings of width `text_width` where given. Else: the captions parse and every captioned
    image that is present decodes (PIL `verify`). UserError naming the first bad file.
    """
    _require_dir(data_dir)
    shards = list_shards(data_dir)
    for path in shards:
        read_shard_index(path)  # a corrupt header is a UserError naming the shard
        latents, embeddings = shard_shapes(path).values()
        if (latent_shape is not None and latents != tuple(latent_shape)) or (
                text_width is not None and embeddings[-1] != text_width):
            raise UserError(f"{path}: latents {latents} and embeddings {embeddings} do not fit this preset "
                            f"(latents {tuple(latent_shape or latents)}, text width {text_width}); use the "
                            "preset's own teacher data")
    if shards:
        return
    image_dir = os.path.join(data_dir, IMAGES_DIR)
    for name in read_captions(data_dir):
        path = os.path.join(image_dir, name)
        if os.path.isfile(path):
            try:
                with Image.open(path) as im:
                    im.verify()
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for corrupt files
                raise UserError(f"cannot read image {path} ({e})") from None


# ----------------------------------------------------------------------------------------------------------
# Sampling and loading


class InfiniteSampler(Sampler[int]):
    """Endless, deterministic stream of dataset indices, sharded over ranks.

    The global stream is pass 0, pass 1, ...; pass e is a permutation of range(len(dataset)) drawn from
    numpy's generator seeded with (seed, e). Rank r takes global positions
    r, r + world_size, r + 2 world_size, ...; `start_index` skips the first start_index of those, so a run that
    resumes with start_index = samples this rank has consumed (steps * per-rank batch size: the trainer counts
    them, since DataLoader workers read ahead of the training loop) continues the exact stream.
    """

    def __init__(self, dataset: Sequence, seed: int = 0, rank: int = 0, world_size: int = 1, start_index: int = 0):
        if len(dataset) == 0:
            raise UserError("cannot sample from an empty dataset")
        if not 0 <= rank < world_size or start_index < 0:
            raise ValueError(f"need 0 <= rank < world_size and start_index >= 0, got rank {rank}, "
                             f"world_size {world_size}, start_index {start_index}")
        self.n, self.seed = len(dataset), seed
        self.rank, self.world_size, self.start_index = rank, world_size, start_index

    def permutation(self, epoch: int) -> np.ndarray:
        """Dataset order of pass `epoch` of the global stream."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[int]:
        position = self.start_index * self.world_size + self.rank  # in the global stream
        epoch, order = -1, None
        while True:
            if position // self.n != epoch:
                epoch = position // self.n
                order = self.permutation(epoch)
            yield int(order[position % self.n])
            position += self.world_size


def get_dataloader(
    data_dir: str,
    batch_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_index: int = 0,
    num_workers: int = 2,
    resolution: Optional[int] = None,
) -> DataLoader:
    """Endless DataLoader over DATA_DIR for one rank: batches of `batch_size` items from `InfiniteSampler`.

    The latent shards (LatentCaptionDataset) when DATA_DIR has them, else its images + captions
    (ImageCaptionDataset, at `resolution`). start_index: samples this rank already consumed.
    Batches are dicts of stacked tensors, `caption` a list of str.
    """
    _require_dir(data_dir)
    if list_shards(data_dir):
        dataset: Dataset = LatentCaptionDataset(data_dir)
    elif resolution is None:
        raise UserError(f"{data_dir} has no latent shards: training on its images needs a resolution")
    else:
        dataset = ImageCaptionDataset(data_dir, resolution)
    sampler = InfiniteSampler(dataset, seed, rank, world_size, start_index)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=True, persistent_workers=num_workers > 0)


# ----------------------------------------------------------------------------------------------------------
# Importing latents people already have: SRC/latents/STEM.pt + SRC/prompts/STEM.txt


def latent_files(src: str) -> list[tuple[str, str]]:
    """(latent .pt path, caption .txt path) of every SRC/latents/*.pt, sorted by stem; [] if there are none.
    UserError naming the first .pt whose caption file is missing."""
    folder = os.path.join(src, LATENTS_DIR)
    if not os.path.isdir(folder):
        return []
    stems = sorted(n[:-3] for n in os.listdir(folder) if n.endswith(".pt") and not n.startswith("."))
    pairs = [(os.path.join(folder, f"{s}.pt"), os.path.join(src, PROMPTS_DIR, f"{s}.txt")) for s in stems]
    missing = [txt for _, txt in pairs if not os.path.isfile(txt)]
    if missing:
        raise UserError(f"{len(missing)} latent files have no caption, the first: {missing[0]} is missing")
    return pairs


def read_latent_file(path: str, latent_shape: Sequence[int]) -> torch.Tensor:
    """One imported latent tensor, float32 (C, h, w), loaded with weights_only (no code runs). UserError naming the
    file for a pickled object, something not a tensor, another shape, or non-finite values."""
    x = load_torch_file(path, "latent file")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise UserError(f"{path}: expected one floating-point tensor {tuple(latent_shape)}, found {type(x).__name__}"
                        + (f" of {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    if tuple(x.shape) != tuple(latent_shape):
        raise UserError(f"{path}: latents of shape {tuple(x.shape)}, this preset needs {tuple(latent_shape)}")
    if not x.isfinite().all():
        raise UserError(f"{path}: non-finite values")
    return x.float()


def read_caption_file(path: str) -> str:
    """The caption in a .txt file, stripped; UserError naming the file if it is empty or not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            caption = f.read().strip()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e})") from None
    if not caption:
        raise UserError(f"{path}: empty caption")
    return caption


def scaling_multiplier(std: float, scaling_factor: Optional[float], scaled: Optional[bool]) -> tuple[float, str]:
    """What to multiply imported latents by so that they are the DiT's input (VAE latents times the scaling factor
    s, spec section 5), and why. `scaled`: the user's word (True: already times s); None: decide from their
    standard deviation, ~1 once scaled and ~1/s (7.7 for SDXL's 0.13025) before: the threshold is their geometric
    mean, 1/sqrt(s)."""
    if scaling_factor is None:
        return 1.0, "the preset's codec has no scaling factor: latents used as they are"
    threshold = scaling_factor ** -0.5
    if scaled is None:
        scaled = std < threshold
        how = f"std {std:.3g} {'<' if scaled else '>='} 1/sqrt(s) = {threshold:.3g}"
    else:
        how = f"--latents-scaled {'yes' if scaled else 'no'}"
    if scaled:
        return 1.0, f"{how}: already multiplied by the scaling factor s = {scaling_factor:g}, used as they are"
    return scaling_factor, f"{how}: not yet multiplied by the scaling factor s = {scaling_factor:g}, multiplied by it"


def import_latent_files(src: str, data_dir: str, encode: Callable[[list[str]], torch.Tensor],
                        latent_shape: Sequence[int], scaling_factor: Optional[float],
                        scaled: Optional[bool] = None, settings: Optional[dict] = None) -> dict:
    """SRC/latents/*.pt + SRC/prompts/*.txt -> latent shards in DATA_DIR/latents (item i = the i-th stem in sorted
    order), the captions encoded by `encode` (B captions -> (B, 1, L, D)) once. Every file is read and checked
    before the first caption is encoded (one-line UserErrors naming the file); the latents are multiplied as
    `scaling_multiplier` decides. Resumable: a finished shard is kept. `settings` (e.g. the preset) are recorded
    in manifest.json with the scaling, and a rerun with other ones is refused. Returns the manifest."""
    pairs = latent_files(src)
    if not pairs:
        raise UserError(f"{src}: no {LATENTS_DIR}/*.pt latent files to import")
    stems = [os.path.basename(pt)[:-3] for pt, _ in pairs]
    record = dict(source="import", imported_from=os.path.abspath(src), num_items=len(pairs), scaled=scaled,
                  stems_sha256=hashlib.sha256("\n".join(stems).encode("utf-8")).hexdigest(), **(settings or {}))
    manifest_path = os.path.join(data_dir, MANIFEST_JSON)
    old = {}
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            old = json.load(f)
        diff = [f"{k}={old.get('settings', {}).get(k)!r} (now {v!r})" for k, v in record.items()
                if old.get("settings", {}).get(k) != v]
        if diff and list_shards(data_dir):
            raise UserError(f"{data_dir} holds latents imported with other settings: {', '.join(diff)}; delete "
                            f"{os.path.join(data_dir, LATENTS_DIR)}/shard_*.safetensors and {manifest_path} to redo it")
        if not diff and old.get("complete"):
            print(f"{data_dir}: {len(pairs)} latent files imported before; {old['scaling']}")
            return old
    captions = [read_caption_file(txt) for _, txt in pairs]
    total, total_sq, count = 0.0, 0.0, 0
    for pt, _ in tqdm(pairs, unit="file", desc="checking latent files"):
        x = read_latent_file(pt, latent_shape).double()
        total, total_sq, count = total + x.sum().item(), total_sq + x.square().sum().item(), count + x.numel()
    std = math.sqrt(max(total_sq / count - (total / count) ** 2, 0.0))
    multiplier, how = scaling_multiplier(std, scaling_factor, scaled)
    print(f"{src}: {len(pairs)} latent files, std {std:.3g}; {how}")
    if list_shards(data_dir) and old.get("multiplier", multiplier) != multiplier:
        raise UserError(f"{data_dir} holds latents imported with another multiplier ({old['multiplier']:g}, now "
                        f"{multiplier:g}); delete its shards and {manifest_path} to redo it")
    os.makedirs(os.path.join(data_dir, LATENTS_DIR), exist_ok=True)
    atomic_write_json(manifest_path, dict(settings=record, multiplier=multiplier, complete=False))
    done = set(list_shards(data_dir))
    for start in tqdm(range(0, len(pairs), IMPORT_SHARD_SIZE), unit="shard", desc="encoding captions"):
        indices = list(range(start, min(start + IMPORT_SHARD_SIZE, len(pairs))))
        path = os.path.join(data_dir, LATENTS_DIR, shard_name(indices))
        if path in done:
            continue
        latents = torch.stack([read_latent_file(pairs[i][0], latent_shape) for i in indices]) * multiplier
        texts = [captions[i] for i in indices]
        save_shard(path, latents, encode(texts).cpu(), indices, texts)
    manifest = dict(settings=record, multiplier=multiplier, complete=True, num_prompts=len(pairs),
                    num_finished=len(pairs), latents_std_in_files=std, scaling=how,
                    stored_dtype=str(SHARD_DTYPE).removeprefix("torch."))
    atomic_write_json(manifest_path, manifest)
    return manifest


def import_from_args(args: argparse.Namespace, src: str, data_dir: str, device: str | torch.device = "cpu") -> dict:
    """`import_latent_files` with the text encoder and scaling factor of the options of `add_pipeline_args`
    (--preset --text-encoder --vae) and --latents-scaled (auto | yes | no); random towers drawn from seed 0 as
    `pipeline_from_args` draws them."""
    preset = get_preset(args.preset)
    scaling_factor = getattr(preset.codec.build(args.vae, torch.float32, 0), "scaling_factor", None)
    encoder = load_text_encoder(preset, args.text_encoder, device)
    scaled = {"auto": None, "yes": True, "no": False}[args.latents_scaled]  # add_import_args
    return import_latent_files(src, data_dir, encoder.encode, preset.latent_shape, scaling_factor, scaled,
                               dict(preset=preset.name, text_encoder=args.text_encoder))


# ----------------------------------------------------------------------------------------------------------
# Summary


def summarize(data_dir: str, num_captions: int = 3) -> list[str]:
    """Human-readable summary lines of DATA_DIR, after reading every file; problems are listed, not raised."""
    _require_dir(data_dir)
    lines, problems = [f"data folder: {data_dir}"], []
    manifest_path = os.path.join(data_dir, MANIFEST_JSON)
    if os.path.isfile(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as f:
                lines.append(f"manifest: {json.dumps(json.load(f)['settings'])}")
        except (ValueError, KeyError, TypeError) as e:
            problems.append(f"unreadable {manifest_path} ({e})")
    latent_indices: set[int] = set()
    if list_shards(data_dir):
        try:
            ds = LatentCaptionDataset(data_dir)
            latent_indices = set(ds.indices)
            shapes = ds.shapes()
            lines.append(f"latents: {len(ds)} items in {len(ds.shards)} shards; latents {shapes['latents']}, "
                         f"embeddings {shapes['embeddings']}, {str(SHARD_DTYPE).removeprefix('torch.')}")
            for i in range(len(ds)):
                item = ds[i]
                if not (item["latents"].isfinite().all() and item["embeddings"].isfinite().all()):
                    problems.append(f"non-finite values in the latents of item {item['index']}")
            lines += [f"  {ds.indices[i]}: {ds.captions[i]!r}" for i in range(min(num_captions, len(ds)))]
        except UserError as e:
            problems.append(str(e))
    else:
        lines.append("latents: none")
    if latent_indices and not has_captions(data_dir):  # imported latents, or shards alone: no images to check
        lines.append("images: none")
    else:
        try:
            captions = read_captions(data_dir)
            image_dir = os.path.join(data_dir, IMAGES_DIR)
            names = sorted(captions)
            sizes: Counter = Counter()
            for name in names:
                path = os.path.join(image_dir, name)
                if not os.path.isfile(path):
                    problems.append(f"caption for a missing image: {path}")
                    continue
                try:
                    with Image.open(path) as im:
                        im.load()
                        sizes[(im.width, im.height, im.mode)] += 1
                except (OSError, SyntaxError, ValueError) as e:
                    problems.append(f"corrupt image {path} ({e})")
            lines.append(f"images: {sum(sizes.values())} readable of {len(names)} captioned; "
                         + ", ".join(f"{w}x{h} {mode}: {n}" for (w, h, mode), n in sizes.most_common()))
            if latent_indices:
                stems = {int(os.path.splitext(n)[0]) for n in names if os.path.splitext(n)[0].isdigit()}
                if stems != latent_indices:
                    problems.append(f"{len(latent_indices - stems)} latent items have no captioned image, "
                                    f"{len(stems - latent_indices)} captioned images have no latents")
            lines += [f"  {n}: {captions[n]!r}" for n in names[:num_captions]]
        except UserError as e:
            problems.append(str(e))
    lines.append(f"problems: {len(problems)}")
    lines += [f"  {p}" for p in problems]
    return lines


def add_import_args(parser: argparse.ArgumentParser) -> None:
    """--latents-scaled, the one option of an import beyond the pipeline's (train.py has it too)."""
    parser.add_argument("--latents-scaled", choices=("auto", "yes", "no"), default="auto",
                        help="imported latents are already multiplied by the VAE's scaling factor (yes), not yet "
                        "(no), or tell from their standard deviation (auto)")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description="Summarize and check a data folder (teacher data or images + captions): item counts, shapes, "
                    "dtypes, a few captions, problems found. With --import SRC: make latent shards from a folder "
                    "SRC/latents/*.pt + SRC/prompts/*.txt.",
        epilog="python dataset.py data/teacher; python dataset.py --import my_latents --preset microdit-xl-512")
    parser.add_argument("data_dir", nargs="?", help="the folder to summarize, or where --import writes (default SRC)")
    parser.add_argument("--captions", type=int, default=3, help="how many captions to show")
    parser.add_argument("--import", dest="import_from", metavar="SRC", help="import SRC/latents/*.pt (one (C, h, w) "
                        "tensor per image) and SRC/prompts/*.txt (its caption, same stem) as latent shards")
    add_pipeline_args(parser)  # --preset --text-encoder --vae (the others are not used here)
    add_import_args(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the text encoder runs")
    args = parser.parse_args(argv)
    if args.import_from:
        data_dir = args.data_dir or args.import_from
        import_from_args(args, args.import_from, data_dir, args.device)
    elif not args.data_dir:
        parser.error("give a DATA_DIR to summarize, or --import SRC")
    print("\n".join(summarize(args.data_dir or args.import_from, args.captions)))


if __name__ == "__main__":
    run_cli(main)
