"""Teacher data for distillation: one teacher image per prompt, with its final latents and text embeddings.

Every item i of the prompt list gets the teacher's Heun sampler (30 steps, guidance 5.0 by default) from the
noise of seed `--seed + i`, so the output does not depend on resumption or the number of ranks (bit-identical
for one --batch-size on one kind of hardware; another batch size changes only the rounding of batched kernels).
The folder layout is described in dataset.py (images/NNNN.png, captions.json, latents/shard_*.safetensors,
manifest.json). A rerun resumes: an item is finished when its PNG and its latents are on disk; every file is
written to a temporary name and renamed, so a killed run loses at most the batches in flight.

    python generate_data.py --sample-from train_anno_realease_repath.jsonl --field prompt --num 5000 \
        --prompts prompts_to_generate.json                      # JourneyDB annotations -> 5000 random prompts
    python generate_data.py --prompts prompts_to_generate.json --out data/teacher \
        --teacher dit_4_channel_0.5B_synthetic_data.pt
    accelerate launch --num_processes 8 generate_data.py ...    # the same, one shard of the batches per GPU
"""
import argparse
import hashlib
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image
from tqdm import tqdm

from dataset import (CAPTIONS_JSON, IMAGES_DIR, LATENTS_DIR, MANIFEST_JSON, SHARD_DTYPE, LatentCaptionDataset,
                     image_name, list_shards, read_shard_index, save_shard, shard_name)
from pipeline import DTYPES, Pipeline, add_pipeline_args, default_vae_dtype, get_preset, pipeline_from_args
from sampler import PROMPT_FILE_FORMATS, generate_images, load_prompts, to_uint8
from utils import UserError, atomic_write, atomic_write_json, run_cli

TEACHER_DATA_SEED = 2024  # the reference run's seed
MAX_PENDING_WRITES = 2  # batches queued for the writer threads before the generator waits
NO_PROMPTS_HINT = ("no prompt list: pass --prompts FILE (a JSON list, .txt, .tsv/.csv), or sample one from the "
                   "JourneyDB annotations (huggingface.co/datasets/JourneyDB/JourneyDB, "
                   "data/train/train_anno_realease_repath.jsonl) with --sample-from FILE --field prompt --num 5000 "
                   "--prompts prompts_to_generate.json")


def sample_prompts(prompts: Sequence[str], num: int, seed: int) -> list[str]:
    """`num` distinct prompts drawn without replacement from `prompts` (duplicates removed first), in draw order,
    reproducible from `seed`."""
    unique = list(dict.fromkeys(prompts))
    if num > len(unique):
        raise UserError(f"cannot sample {num} prompts from a source with {len(unique)} distinct prompts")
    return [unique[i] for i in np.random.default_rng(seed).choice(len(unique), size=num, replace=False)]


def rank_batches(todo: Sequence[int], batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """The batches rank `rank` of `world_size` generates: `todo` cut into batches, then every world_size-th batch
    starting at `rank`. Sharding whole batches keeps every batch as one process would make it, so the output is
    bit-identical for any number of ranks (batched kernels round differently for other batch compositions)."""
    batches = [list(todo[i:i + batch_size]) for i in range(0, len(todo), batch_size)]
    return batches[rank::world_size]


def finished_items(data_dir: str, num_items: int) -> set[int]:
    """Prompt indices whose PNG and latents are both on disk."""
    in_shards: set[int] = set()
    for path in list_shards(data_dir):
        in_shards.update(read_shard_index(path)[0])
    image_dir = os.path.join(data_dir, IMAGES_DIR)
    return {i for i in in_shards if i < num_items and os.path.isfile(os.path.join(image_dir, image_name(i, num_items)))}


def write_batch(data_dir: str, indices: Sequence[int], prompts: Sequence[str], num_items: int,
                images: np.ndarray, latents: torch.Tensor, embeddings: torch.Tensor) -> None:
    """Write a generated batch: the PNGs first, then the latent shard, which marks the batch finished."""
    for index, image in zip(indices, images):
        path = os.path.join(data_dir, IMAGES_DIR, image_name(index, num_items))
        atomic_write(path, lambda tmp, image=image: Image.fromarray(image).save(tmp, format="PNG"))
    save_shard(os.path.join(data_dir, LATENTS_DIR, shard_name(indices)), latents, embeddings, indices, prompts)


def generate_batches(pipe: Pipeline, prompts: Sequence[str], batches: Sequence[Sequence[int]], data_dir: str,
                     num_steps: int, guidance_scale: float, seed: int, show_progress: bool = True) -> None:
    """Generate and write `batches` (lists of prompt indices); PNG encoding and file writes run on background
    threads so the accelerator does not wait for them."""
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=2) as pool, \
            tqdm(total=sum(map(len, batches)), unit="img", desc="teacher data", disable=not show_progress) as bar:
        for batch in batches:
            texts = [prompts[i] for i in batch]
            out = generate_images(pipe, texts, [seed + i for i in batch], num_steps, guidance_scale, len(batch))
            pending.append(pool.submit(write_batch, data_dir, batch, texts, len(prompts), to_uint8(out["images"]),
                                       out["latents"], out["embeddings"]))
            while len(pending) > MAX_PENDING_WRITES or (pending and pending[0].done()):
                pending.popleft().result()  # re-raises a failed write
            bar.update(len(batch))
        while pending:
            pending.popleft().result()


def data_settings(pipe_args: argparse.Namespace, prompts: Sequence[str], steps: int, guidance: float,
                  seed: int) -> dict:
    """What determines the data: a rerun into the same folder must match it."""
    digest = hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode("utf-8")).hexdigest()
    teacher = os.path.basename(pipe_args.teacher) if pipe_args.teacher else None
    vae = default_vae_dtype(DTYPES[pipe_args.dtype])
    vae_dtype = pipe_args.vae_dtype or next(name for name, dtype in DTYPES.items() if dtype == vae)
    return dict(preset=pipe_args.preset, teacher=teacher, steps=steps, guidance=guidance, seed=seed,
                dtype=pipe_args.dtype, vae_dtype=vae_dtype, num_prompts=len(prompts), prompts_sha256=digest)


def check_settings(data_dir: str, settings: dict) -> None:
    """UserError if DATA_DIR holds data made with other settings (resuming into it would mix two datasets).
    A folder with no finished item on disk holds nothing to mix: its old settings are replaced, not enforced."""
    path = os.path.join(data_dir, MANIFEST_JSON)
    if not os.path.isfile(path) or not finished_items(data_dir, settings["num_prompts"]):
        return
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)["settings"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read the settings in {path} ({e}); fix or delete it") from None
    diff = [f"{k}={old.get(k)!r} (now {v!r})" for k, v in settings.items() if old.get(k) != v]
    if diff:
        raise UserError(f"{data_dir} was generated with other settings: {', '.join(diff)}; "
                        "use another --out or the original settings")


def write_summary_files(data_dir: str, prompts: Sequence[str], settings: dict) -> dict:
    """Rebuild captions.json (finished items only) and manifest.json from what is on disk; returns the manifest."""
    done = sorted(finished_items(data_dir, len(prompts)))
    atomic_write_json(os.path.join(data_dir, CAPTIONS_JSON),
                      {image_name(i, len(prompts)): prompts[i] for i in done})
    shapes = {}
    if done:
        shapes = {k: list(v) for k, v in LatentCaptionDataset(data_dir).shapes().items()}
        with Image.open(os.path.join(data_dir, IMAGES_DIR, image_name(done[0], len(prompts)))) as im:
            shapes["image"] = [3, im.height, im.width]
    manifest = dict(settings=settings, num_prompts=len(prompts), num_finished=len(done),
                    complete=len(done) == len(prompts), shapes=shapes,
                    stored_dtype=str(SHARD_DTYPE).removeprefix("torch."))
    atomic_write_json(os.path.join(data_dir, MANIFEST_JSON), manifest)
    return manifest


def get_prompts(args: argparse.Namespace, is_main: bool) -> list[str]:
    """The prompt list: sampled from --sample-from (written to --prompts by the main process), read from
    --prompts, or drawn from the preset's own prompt source (the shapes world)."""
    if args.sample_from:
        if not args.prompts:
            raise UserError("--sample-from needs --prompts FILE: the prompt list to write")
        prompts = sample_prompts(load_prompts(args.sample_from, args.field, skip_invalid=True), args.num,
                                 args.sample_seed)
        if is_main:
            atomic_write_json(args.prompts, prompts)
            print(f"wrote {len(prompts)} prompts sampled from {args.sample_from} (seed {args.sample_seed}) "
                  f"to {args.prompts}")
        return prompts
    return data_prompts(args.preset, args.prompts, args.num, args.sample_seed, args.field)


def data_prompts(preset: str, prompts_file: Optional[str], num: int, seed: int = 0, field: str = "Prompt") -> list[str]:
    """The prompts of --prompts FILE, else `num` of the preset's own prompts drawn from `seed` (the shapes world);
    UserError naming where to get a prompt list for a preset without its own."""
    if prompts_file:
        return load_prompts(prompts_file, field)
    prompt_source = get_preset(preset).prompt_source  # (num, seed) -> list[str]
    if prompt_source is None:
        raise UserError(NO_PROMPTS_HINT)
    return prompt_source(num, seed)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Generate the teacher's images, final latents and text embeddings for a prompt list "
                    "(resumable; multi-GPU with `accelerate launch`).",
        epilog="Errors (exit 2, naming the file): a missing or unreadable prompt file, an empty or non-string "
               "prompt in --prompts, a --out folder made with other settings, a corrupt latent shard. "
               "Skipped with a warning: empty or non-string entries of a --sample-from source; its duplicate "
               "prompts are removed before sampling.")
    parser.add_argument("--prompts", help=f"prompt list ({', '.join(PROMPT_FILE_FORMATS)}); with --sample-from, "
                        "the JSON list to write. Optional for presets with their own prompts (tiny)")
    parser.add_argument("--field", default="Prompt", help="column / JSON field holding the prompt, matched "
                        "case-insensitively when not exact (PartiPrompts: Prompt, JourneyDB: prompt)")
    parser.add_argument("--sample-from", metavar="SOURCE", help="build --prompts by sampling --num distinct "
                        "prompts from SOURCE (e.g. JourneyDB annotations .jsonl); then generate if --out is given")
    parser.add_argument("--num", type=int, default=5000, help="prompts to sample (--sample-from, preset prompts)")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the prompt sampling")
    parser.add_argument("--out", metavar="DATA_DIR", help="output folder (created; a rerun resumes)")
    add_pipeline_args(parser)  # --preset --teacher --vae --text-encoder --dtype --vae-dtype
    parser.add_argument("--steps", type=int, help="Heun steps (default: the preset's, 30)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the preset's, 5.0)")
    parser.add_argument("--seed", type=int, default=TEACHER_DATA_SEED, help="item i uses noise seed SEED + i")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", help="default: this rank's accelerator (cuda:LOCAL_RANK) or cpu")
    args = parser.parse_args(argv)
    preset = get_preset(args.preset)
    args.steps = preset.num_steps if args.steps is None else args.steps
    args.guidance = preset.guidance_scale if args.guidance is None else args.guidance
    if args.steps < 1 or args.batch_size < 1 or args.num < 1:
        raise UserError("--steps, --batch-size and --num must be >= 1")
    if not args.out and not args.sample_from:
        parser.error("--out is required (or --sample-from to only build a prompt list)")
    return args


def generate(pipe_args: argparse.Namespace, prompts: Sequence[str], data_dir: str, batch_size: int,
             steps: int, guidance: float, seed: int = TEACHER_DATA_SEED, device: Optional[str] = None) -> None:
    """Fill (or finish) DATA_DIR with the teacher data of `prompts`: item i from noise seed `seed` + i, `steps`
    guided Heun steps. pipe_args: the options of `add_pipeline_args` (--preset --teacher ...). Under `accelerate
    launch` every process takes its share of the batches; device: default this rank's accelerator or cpu."""
    state = PartialState(cpu=device == "cpu")  # rank, world size, device under `accelerate launch`
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise UserError(f"--out {data_dir} exists and is not a folder")
    device = torch.device(device) if device else state.device
    settings = data_settings(pipe_args, prompts, steps, guidance, seed)
    check_settings(data_dir, settings)
    done = finished_items(data_dir, len(prompts))
    todo = [i for i in range(len(prompts)) if i not in done]
    # every weight loads (a bad --teacher, VAE or text encoder fails here) before anything is written
    pipe = pipeline_from_args(pipe_args, device) if todo else None
    state.wait_for_everyone()  # every rank has listed the finished items before any rank writes
    if state.is_main_process:
        write_summary_files(data_dir, prompts, settings)  # records the settings for a resumed run
    batches = rank_batches(todo, batch_size, state.process_index, state.num_processes)

    t0, count = time.time(), sum(map(len, batches))
    if batches:
        generate_batches(pipe, prompts, batches, data_dir, steps, guidance, seed, show_progress=state.is_main_process)
    seconds = time.time() - t0
    print(f"rank {state.process_index}/{state.num_processes}: {count} images in {seconds:.1f} s "
          f"({count / max(seconds, 1e-9):.2f} img/s)", file=sys.stderr)
    state.wait_for_everyone()
    if state.is_main_process:
        manifest = write_summary_files(data_dir, prompts, settings)
        print(f"{data_dir}: {manifest['num_finished']}/{len(prompts)} items finished ({len(done)} were already "
              f"there), {steps} steps, guidance {guidance}, seed {seed}")


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    prompts = get_prompts(args, PartialState(cpu=args.device == "cpu").is_main_process)
    if args.out:
        generate(args, prompts, args.out, args.batch_size, args.steps, args.guidance, args.seed, args.device)


if __name__ == "__main__":
    run_cli(main)
