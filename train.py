"""Consistency distillation of a MicroDiT teacher into a 1-4 step student (CM/LCM, `cd_utils.cd_loss`).

    python train.py                                     # embedded default: the shapes world, ~7 min on 2 CPU cores
    python train.py --recipe seed                       # Euler teacher step, online target, pseudo-Huber c=0.001
    python train.py --preset microdit-xl-512 --teacher dit_4_channel_0.5B_synthetic_data.pt --data-dir data/teacher
    accelerate launch --num_processes 8 train.py --preset microdit-xl-512 --teacher ... --data-dir data/teacher
    python train.py --resume auto                       # continue from the last checkpoint in --out-dir

Data: the latent shards of `generate_data.py` (teacher latents + text embeddings: no VAE or text encoder in the
loop), or images + captions (encoded on the fly). An empty --data-dir is first filled by generate_data with the
preset's own prompts (the shapes world) or --prompts FILE.

Networks: the teacher (frozen), the student (initialised from the teacher, trained), the target network of
CDConfig (an EMA of the student with decay target_decay, or for target_decay = 0 the online student under
no_grad: no copy), and a slow EMA of the student (--ema) that is validated and exported, as the EMA weights of a
diffusion model are. With --ema 0 the online student is validated and exported.

Outputs in --out-dir: log.jsonl (one line per step), val/step_XXXXXX.png (rows = validation prompts, captioned;
columns = teacher at its 30 Heun steps | student at 1 | 2 | 4 steps, titled), val_metrics.jsonl, training_loss.png,
val_metrics.png, checkpoints/ckpt_XXXXXX.pt (the last --keep-ckpts), config.json, student_final.safetensors
(official DiT layout) and, for a w-conditioned student (--w-min/--w-max), guidance_embedder.safetensors.

Validation metrics (presets of the shapes world): prompt adherence of the student's images, shapes-FD to real
shapes images of the same captions (`fd_real`: how far from the data) and shapes-FD to the teacher's 30-step
images of the same prompts and seeds (`fd_teacher`: how far from the teacher); the teacher's own adherence and
fd_real are logged once as the reference.
"""
import argparse
import copy
import dataclasses
import functools
import io
import json
import math
import os
import random
import resource
import signal
import sys
import threading
import time
from contextlib import nullcontext
from typing import Any, Optional

import numpy as np
import torch
import torch.utils.checkpoint
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import save_file
from tqdm import tqdm

import generate_data
import shapes
from cd_utils import CDConfig, INDEX_DISTS, LOSSES, SOLVERS, WEIGHTINGS, cd_loss, ema_decay, ema_update
from dataset import CAPTIONS_CSV, CAPTIONS_JSON, MANIFEST_JSON, check_data_dir, get_dataloader, list_shards
from pipeline import Pipeline, add_pipeline_args, build_dit, get_preset, pipeline_from_args, teacher_path
from sampler import consistency_sample, generate_images, load_prompts, multistep_noise, to_uint8
from utils import (UserError, atomic_write, atomic_write_json, atomic_write_text, load_torch_file, run_cli,
                   save_grid, seed_everything)

try:  # optional
    from torch.utils.tensorboard import SummaryWriter
except ImportError:
    SummaryWriter = None

# Per-preset defaults; every key is also a flag (--data-dir, --steps, ...) that overrides it.
# batch_size is per process; the effective batch is batch_size x grad_accum x processes.
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    # 6.6 min on 2 CPU cores (measured): 512 teacher samples (30 Heun steps), 300 steps at batch 32, 4 validations.
    "tiny": dict(data_dir="data/tiny", out_dir="runs/cd-tiny", gen_num=512, gen_batch_size=64, steps=300,
                 batch_size=32, lr=1e-4, warmup=20, ema=0.99, val_every=100, val_samples=128, val_grid=8,
                 val_prompts=None, ckpt_every=100, num_workers=0),
    "tiny-random": dict(data_dir="data/tiny-random", out_dir="runs/cd-tiny-random", gen_num=64, gen_batch_size=16,
                        steps=50, batch_size=8, lr=1e-4, warmup=10, ema=0.99, val_every=25, val_samples=2,
                        val_grid=2, val_prompts=("a red circle on a blue background", "a photo of a cat"),
                        ckpt_every=25, num_workers=0),
    "microdit-xl-512": dict(data_dir="data/teacher", out_dir="runs/microdit-xl-512", gen_num=5000,
                            gen_batch_size=32, steps=10000, batch_size=32, lr=1e-5, warmup=500, ema=0.999,
                            val_every=500, val_samples=4, val_grid=4,
                            val_prompts=("a photograph of an astronaut riding a horse",
                                         "a bowl of ramen on a wooden table, studio lighting",
                                         "a watercolor painting of a lighthouse at sunset",
                                         "a red fox sitting in fresh snow, close-up"),
                            ckpt_every=1000, num_workers=4),
}
RECIPES = {"default": CDConfig, "seed": CDConfig.seed_recipe}
# CDConfig field -> (flag, help); unset flags keep the --recipe's value. guidance_range is --w-min/--w-max.
CD_FLAGS = {
    "num_scales": ("--num-scales", "N: Karras points between sigma_min and sigma_max (the CD discretisation)"),
    "skip": ("--skip", "k >= 1: one teacher step spans k intervals (LCM's skipping step)"),
    "solver": ("--solver", "teacher ODE solver: heun (2 guided calls) or euler (1)"),
    "target_decay": ("--target-decay", "mu of the EMA target network; 0: the online student under no_grad"),
    "loss": ("--loss", "consistency distance (pseudo_huber: iCT, on the whole sample; _elementwise: LCM)"),
    "huber_c": ("--huber-c", "pseudo-Huber c (unset: 0.00054 sqrt(dim) for pseudo_huber, 0.001 elementwise)"),
    "weighting": ("--weighting", "lambda(sigma_n): uniform or inverse_gap = 1 / (sigma_{n+k} - sigma_n)"),
    "index_dist": ("--index-dist", "distribution of the index n: uniform or lognormal (iCT)"),
    "p_mean": ("--p-mean", "lognormal index distribution: mean of ln sigma"),
    "p_std": ("--p-std", "lognormal index distribution: std of ln sigma"),
    "guidance": ("--w", "the teacher's classifier-free guidance scale w (also the validation w)"),
}
CD_CHOICES = {"solver": SOLVERS, "loss": LOSSES, "weighting": WEIGHTINGS, "index_dist": INDEX_DISTS}
VAL_STUDENT_STEPS = (1, 2, 4)
CKPT_DIR, VAL_DIR = "checkpoints", "val"
LOG_FILE, VAL_LOG_FILE = "log.jsonl", "val_metrics.jsonl"
STUDENT_FILE, GUIDANCE_FILE = "student_final.safetensors", "guidance_embedder.safetensors"
GUIDANCE_PREFIX = "guidance_embedder."


# ----------------------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Parse the command line and fill unset options from PRESET_DEFAULTS[--preset]."""
    def per_preset(key: str) -> str:
        return "default per preset: " + ", ".join(f"{p} {d[key]}" for p, d in PRESET_DEFAULTS.items())

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_args(parser)  # --preset --teacher --vae --text-encoder --dtype (the teacher's) --vae-dtype
    parser.set_defaults(preset="tiny")  # the embedded default (add_pipeline_args defaults to the real teacher)
    g = parser.add_argument_group("data")
    g.add_argument("--data-dir", help=f"teacher data (latent shards) or images + captions; {per_preset('data_dir')}")
    g.add_argument("--prompts", help="prompt file for generating the teacher data when --data-dir is empty "
                                     "(default: the preset's own prompts; the shapes world has them)")
    g.add_argument("--gen-num", type=int, help=f"teacher samples to generate from the preset's prompts; "
                                                f"{per_preset('gen_num')}")
    g.add_argument("--gen-batch-size", type=int, help=f"teacher data generation batch; {per_preset('gen_batch_size')}")
    g.add_argument("--num-workers", type=int, help=f"DataLoader workers per process; {per_preset('num_workers')}")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help=f"optimizer steps; {per_preset('steps')}")
    g.add_argument("--batch-size", type=int, help=f"samples per process per micro-step; {per_preset('batch_size')}")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (default %(default)s)")
    g.add_argument("--lr", type=float, help=f"AdamW learning rate after warm-up; {per_preset('lr')}")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="after the linear warm-up: constant, or cosine decay to 0 at --steps")
    g.add_argument("--warmup", type=int, help=f"linear learning-rate warm-up steps; {per_preset('warmup')}")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default %(default)s)")
    g.add_argument("--grad-clip", type=float, default=1.0,
                   help="clip the gradient norm to this, 0: no clipping (default %(default)s)")
    g.add_argument("--ema", type=float, help="decay of the slow EMA that is validated and exported, warmed up as "
                   f"min(ema, (1+step)/(10+step)); 0: none, use the online student; {per_preset('ema')}")
    g.add_argument("--seed", type=int, default=0, help="seed of the data order, the CD noise (per rank: (seed, "
                   "rank)) and a new guidance embedder (default %(default)s)")
    g = parser.add_argument_group("consistency distillation (CDConfig)")
    g.add_argument("--recipe", choices=list(RECIPES), default="default",
                   help="default: CDConfig() as cd_utils defines it; seed: CDConfig.seed_recipe() (one Euler "
                        "teacher step between adjacent Karras points, online target, pseudo-Huber c = 0.001). Each "
                        "flag below lists both recipes' values")
    default_cfg, seed_cfg = CDConfig(), CDConfig.seed_recipe()
    for field in dataclasses.fields(CDConfig):
        if field.name == "guidance_range":
            continue
        flag, text = CD_FLAGS[field.name]
        d, s = getattr(default_cfg, field.name), getattr(seed_cfg, field.name)
        g.add_argument(flag, dest=field.name, type=float if d is None else type(d), choices=CD_CHOICES.get(field.name),
                       metavar=None if field.name in CD_CHOICES else flag[2:].upper().replace("-", "_"),
                       help=f"{text} [default recipe: {d}; seed recipe: {s}]")
    g.add_argument("--w-min", type=float, help="with --w-max: w ~ U[w-min, w-max] per sample and a w-conditioned "
                   f"student (a zero-initialised guidance embedder, saved as {GUIDANCE_FILE})")
    g.add_argument("--w-max", type=float, help="see --w-min")
    g = parser.add_argument_group("validation, checkpoints, outputs")
    g.add_argument("--out-dir", help=f"outputs; {per_preset('out_dir')}")
    g.add_argument("--val-every", type=int, help=f"validate every this many steps (0: only at the end); "
                                                 f"{per_preset('val_every')}")
    g.add_argument("--val-samples", type=int, help="validation samples (prompt, seed) for the metrics; "
                                                   f"{per_preset('val_samples')}")
    g.add_argument("--val-grid", type=int, help=f"validation prompts shown in the grid; {per_preset('val_grid')}")
    g.add_argument("--val-prompts", help="validation prompt file (default: the shapes world's held-out captions, "
                                         "or a few built-in prompts); cycled over --val-samples")
    g.add_argument("--val-seed", type=int, default=1000, help="validation noise seeds val-seed + i and the shapes "
                                                              "world's caption stream (default %(default)s)")
    g.add_argument("--ckpt-every", type=int, help=f"checkpoint every this many steps (0: only at the end); "
                                                  f"{per_preset('ckpt_every')}")
    g.add_argument("--keep-ckpts", type=int, default=2,
                   help="keep the last this many checkpoints (default %(default)s)")
    g.add_argument("--resume", help="'auto': the last checkpoint in --out-dir (start fresh if none), or a "
                                    "checkpoint PATH; the run continues exactly as if uninterrupted")
    g = parser.add_argument_group("speed and memory")
    g.add_argument("--precision", choices=("bf16", "fp32"), help="bf16 autocast around the networks (weights "
                   "stay fp32); default: bf16 on CUDA, fp32 on the CPU")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute the student's transformer blocks "
                   "in the backward pass (less memory, ~30%% more student compute)")
    g.add_argument("--compile", action="store_true", help="torch.compile the student, target and teacher")
    g.add_argument("--cpu", action="store_true", help="train on the CPU even if CUDA is available")
    args = parser.parse_args(argv)

    preset = get_preset(args.preset)
    if preset.name not in PRESET_DEFAULTS:
        raise UserError(f"train.py has no defaults for preset {preset.name}; add it to PRESET_DEFAULTS")
    for key, value in PRESET_DEFAULTS[preset.name].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    problems = [f"--{k.replace('_', '-')} must be >= 1" for k in ("steps", "batch_size", "grad_accum", "keep_ckpts",
                                                                  "val_samples", "gen_num", "gen_batch_size")
                if getattr(args, k) < 1]
    problems += [f"{flag} must be {rule}" for flag, ok, rule in (
        ("--lr", args.lr > 0, "> 0"), ("--ema", 0 <= args.ema < 1, "in [0, 1)"), ("--warmup", args.warmup >= 0, ">= 0"),
        ("--num-workers", args.num_workers >= 0, ">= 0")) if not ok]
    if problems:
        raise UserError("; ".join(problems))
    args.val_grid = min(args.val_grid, args.val_samples)
    return args


def cd_config_from_args(args: argparse.Namespace) -> CDConfig:
    """The --recipe's CDConfig with every CD flag that was given (--w-min/--w-max: guidance_range)."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(CDConfig)
                 if f.name != "guidance_range" and getattr(args, f.name) is not None}
    if (args.w_min is None) != (args.w_max is None):
        raise UserError("--w-min and --w-max go together")
    if args.w_min is not None:
        overrides["guidance_range"] = (args.w_min, args.w_max)
    return RECIPES[args.recipe](**overrides)


# ----------------------------------------------------------------------------------------------------------------
# Data

def needs_teacher_data(data_dir: str) -> bool:
    """True if DATA_DIR has neither latent shards nor captioned images, or holds an unfinished generate_data run."""
    manifest = os.path.join(data_dir, MANIFEST_JSON)
    if os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as f:
            return not json.load(f).get("complete", True)
    has_captions = any(os.path.isfile(os.path.join(data_dir, n)) for n in (CAPTIONS_JSON, CAPTIONS_CSV))
    return not list_shards(data_dir) and not has_captions


def ensure_teacher_data(args: argparse.Namespace, device: torch.device) -> None:
    """Fill (or finish) --data-dir with teacher data through generate_data (every process takes its share)."""
    if not any(gather_object([needs_teacher_data(args.data_dir)])):  # collective: all ranks decide alike
        return
    argv = ["--preset", args.preset, "--out", args.data_dir, "--batch-size", str(args.gen_batch_size),
            "--device", str(device), "--dtype", args.dtype]
    argv += ["--prompts", args.prompts] if args.prompts else ["--num", str(args.gen_num)]
    for flag, value in (("--teacher", args.teacher), ("--vae", args.vae), ("--text-encoder", args.text_encoder),
                        ("--vae-dtype", args.vae_dtype)):
        argv += [flag, value] if value else []
    print(f"no teacher data in {args.data_dir}: generating it (python generate_data.py {' '.join(argv)})")
    generate_data.main(argv)


def model_inputs(batch: dict, pipe: Pipeline, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A data batch -> (x0 (B, C, h, w), y (B, 1, 77, D)) float32 on `device`; images + captions are encoded."""
    if "latents" in batch:
        return (batch["latents"].to(device, torch.float32, non_blocking=True),
                batch["embeddings"].to(device, torch.float32, non_blocking=True))
    with torch.no_grad():
        return pipe.codec.encode(batch["image"].to(device)).float(), pipe.encode_prompts(batch["caption"])


# ----------------------------------------------------------------------------------------------------------------
# Networks and optimisation

def enable_grad_checkpointing(dit: torch.nn.Module) -> None:
    """Recompute every transformer block (patch mixer and backbone) in the backward pass (torch.utils.checkpoint)."""
    blocks = list(dit.blocks) + (list(dit.patch_mixer) if dit.use_patch_mixer else [])
    for block in blocks:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).eval().requires_grad_(False)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Learning-rate multiplier of optimizer step `step` (0-based): linear warm-up, then constant or cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def teacher_calls(cd: CDConfig) -> int:
    """Teacher network passes per sample per step: 2 (Heun) or 1 (Euler) calls, x2 for the cfg branches."""
    guided = cd.guidance_range is not None or cd.guidance != 1.0
    return (2 if cd.solver == "heun" else 1) * (2 if guided else 1)


def loss_generator(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """The CD noise generator of one rank, seeded from (seed, rank)."""
    state = int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0])
    return torch.Generator(device).manual_seed(state)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints

def rng_state(gen: torch.Generator) -> bytes:
    """This process's random states (Python, NumPy, torch CPU and CUDA, the CD loss generator), serialised with
    torch.save: plain bytes are what ranks can exchange (`gather_object` cannot pickle tensors here)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
             "torch": torch.get_rng_state(), "loss": gen.get_state(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def read_rng_state(blob: torch.Tensor) -> dict:
    """A checkpoint's per-rank RNG entry (uint8 tensor of `rng_state` bytes) -> the dict of states."""
    return torch.load(io.BytesIO(blob.numpy().tobytes()), weights_only=True)


def set_rng_state(blob: torch.Tensor, gen: torch.Generator) -> None:
    state = read_rng_state(blob)
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    gen.set_state(state["loss"])


def checkpoint_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, CKPT_DIR, f"ckpt_{step:06d}.pt")


def list_checkpoints(out_dir: str) -> list[str]:
    """Checkpoint paths in OUT_DIR/checkpoints, oldest first."""
    folder = os.path.join(out_dir, CKPT_DIR)
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.startswith("ckpt_") and n.endswith(".pt"))


def save_checkpoint(path: str, state: dict, keep: int) -> None:
    """Write `state` atomically, then delete all but the newest `keep` checkpoints."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    for old in list_checkpoints(os.path.dirname(os.path.dirname(path)))[:-keep]:
        os.remove(old)


def resolve_resume(args: argparse.Namespace) -> Optional[str]:
    """The checkpoint to resume from, or None for a fresh run (which must not clobber existing checkpoints)."""
    existing = list_checkpoints(args.out_dir)
    if args.resume is None:
        if existing:
            raise UserError(f"{args.out_dir} already has checkpoints: pass --resume auto to continue them, or "
                            "choose another --out-dir")
        return None
    if args.resume == "auto":
        return existing[-1] if existing else None
    if not os.path.isfile(args.resume):
        raise UserError(f"checkpoint not found: {args.resume}")
    return args.resume


def export_student(out_dir: str, model: torch.nn.Module, metadata: dict[str, str]) -> tuple[str, Optional[str]]:
    """student_final.safetensors in the official DiT layout (fp32) and, if present, guidance_embedder.safetensors."""
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    student_path = os.path.join(out_dir, STUDENT_FILE)
    official = {k: v for k, v in state.items() if not k.startswith(GUIDANCE_PREFIX)}
    atomic_write(student_path, lambda tmp: save_file(official, tmp, metadata=metadata))
    guidance = {k: v for k, v in state.items() if k.startswith(GUIDANCE_PREFIX)}
    if not guidance:
        return student_path, None
    guidance_path = os.path.join(out_dir, GUIDANCE_FILE)
    atomic_write(guidance_path, lambda tmp: save_file(guidance, tmp, metadata=metadata))
    return student_path, guidance_path


# ----------------------------------------------------------------------------------------------------------------
# Validation and plots

class Validator:
    """Fixed validation prompts and seeds: the teacher's images (its own sampler, rendered once and cached in
    OUT_DIR/val/teacher.pt), the student's at VAL_STUDENT_STEPS, one grid PNG per call and, for the shapes world,
    metrics (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, pipe: Pipeline, cd: CDConfig):
        self.pipe, self.guidance, self.batch_size = pipe, cd.guidance, args.batch_size
        self.w_conditioned = cd.guidance_range is not None
        self.folder, self.grid = os.path.join(args.out_dir, VAL_DIR), args.val_grid
        n = args.val_samples
        self.seeds = [args.val_seed + i for i in range(n)]
        self.real = None
        if pipe.preset.shapes_world and not args.val_prompts:
            real, attrs = shapes.sample(n, args.val_seed)
            self.prompts, self.real = shapes.captions(attrs), (real + 1) / 2
        else:
            # a prompt file from --val-prompts, or the preset's built-in prompts (PRESET_DEFAULTS)
            prompts = load_prompts(args.val_prompts) if isinstance(args.val_prompts, str) else list(args.val_prompts)
            self.prompts = [prompts[i % len(prompts)] for i in range(n)]
        self.metrics = self.real is not None and os.path.isfile(shapes.DEFAULT_CLASSIFIER)
        if self.real is not None and not self.metrics:
            print(f"warning: no shapes classifier at {shapes.DEFAULT_CLASSIFIER}: validation metrics skipped "
                  "(python shapes.py train-classifier)", file=sys.stderr)
        self.teacher_images = self.render_teacher(args)
        self.teacher_metrics = {}
        if self.metrics:  # classifier features of the fixed sets, computed once for every validation
            self.real_features = shapes.shapes_features(self.real)
            self.teacher_features = shapes.shapes_features(self.teacher_images)
            self.teacher_metrics = {
                "adherence": shapes.prompt_adherence(self.teacher_images, self.prompts),
                "fd_real": shapes.frechet_distance(self.teacher_features, self.real_features)}

    def render_teacher(self, args: argparse.Namespace) -> torch.Tensor:
        """The teacher's images of the validation set, (N, 3, H, W) in [0, 1], from the cache if it matches."""
        teacher = teacher_path(self.pipe.preset, args.teacher)
        stat = os.stat(teacher) if teacher else None  # a retrained teacher at the same path invalidates the cache
        key = dict(preset=args.preset, teacher=teacher, teacher_file=(stat.st_size, stat.st_mtime_ns) if stat else None,
                   dtype=args.dtype, prompts=self.prompts, seeds=self.seeds, steps=self.pipe.preset.num_steps,
                   guidance=self.guidance)
        path = os.path.join(self.folder, "teacher.pt")
        if os.path.isfile(path):
            try:
                cached = load_torch_file(path, "validation cache")
            except UserError:
                cached = {}  # a damaged cache is rendered again
            if cached.get("key") == key:
                return cached["images"]
        print(f"rendering the teacher's validation images ({len(self.prompts)} at {key['steps']} steps, "
              f"guidance {self.guidance}) once")
        images = generate_images(self.pipe, self.prompts, self.seeds, key["steps"], self.guidance,
                                 self.batch_size)["images"]
        atomic_write(path, lambda tmp: torch.save(dict(key=key, images=images), tmp))
        return images

    @torch.no_grad()
    def __call__(self, step: int, student: torch.nn.Module) -> dict[str, float]:
        """Render the student at each of VAL_STUDENT_STEPS, write val/step_XXXXXX.png; returns the metrics."""
        steps = self.pipe.preset.num_steps
        columns, metrics = [(f"teacher\n{steps} steps", to_uint8(self.teacher_images[:self.grid]))], {}
        for k in VAL_STUDENT_STEPS:
            def sample_fn(noise: torch.Tensor, y: torch.Tensor, seeds: list[int]) -> torch.Tensor:
                return consistency_sample(student, noise, y, num_steps=k, edm_config=self.pipe.edm_config,
                                          guidance=self.guidance if self.w_conditioned else None,
                                          step_noise=multistep_noise(seeds, k, noise.shape[1:]))

            images = generate_images(self.pipe, self.prompts, self.seeds, batch_size=self.batch_size,
                                     sample_fn=sample_fn)["images"]
            columns.append((f"student\n{k} step{'s' if k > 1 else ''}", to_uint8(images[:self.grid])))
            if self.metrics:
                features = shapes.shapes_features(images)
                metrics[f"adherence/{k}"] = shapes.prompt_adherence(images, self.prompts)
                metrics[f"fd_real/{k}"] = shapes.frechet_distance(features, self.real_features)
                metrics[f"fd_teacher/{k}"] = shapes.frechet_distance(features, self.teacher_features)
        metrics.update({f"{name}/teacher": v for name, v in self.teacher_metrics.items()})
        save_grid(os.path.join(self.folder, f"step_{step:06d}.png"), columns, self.prompts)
        return metrics


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_jsonl(path: str, step: int) -> None:
    """Drop the records after `step` (written after the checkpoint a run resumes from)."""
    if os.path.isfile(path):
        kept = [r for r in read_jsonl(path) if r["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_curves(out_dir: str) -> None:
    """training_loss.png (raw and smoothed loss) and val_metrics.png (one panel per metric) from the logs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name: str) -> None:
        fig.tight_layout()
        atomic_write(os.path.join(out_dir, name), lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        plt.close(fig)

    log = read_jsonl(os.path.join(out_dir, LOG_FILE))
    if log:
        steps, loss = np.array([r["step"] for r in log]), np.array([r["loss"] for r in log])
        alpha, smooth, s = 2 / (1 + min(100, max(2, len(loss) // 10))), [], loss[0]
        for v in loss:
            s = (1 - alpha) * s + alpha * v
            smooth.append(s)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, loss, alpha=0.3, label="loss")
        ax.plot(steps, smooth, label="smoothed")
        ax.set(xlabel="step", ylabel="CD loss", yscale="log" if (loss > 0).all() else "linear")
        ax.legend()
        save(fig, "training_loss.png")
    val = read_jsonl(os.path.join(out_dir, VAL_LOG_FILE))
    names = sorted({k.split("/")[0] for r in val for k in r if "/" in k})
    if names:
        fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.8), squeeze=False)
        for ax, name in zip(axes[0], names):
            for k in VAL_STUDENT_STEPS:
                points = [(r["step"], r[f"{name}/{k}"]) for r in val if f"{name}/{k}" in r]
                ax.plot(*zip(*points), marker="o", label=f"student {k} step{'s' * (k > 1)}")
            teacher = [r[f"{name}/teacher"] for r in val if f"{name}/teacher" in r]
            if teacher:
                ax.axhline(teacher[-1], color="k", ls="--", label="teacher")
            ax.set(title=name, xlabel="step")
            ax.legend(fontsize=8)
        save(fig, "val_metrics.png")


# ----------------------------------------------------------------------------------------------------------------
# Training

class StopRequest:
    """SIGINT (Ctrl-C) / SIGTERM during training: finish the current step, write a checkpoint and stop. A second
    signal interrupts at once. Only installable from the main thread; elsewhere a no-op."""

    def __init__(self):
        self.requested, self.previous = False, {}

    def handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
              "(again to stop at once)", file=sys.stderr)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident memory on the CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Distil the student as `args` (from `parse_args`) say; returns the final step, metrics and output paths."""
    cd = cd_config_from_args(args)
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available(), mixed_precision="no")
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main_process = accelerator.is_main_process
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")
    resume_from = resolve_resume(args)

    ensure_teacher_data(args, device)
    accelerator.wait_for_everyone()
    preset = get_preset(args.preset)  # the data is read through before the teacher's validation images are made
    check_data_dir(args.data_dir, preset.latent_shape, preset.dit_kwargs["caption_channels"])
    pipe = pipeline_from_args(args, device)  # the frozen teacher (in --dtype), text encoder and codec
    seed_everything(args.seed)
    student = build_dit(pipe.preset, args.teacher)  # fp32, from the teacher's checkpoint
    if cd.guidance_range is not None:
        student.add_guidance_embedder()
    student.to(device).train()
    target = frozen_copy(student) if cd.target_decay > 0 else None
    ema = frozen_copy(student) if args.ema > 0 else None
    if args.grad_checkpointing:
        enable_grad_checkpointing(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, args.warmup, args.steps, args.lr_schedule))
    gen = loss_generator(args.seed, rank, device)

    step = 0
    if resume_from:
        ckpt = load_torch_file(resume_from, "checkpoint")
        if ckpt["world_size"] != world:
            raise UserError(f"{resume_from} was written by {ckpt['world_size']} processes; resume it with as many "
                            f"(now {world}) to continue the same data and noise streams")
        student.load_state_dict(ckpt["student"])
        for module, key in ((target, "target"), (ema, "ema")):
            if module is not None:
                if ckpt[key] is None:
                    raise UserError(f"{resume_from} has no {key} network: resume with the same --target-decay/--ema")
                module.load_state_dict(ckpt[key])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, rng_blob = ckpt["step"], ckpt["rng"][rank]
        del ckpt

    model = accelerator.prepare_model(student)  # DistributedDataParallel over several processes
    teacher_fwd, target_fwd = pipe.dit, (target if target is not None else student)
    if args.compile:
        model, teacher_fwd, target_fwd = torch.compile(model), torch.compile(teacher_fwd), torch.compile(target_fwd)
    loader = get_dataloader(args.data_dir, args.batch_size, seed=args.seed, rank=rank, world_size=world,
                            start_index=step * args.batch_size * args.grad_accum, num_workers=args.num_workers,
                            resolution=pipe.image_size)
    batches = iter(loader)  # draws from the global torch RNG: restore the checkpoint's states after it
    if resume_from:
        set_rng_state(rng_blob, gen)

    log_path, val_log_path = os.path.join(args.out_dir, LOG_FILE), os.path.join(args.out_dir, VAL_LOG_FILE)
    effective = args.batch_size * args.grad_accum * world
    validator, writer, log = None, None, None
    if main_process:
        os.makedirs(args.out_dir, exist_ok=True)
        truncate_jsonl(log_path, step)
        truncate_jsonl(val_log_path, step)
        atomic_write_json(os.path.join(args.out_dir, "config.json"),
                          dict(args=vars(args), cd=dataclasses.asdict(cd), world_size=world, command=sys.argv))
        n_params = sum(p.numel() for p in student.parameters())
        t_calls = teacher_calls(cd)
        print(f"preset {args.preset}: student {n_params / 1e6:.2f}M parameters, {len(loader.dataset)} training "
              f"items in {args.data_dir}; {device}, {world} process(es), {precision}")
        print(f"steps {step} -> {args.steps}: batch {args.batch_size} x grad-accum {args.grad_accum} x {world} = "
              f"{effective} samples/step, lr {args.lr} ({args.warmup} warm-up, {args.lr_schedule}); recipe "
              f"{args.recipe}: {cd}")
        print(f"cost per sample and step, in network passes: teacher {t_calls} ({cd.solver}: "
              f"{2 if cd.solver == 'heun' else 1} call(s){' x cond+uncond' if t_calls % 2 == 0 else ''}) + target 1 "
              f"+ student forward+backward ~3 = ~{t_calls + 4} forward passes")
        validator = Validator(args, pipe, cd)
        writer = SummaryWriter(args.out_dir) if SummaryWriter else None
        log = open(log_path, "a", encoding="utf-8")

    def validate() -> dict:
        metrics = {}
        if main_process:
            metrics = validator(step, ema if ema is not None else student)
            with open(val_log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            for k, v in metrics.items():
                if writer:
                    writer.add_scalar(f"val/{k}", v, step)
            plot_curves(args.out_dir)
            shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
            tqdm.write(f"step {step}: validation grid {VAL_DIR}/step_{step:06d}.png{'; ' + shown if shown else ''}")
        accelerator.wait_for_everyone()
        return metrics

    def checkpoint() -> str:
        path = checkpoint_path(args.out_dir, step)
        rngs = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in gather_object([rng_state(gen)])]
        if main_process:
            state = dict(step=step, world_size=world, samples_per_rank=step * args.batch_size * args.grad_accum,
                         student=student.state_dict(), target=target.state_dict() if target is not None else None,
                         ema=ema.state_dict() if ema is not None else None, optimizer=optimizer.state_dict(),
                         scheduler=scheduler.state_dict(), rng=rngs, cd=dataclasses.asdict(cd))
            save_checkpoint(path, state, args.keep_ckpts)
        accelerator.wait_for_everyone()
        return path

    last_ckpt, val_metrics = resume_from, {}
    bar = tqdm(total=args.steps, initial=step, unit="step", disable=not main_process, dynamic_ncols=True)
    step_times, loss, interrupted = [], float("nan"), False
    try:
        if step == 0 and args.val_every > 0:
            val_metrics = validate()  # the teacher as a few-step sampler: the student's starting point
        with StopRequest() as stop:
            while step < args.steps:
                t0 = time.time()
                stats = dict.fromkeys(("loss", "sigma", "gap", "w"), 0.0)
                for micro in range(args.grad_accum):
                    x0, y = model_inputs(next(batches), pipe, device)
                    sync = accelerator.no_sync(model) if micro < args.grad_accum - 1 else nullcontext()
                    with sync:
                        with autocast:
                            micro_loss, micro_stats = cd_loss(model, target_fwd, teacher_fwd, x0, y, cd,
                                                              pipe.edm_config, gen)
                        accelerator.backward(micro_loss / args.grad_accum)
                    micro_stats["loss"] = micro_loss.item()  # the loss that was backpropagated
                    for k in stats:
                        stats[k] += micro_stats[k] / args.grad_accum
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    student.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf")).item()
                # one all-reduce: the mean loss over ranks and whether any rank was asked to stop
                reduced = accelerator.reduce(torch.tensor([stats["loss"], float(stop.requested)], device=device))
                loss, stop_now = reduced[0].item() / world, reduced[1].item() > 0
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                    raise UserError(f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step + 1}; "
                                    f"stopped before updating the weights ({where}); try a lower --lr or "
                                    "another --loss/--weighting")
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if target is not None:
                    ema_update(target, student, cd.target_decay)
                if ema is not None:
                    ema_update(ema, student, ema_decay(args.ema, step))
                step += 1
                dt = time.time() - t0
                step_times.append(dt)
                if main_process:
                    record = dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, samples_per_s=effective / dt,
                                  peak_mem_gb=peak_memory_gb(device), sigma=stats["sigma"], gap=stats["gap"],
                                  w=stats["w"], time=time.time())
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    for k in ("loss", "lr", "grad_norm", "samples_per_s", "gap"):
                        if writer:
                            writer.add_scalar(f"train/{k}", record[k], step)
                    bar.set_postfix(loss=f"{loss:.4g}", gnorm=f"{grad_norm:.3g}")
                    bar.update(1)
                if args.val_every > 0 and step % args.val_every == 0:
                    val_metrics = validate()
                if stop_now or (args.ckpt_every > 0 and step % args.ckpt_every == 0):
                    last_ckpt = checkpoint()
                if stop_now:
                    interrupted = True
                    tqdm.write(f"stopped at step {step}: wrote {last_ckpt}; continue with --resume auto")
                    break
    except torch.OutOfMemoryError:
        raise UserError(f"CUDA out of memory at --batch-size {args.batch_size}: try a smaller --batch-size with a "
                        "larger --grad-accum, --grad-checkpointing, or --dtype bf16 for the teacher") from None
    finally:
        bar.close()
        if log is not None:
            log.close()

    result = dict(step=step, interrupted=interrupted, checkpoint=last_ckpt, out_dir=args.out_dir, loss=loss,
                  val=val_metrics, log=log_path, student=None, guidance_embedder=None,
                  sec_per_step=float(np.mean(step_times)) if step_times else None)
    result["samples_per_s"] = effective / result["sec_per_step"] if step_times else None
    if interrupted:
        return result
    if not last_ckpt or not last_ckpt.endswith(f"ckpt_{step:06d}.pt"):
        last_ckpt = result["checkpoint"] = checkpoint()
    if args.val_every <= 0 or step % args.val_every != 0:
        result["val"] = validate()
    if main_process:
        meta = {"preset": args.preset, "step": str(step), "recipe": args.recipe,
                "cd": json.dumps(dataclasses.asdict(cd)), "weights": "slow EMA" if ema is not None else "student"}
        result["student"], result["guidance_embedder"] = export_student(args.out_dir, ema if ema is not None
                                                                        else student, meta)
        plot_curves(args.out_dir)
        if writer:
            writer.close()
        timing = (f"{result['sec_per_step']:.2f} s/step, {result['samples_per_s']:.1f} samples/s"
                  if step_times else "no steps run")
        print(f"done: step {step}, loss {loss:.4g}, {timing}; wrote {result['student']}"
              + (f" and {result['guidance_embedder']}" if result["guidance_embedder"] else ""))
        val = result["val"] or {}
        if "adherence/teacher" in val:
            print(f"adherence on {args.val_samples} validation captions: teacher {val['adherence/teacher']:.3f}"
                  + "".join(f", student {k} step{'s' if k > 1 else ''} {val[f'adherence/{k}']:.3f}"
                            for k in VAL_STUDENT_STEPS))
        print(f"pictures: {os.path.join(args.out_dir, VAL_DIR, f'step_{step:06d}.png')} (teacher | student "
              f"{' | '.join(map(str, VAL_STUDENT_STEPS))} steps); curves: {os.path.join(args.out_dir, 'val_metrics.png')}"
              f", {os.path.join(args.out_dir, 'training_loss.png')}")
    accelerator.wait_for_everyone()
    return result


def main() -> None:
    result = train(parse_args())
    if result["interrupted"]:
        sys.exit(130)


if __name__ == "__main__":
    run_cli(main)
