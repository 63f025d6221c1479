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
"""
import argparse
import csv
import json
import os
import sys
import zlib
from collections import Counter
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, Sampler

from utils import UserError, atomic_write, run_cli

IMAGES_DIR, LATENTS_DIR = "images", "latents"
CAPTIONS_JSON, CAPTIONS_CSV, MANIFEST_JSON = "captions.json", "captions.csv", "manifest.json"
SHARD_FORMAT = "microdit-teacher-latents-v1"
SHARD_DTYPE = torch.float16
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


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


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Summarize and check a data folder (teacher data or images + "
                                     "captions): item counts, shapes, dtypes, a few captions, problems found.")
    parser.add_argument("data_dir")
    parser.add_argument("--captions", type=int, default=3, help="how many captions to show")
    args = parser.parse_args(argv)
    print("\n".join(summarize(args.data_dir, args.captions)))


if __name__ == "__main__":
    run_cli(main)
