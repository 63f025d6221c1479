"""Consistency distillation of a MicroDiT teacher into a 1-4 step student (CM/LCM, `cd_utils.cd_loss`).

    python train.py                                     # embedded default: the shapes world, ~5 min on 2 CPU cores
    python train.py --recipe seed                       # Euler teacher step, online target, pseudo-Huber c=0.001
    python train.py --recipe one-step                   # CD + distribution matching (DMD2) of the 1-step samples
    python train.py --preset microdit-xl-512 --teacher dit_4_channel_0.5B_synthetic_data.pt --data-dir data/teacher
    accelerate launch --num_processes 8 train.py --preset microdit-xl-512 --teacher ... --data-dir data/teacher
    python train.py --resume auto                       # continue from the last checkpoint in --out-dir
    python train.py --preset microdit-xl-512 --lora-rank 32 --dtype bf16 --grad-checkpointing --batch-size 4 ...

Data: the latent shards of `generate_data.py` (teacher latents + text embeddings: no VAE or text encoder in the
loop), or images + captions (encoded on the fly). An empty --data-dir is first filled by generate_data with the
preset's own prompts (the shapes world) or --prompts FILE.

Networks: the teacher (frozen), the student (initialised from the teacher, trained), the target network of
CDConfig (an EMA of the student with decay target_decay, or for target_decay = 0 the online student under
no_grad: no copy), and a slow EMA of the student (--ema) that is validated and exported, as the EMA weights of a
diffusion model are. With --ema 0 the online student is validated and exported. With --lora-rank R the student,
the target and the slow EMA are LoRA adapters (`lora.py`) on the teacher's own DiT, held once in --dtype: for a
16-24 GB GPU (memory: README).

Outputs in --out-dir: log.jsonl (one line per step), val/step_XXXXXX.png (rows = validation prompts, captioned;
columns = teacher at its 30 Heun steps | student at 1 | 2 | 4 steps, titled), val_metrics.jsonl (`validation.py`:
on the shapes world, `shapes.score` of the teacher and of the student at each step count), training_loss.png,
val_metrics.png, checkpoints/ckpt_XXXXXX.pt (the last --keep-ckpts), config.json, student_final.safetensors
(official DiT layout) and, for a w-conditioned student (--w-min/--w-max), guidance_embedder.safetensors; a LoRA
student's student_final.safetensors is merged into the teacher's weights and student_lora.safetensors holds the
adapter alone (both load with benchmark.py --student).
"""
import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import resource
import sys
import time
from contextlib import nullcontext
from typing import Any, Optional

import numpy as np
import torch
import torch.utils.checkpoint
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm import tqdm

import generate_data
import microdit
from cd_utils import INDEX_DISTS, LOSSES, SEED_RECIPE, SOLVERS, WEIGHTINGS, CDConfig, cd_loss, curriculum_scales, \
    dmd_losses, ema_decay, ema_update, teacher_calls
from dataset import CAPTIONS_CSV, CAPTIONS_JSON, MANIFEST_JSON, check_data_dir, get_dataloader, list_shards
from lora import LORA_TARGETS, add_adapters
from pipeline import DTYPES, GUIDANCE_FILE, Pipeline, add_pipeline_args, build_dit, get_preset, merge_lora, \
    pipeline_from_args, save_lora, save_student, teacher_path
from utils import (StopRequest, UserError, append_jsonl, atomic_write, atomic_write_json, first_line, load_torch_file,
                   rng_state, run_cli, seed_everything, set_rng_state, truncate_jsonl)
from validation import LOG_FILE, VAL_DIR, VAL_LOG_FILE, VAL_STUDENT_STEPS, Validator, plot_curves, steps_label, \
    validation_prompts

try:  # optional
    from torch.utils.tensorboard import SummaryWriter
except ImportError:
    SummaryWriter = None

# Per-preset defaults of the flags below (--out-dir defaults to the preset's run_dir). batch_size is per process;
# the effective batch is batch_size x grad_accum x processes. Run times: BENCHMARKS.md.
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": dict(data_dir="data/tiny", gen_num=512, gen_batch_size=64, steps=300, batch_size=32, lr=1e-4, warmup=20,
                 ema=0.99, val_every=100, val_samples=128, val_grid=8, val_prompts=None, ckpt_every=100,
                 num_workers=0),
    "tiny-random": dict(data_dir="data/tiny-random", gen_num=64, gen_batch_size=16, steps=50, batch_size=8, lr=1e-4,
                        warmup=10, ema=0.99, val_every=25, val_samples=2, val_grid=2,
                        val_prompts=("a red circle on a blue background", "a photo of a cat"), ckpt_every=25,
                        num_workers=0),
    "microdit-xl-512": dict(data_dir="data/teacher", gen_num=5000, gen_batch_size=32, steps=10000, batch_size=32,
                            lr=1e-5, warmup=500, ema=0.999, val_every=500, val_samples=4, val_grid=4,
                            val_prompts=("a photograph of an astronaut riding a horse",
                                         "a bowl of ramen on a wooden table, studio lighting",
                                         "a watercolor painting of a lighthouse at sunset",
                                         "a red fox sitting in fresh snow, close-up"),
                            ckpt_every=1000, num_workers=4),
}
PRESET_DEFAULTS["microdit-xl-512-random"] = {**PRESET_DEFAULTS["microdit-xl-512"], "data_dir": "data/xl-random"}
RECIPES = {"default": {}, "seed": SEED_RECIPE, "one-step": {}}  # overrides of CDConfig's defaults
# The training flags a recipe sets where the command line does not (BENCHMARKS.md, "One step as good as four").
RECIPE_FLAGS = {"default": {}, "seed": {}, "one-step": dict(dmd_weight=0.25, lr_schedule="cosine")}
FLAG_DEFAULTS = dict(dmd_weight=0.0, lr_schedule="constant")  # where neither the command line nor the recipe sets them
CKPT_DIR = "checkpoints"


# ----------------------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Parse the command line and fill unset options from PRESET_DEFAULTS[--preset]."""
    def per_preset(key: str) -> str:
        return "default per preset: " + ", ".join(f"{p} {d[key]}" for p, d in PRESET_DEFAULTS.items())

    def recipe_values(field: str) -> str:
        default = getattr(CDConfig, field)
        return f"[default recipe: {default}; seed recipe: {SEED_RECIPE.get(field, default)}]"

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
    g.add_argument("--lr-schedule", choices=("constant", "cosine"),
                   help="after the linear warm-up: constant (default), or cosine decay to 0 at --steps")
    g.add_argument("--warmup", type=int, help=f"linear learning-rate warm-up steps; {per_preset('warmup')}")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default %(default)s)")
    g.add_argument("--grad-clip", type=float, default=1.0,
                   help="clip the gradient norm to this, 0: no clipping (default %(default)s)")
    g.add_argument("--ema", type=float, help="decay of the slow EMA that is validated and exported, warmed up as "
                   f"min(ema, (1+step)/(10+step)); 0: none, use the online student; {per_preset('ema')}")
    g.add_argument("--seed", type=int, default=0, help="seed of the data order, the CD noise (per rank: (seed, "
                   "rank)) and a new guidance embedder (default %(default)s)")
    g = parser.add_argument_group("consistency distillation (CDConfig; unset flags keep the --recipe's value)")
    g.add_argument("--recipe", choices=list(RECIPES), default="default",
                   help="default: CDConfig() as cd_utils defines it; seed: cd_utils.SEED_RECIPE (one Euler teacher "
                        "step between adjacent Karras points, online target, pseudo-Huber c = 0.001); one-step: the "
                        f"default's CD with the training flags {RECIPE_FLAGS['one-step']} (DMD of the 1-step map)")
    g.add_argument("--num-scales", type=int, help="N: Karras points between sigma_min and sigma_max (the CD "
                   f"discretisation) {recipe_values('num_scales')}")
    g.add_argument("--skip", type=int, help=f"k >= 1: one teacher step spans k intervals (LCM's skipping step) "
                                            f"{recipe_values('skip')}")
    g.add_argument("--solver", choices=SOLVERS, help=f"teacher ODE solver: heun (2 guided calls) or euler (1) "
                                                     f"{recipe_values('solver')}")
    g.add_argument("--target-decay", type=float, help="mu of the EMA target network; 0: the online student under "
                   f"no_grad {recipe_values('target_decay')}")
    g.add_argument("--loss", choices=LOSSES, help="consistency distance (pseudo_huber: iCT, on the whole sample; "
                   f"_elementwise: LCM) {recipe_values('loss')}")
    g.add_argument("--huber-c", type=float, help="pseudo-Huber c (unset: 0.00054 sqrt(dim) for pseudo_huber, 0.001 "
                   f"elementwise) {recipe_values('huber_c')}")
    g.add_argument("--weighting", choices=WEIGHTINGS, help="lambda(sigma_n): uniform or inverse_gap = 1 / "
                   f"(sigma_(n+k) - sigma_n) {recipe_values('weighting')}")
    g.add_argument("--index-dist", choices=INDEX_DISTS, help="distribution of the index n: uniform or lognormal "
                   f"(iCT) {recipe_values('index_dist')}")
    g.add_argument("--p-mean", type=float, help=f"lognormal index distribution: mean of ln sigma "
                                                f"{recipe_values('p_mean')}")
    g.add_argument("--p-std", type=float, help="lognormal index distribution: std of ln sigma "
                                               f"{recipe_values('p_std')}")
    g.add_argument("--curriculum", action="store_true", help="iCT's curriculum: N doubles in three equal parts "
                   "of the run up to --num-scales (10, 20, 40; cd_utils.curriculum_scales)")
    g.add_argument("--w", dest="guidance", type=float, help="the teacher's classifier-free guidance scale w (also the "
                   f"validation w) {recipe_values('guidance')}")
    g.add_argument("--w-min", type=float, help="with --w-max: w ~ U[w-min, w-max] per sample and a w-conditioned "
                   f"student (a zero-initialised guidance embedder, saved as {GUIDANCE_FILE})")
    g.add_argument("--w-max", type=float, help="see --w-min")
    g = parser.add_argument_group("distribution matching (DMD2, cd_utils.dmd_losses): a refinement of the 1-step map")
    g.add_argument("--dmd-weight", type=float, help="lambda > 0: add lambda x the DMD loss of the student's 1-step "
                   "samples to the CD loss, with a fake denoiser (a trained copy of the teacher) learning those "
                   "samples; 0: CD only [default recipe: 0; one-step recipe: "
                   f"{RECIPE_FLAGS['one-step']['dmd_weight']}]")
    g.add_argument("--dmd-start", type=int, default=0, help="the optimizer step from which the DMD loss is on "
                   "(default %(default)s)")
    g.add_argument("--fake-lr", type=float, help="the fake denoiser's AdamW learning rate (default: --lr)")
    g.add_argument("--dmd-guidance", type=float, help="the guidance of DMD's teacher (default: --w, the CD teacher's)")
    g = parser.add_argument_group("LoRA student (lora.py: adapters on the attention, cross-attention and dense-FFN "
                                  "projections of every DiT block; the MoE experts stay the teacher's)")
    g.add_argument("--lora-rank", type=int, default=0, help="R > 0: train LoRA adapters of rank R on the teacher's "
                   "DiT (held once, in --dtype) instead of a full fp32 student; 0: full student (default)")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha: a layer's update is (alpha / R) B A (default: R)")
    g = parser.add_argument_group("validation, checkpoints, outputs")
    g.add_argument("--out-dir", help="outputs (default: the preset's run_dir, runs/cd-tiny for tiny)")
    g.add_argument("--val-every", type=int, help=f"validate every this many steps (0: only at the end); "
                                                 f"{per_preset('val_every')}")
    g.add_argument("--val-samples", type=int, help="validation samples (prompt, seed) for the metrics; "
                                                   f"{per_preset('val_samples')}")
    g.add_argument("--val-grid", type=int, help=f"validation prompts shown in the grid; {per_preset('val_grid')}")
    g.add_argument("--val-prompts", help="validation prompt file (default: the shapes world's held-out captions, "
                                         "or a few built-in prompts); cycled over --val-samples")
    g.add_argument("--val-teacher-steps", type=int, help="Heun steps of the teacher's validation images (default: the "
                   "preset's, 30; fewer only for a quick rehearsal: the teacher column is then not the reference)")
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

    for key, value in {**FLAG_DEFAULTS, **RECIPE_FLAGS[args.recipe]}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    preset = get_preset(args.preset)
    if preset.name not in PRESET_DEFAULTS:
        raise UserError(f"train.py has no defaults for preset {preset.name}; add it to PRESET_DEFAULTS")
    for key, value in {**PRESET_DEFAULTS[preset.name], "out_dir": preset.run_dir}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.val_teacher_steps = preset.num_steps if args.val_teacher_steps is None else args.val_teacher_steps
    problems = [f"--{k.replace('_', '-')} must be >= 1" for k in ("steps", "batch_size", "grad_accum", "keep_ckpts",
                                                                  "val_samples", "val_teacher_steps", "gen_num",
                                                                  "gen_batch_size")
                if getattr(args, k) < 1]
    problems += [f"{flag} must be {rule}" for flag, ok, rule in (
        ("--lr", args.lr > 0, "> 0"), ("--ema", 0 <= args.ema < 1, "in [0, 1)"), ("--warmup", args.warmup >= 0, ">= 0"),
        ("--num-workers", args.num_workers >= 0, ">= 0"), ("--lora-rank", args.lora_rank >= 0, ">= 0"),
        ("--lora-alpha", args.lora_alpha is None or args.lora_alpha > 0, "> 0"),
        ("--dmd-weight", args.dmd_weight >= 0, ">= 0"), ("--dmd-start", args.dmd_start >= 0, ">= 0"),
        ("--fake-lr", args.fake_lr is None or args.fake_lr > 0, "> 0")) if not ok]
    if args.dmd_weight:
        args.fake_lr = args.fake_lr or args.lr
        problems += [f"--dmd-weight does not go with {flag} yet" for flag, given in (
            ("--lora-rank (the fake denoiser would be a second trainable adapter)", args.lora_rank > 0),
            ("--w-min/--w-max", args.w_min is not None), ("--compile", args.compile)) if given]
    if args.lora_rank:
        args.lora_alpha = args.lora_alpha or float(args.lora_rank)
        problems += [f"--lora-rank does not go with {flag} yet" for flag, given in (
            ("--w-min/--w-max (the guidance embedder is not an adapter)", args.w_min is not None),
            ("--compile", args.compile)) if given]
    if problems:
        raise UserError("; ".join(problems))
    args.val_grid = min(args.val_grid, args.val_samples)
    return args


def cd_config_from_args(args: argparse.Namespace) -> CDConfig:
    """CDConfig of the --recipe with every CD flag that was given (--w-min/--w-max: guidance_range)."""
    fields = [f.name for f in dataclasses.fields(CDConfig) if f.name != "guidance_range"]
    overrides = {**RECIPES[args.recipe], **{k: getattr(args, k) for k in fields if getattr(args, k) is not None}}
    if (args.w_min is None) != (args.w_max is None):
        raise UserError("--w-min and --w-max go together")
    if args.w_min is not None:
        overrides["guidance_range"] = (args.w_min, args.w_max)
    return CDConfig(**overrides)


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
    preset = get_preset(args.preset)
    prompts = generate_data.data_prompts(args.preset, args.prompts, args.gen_num)
    print(f"no teacher data in {args.data_dir}: generating it ({len(prompts)} prompts, {preset.num_steps} Heun "
          f"steps, guidance {preset.guidance_scale}, seed {generate_data.TEACHER_DATA_SEED})")
    generate_data.generate(args, prompts, args.data_dir, args.gen_batch_size, preset.num_steps, preset.guidance_scale,
                           device=str(device))


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


def make_networks(args: argparse.Namespace, cd: CDConfig, pipe: Pipeline, device: torch.device) -> tuple:
    """({"student", "target", "ema", "fake"}: the student initialised from the teacher, its EMA target (None for
    target_decay 0), slow EMA (None for --ema 0) and DMD fake denoiser (None for --dmd-weight 0)), the AdamW
    optimizer (the student's parameters, then the fake's in a second group at --fake-lr) and its schedule.

    Full student: a float32 copy of the teacher on `device`; the target, slow EMA and fake are copies of it. LoRA
    student (--lora-rank): `lora.Adapter`s on the teacher's DiT, and pipe.dit becomes the adapter-free one (the
    teacher)."""
    seed_everything(args.seed)  # a new guidance embedder or the LoRA A factors are drawn from it
    if args.lora_rank:
        names = ["student"] + [n for n, on in (("target", cd.target_decay > 0), ("ema", args.ema > 0)) if on]
        base = pipe.dit
        adapters = add_adapters(base, names, args.lora_rank, args.lora_alpha)
        pipe.dit = adapters[None]  # the pipeline (validation, teacher passes) keeps sampling the teacher
        nets = {k: adapters.get(k) for k in ("student", "target", "ema")} | {"fake": None}
    else:
        base = build_dit(pipe.preset, args.teacher)
        if cd.guidance_range is not None:
            base.add_guidance_embedder()
        base.to(device).train()
        nets = dict(student=base, target=frozen_copy(base) if cd.target_decay > 0 else None,
                    ema=frozen_copy(base) if args.ema > 0 else None,
                    fake=copy.deepcopy(base).requires_grad_(True) if args.dmd_weight > 0 else None)
    student = nets["student"]
    if args.grad_checkpointing:
        for net in (base, nets["fake"]):
            if net is not None:
                enable_grad_checkpointing(net)
    groups = [{"params": list(student.parameters())}]
    if nets["fake"] is not None:
        groups.append({"params": list(nets["fake"].parameters()), "lr": args.fake_lr})
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, args.warmup, args.steps, args.lr_schedule))
    return nets, optimizer, scheduler


def state_bytes(base_params: int, trained_params: int, teacher_dtype: torch.dtype, averages: int) -> int:
    """Bytes of the networks and optimizer state of a run: the teacher in its dtype, and per trained parameter (the
    full student's or the LoRA factors) fp32 weights 4 + gradients 4 + AdamW moments 8 + 4 per weight average
    (EMA target, slow EMA). The activations (bench_memory.py counts them), text encoder and VAE come on top."""
    return base_params * torch.finfo(teacher_dtype).bits // 8 + trained_params * (16 + 4 * averages)


def available_memory_gib(device: torch.device) -> float:
    """Free memory of a CUDA device, or the system's available memory (MemAvailable) for the CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**30
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) / 2**20  # kB


def check_memory(args: argparse.Namespace, cd: CDConfig, device: torch.device) -> None:
    """Refuse, before any expensive work, a run whose networks and optimizer state alone (`state_bytes`) do not fit
    in the device's free memory: on the CPU the kernel would otherwise kill the run without a message."""
    preset = get_preset(args.preset)
    with torch.device("meta"):  # shapes only: nothing is allocated
        dit = getattr(microdit, preset.dit_arch)(**preset.dit_kwargs)
    base = sum(p.numel() for p in dit.parameters())
    trained = sum(p.numel() for p in add_adapters(dit, ["student"], args.lora_rank, args.lora_alpha)["student"]
                  .parameters()) if args.lora_rank else base
    averages = (cd.target_decay > 0) + (args.ema > 0)
    fake = state_bytes(0, base, DTYPES[args.dtype], 0) if args.dmd_weight > 0 else 0  # a trained fp32 copy
    need = (state_bytes(base, trained, DTYPES[args.dtype], averages) + fake) / 2**30
    fake_note = " and a DMD fake denoiser" if fake else ""
    have = available_memory_gib(device)
    if need > have:
        kind = f"LoRA rank {args.lora_rank}" if args.lora_rank else "full"
        hint = "a smaller --lora-rank" if args.lora_rank else "without DMD (--dmd-weight 0)" if fake else \
            "a LoRA student (--lora-rank 32 --grad-checkpointing)"
        raise UserError(f"the {kind} student of {preset.name} needs {need:.1f} GiB for its networks and optimizer "
                        f"state alone ({base / 1e6:.0f}M teacher parameters in {args.dtype}, {trained / 1e6:.1f}M "
                        f"trained with AdamW and {averages} weight average(s){fake_note}) and {device} has "
                        f"{have:.1f} GiB free: train {hint}, or on a device with more memory")


def loss_generator(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """The CD noise generator of one rank, seeded from (seed, rank)."""
    state = int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0])
    return torch.Generator(device).manual_seed(state)


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident memory on the CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints

def checkpoint_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, CKPT_DIR, f"ckpt_{step:06d}.pt")


def list_checkpoints(out_dir: str) -> list[str]:
    """Checkpoint paths in OUT_DIR/checkpoints, oldest first."""
    folder = os.path.join(out_dir, CKPT_DIR)
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.startswith("ckpt_") and n.endswith(".pt"))


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


def save_checkpoint(accelerator: Accelerator, out_dir: str, step: int, nets: dict, optimizer, scheduler,
                    gen: torch.Generator, cd: CDConfig, keep: int) -> str:
    """Every process's RNG states and, from the main process, `nets` ({"student", "target", "ema"}: module or
    None), the optimizer and the schedule at `step`, written atomically; all but the newest `keep` are deleted."""
    path = checkpoint_path(out_dir, step)
    rngs = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in gather_object([rng_state(gen)])]
    if accelerator.is_main_process:
        state = dict(step=step, world_size=accelerator.num_processes, optimizer=optimizer.state_dict(),
                     scheduler=scheduler.state_dict(), rng=rngs, cd=dataclasses.asdict(cd),
                     **{k: net.state_dict() if net is not None else None for k, net in nets.items()})
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        for old in list_checkpoints(out_dir)[:-keep]:
            os.remove(old)
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(path: str, world: int, nets: dict, optimizer, scheduler) -> tuple[int, torch.Tensor]:
    """Restore `nets`, the optimizer and the schedule from `path`; returns (step, this rank's RNG blob)."""
    ckpt = load_torch_file(path, "checkpoint")
    if ckpt["world_size"] != world:
        raise UserError(f"{path} was written by {ckpt['world_size']} processes; resume it with as many (now "
                        f"{world}) to continue the same data and noise streams")
    for key, net in nets.items():
        if net is not None:
            if ckpt[key] is None:
                raise UserError(f"{path} has no {key} network: resume with the same --target-decay/--ema")
            try:
                net.load_state_dict(ckpt[key])
            except RuntimeError as e:
                raise UserError(f"{path} does not fit this run's {key} network ({first_line(e)[:200]}): resume "
                                "with the same --preset and --lora-rank") from None
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    return ckpt["step"], ckpt["rng"]


# ----------------------------------------------------------------------------------------------------------------
# Training

def open_outputs(args: argparse.Namespace, cd: CDConfig, step: int, world: int) -> None:
    """OUT_DIR with config.json and the logs of a resumed run cut back to its checkpoint's step."""
    os.makedirs(args.out_dir, exist_ok=True)
    for name in (LOG_FILE, VAL_LOG_FILE):
        truncate_jsonl(os.path.join(args.out_dir, name), step)
    atomic_write_json(os.path.join(args.out_dir, "config.json"),
                      dict(args=vars(args), cd=dataclasses.asdict(cd), world_size=world, command=sys.argv))


def make_validator(args: argparse.Namespace, cd: CDConfig, pipe: Pipeline) -> Validator:
    """--val-samples prompts with seeds val-seed + i, at the teacher's w (a w-conditioned student gets it too)."""
    prompts, real = validation_prompts(pipe, args.val_samples, args.val_seed, args.val_prompts)
    return Validator(pipe, args.out_dir, prompts, [args.val_seed + i for i in range(len(prompts))], real,
                     cd.guidance, cd.guidance_range is not None, args.batch_size, args.val_grid,
                     teacher_path(pipe.preset, args.teacher), args.val_teacher_steps)


def validate(accelerator: Accelerator, validator: Optional[Validator], step: int, net: torch.nn.Module,
             out_dir: str, writer) -> dict:
    """The grid and metrics of `net` at `step`, made and logged by the main process (the one with a validator)
    while the others wait."""
    metrics = validator(step, net) if validator is not None else {}
    if validator is not None:
        append_jsonl(os.path.join(out_dir, VAL_LOG_FILE), {"step": step, **metrics})
        for k, v in metrics.items():
            if writer:
                writer.add_scalar(f"val/{k}", v, step)
        plot_curves(out_dir)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("adherence/"))
        tqdm.write(f"step {step}: validation grid {VAL_DIR}/step_{step:06d}.png{'; ' + shown if shown else ''}")
    accelerator.wait_for_everyone()
    return metrics


def accumulate_gradients(accelerator: Accelerator, model: torch.nn.Module, target_fwd, teacher_fwd, batches,
                         pipe: Pipeline, cd: CDConfig, gen: torch.Generator, grad_accum: int, autocast,
                         fake: Optional[torch.nn.Module] = None, dmd_weight: float = 0.0,
                         dmd_guidance: Optional[float] = None) -> dict[str, float]:
    """Backpropagate `cd_loss` over `grad_accum` batches (the gradient all-reduced once, on the last); with a
    `fake` denoiser also dmd_weight x the DMD loss and the fake's loss (`dmd_losses`, a second backward per batch;
    its teacher guided at dmd_guidance, by default the CD teacher's).
    Returns the mean of the stats (loss, sigma, gap, w; dmd, fake: 0 without DMD) over the batches."""
    stats = dict.fromkeys(("loss", "sigma", "gap", "w", "dmd", "fake"), 0.0)
    dmd_cd = cd if dmd_guidance is None else dataclasses.replace(cd, guidance=dmd_guidance)
    for micro in range(grad_accum):
        x0, y = model_inputs(next(batches), pipe, pipe.device)
        sync = micro == grad_accum - 1  # the first backward outside no_sync all-reduces all that accumulated
        with accelerator.no_sync(model) if not sync or fake is not None else nullcontext():
            with autocast:
                loss, micro_stats = cd_loss(model, target_fwd, teacher_fwd, x0, y, cd, pipe.edm_config, gen)
            accelerator.backward(loss / grad_accum)
        micro_stats.update(loss=loss.item(), dmd=0.0, fake=0.0)  # the loss that was backpropagated
        if fake is not None:
            with accelerator.no_sync(model) if not sync else nullcontext(), \
                    accelerator.no_sync(fake) if not sync else nullcontext():
                with autocast:
                    dmd, fake_loss = dmd_losses(model, fake, teacher_fwd, x0, y, dmd_cd, pipe.edm_config, gen)
                accelerator.backward((dmd_weight * dmd + fake_loss) / grad_accum)
            micro_stats.update(dmd=dmd.item(), fake=fake_loss.item())
        stats = {k: stats[k] + micro_stats[k] / grad_accum for k in stats}
    return stats


def log_step(log_path: str, writer, bar: tqdm, record: dict) -> None:
    """One optimizer step's record: a line of log.jsonl, TensorBoard scalars, the progress bar."""
    append_jsonl(log_path, record)
    for k in ("loss", "lr", "grad_norm", "samples_per_s", "gap"):
        if writer:
            writer.add_scalar(f"train/{k}", record[k], record["step"])
    bar.set_postfix(loss=f"{record['loss']:.4g}", gnorm=f"{record['grad_norm']:.3g}")
    bar.update(1)


def print_plan(args: argparse.Namespace, cd: CDConfig, student: torch.nn.Module, num_items: int, step: int,
               device: torch.device, world: int, precision: str) -> None:
    n_params = sum(p.numel() for p in student.parameters())
    t_calls = teacher_calls(cd)
    kind = f"LoRA rank {args.lora_rank} alpha {args.lora_alpha:g}" if args.lora_rank else "full"
    print(f"preset {args.preset}: {kind} student, {n_params / 1e6:.2f}M trained parameters, {num_items} training "
          f"items in {args.data_dir}; {device}, {world} process(es), {precision}; peak memory so far "
          f"{peak_memory_gb(device):.2f} GiB")
    print(f"steps {step} -> {args.steps}: batch {args.batch_size} x grad-accum {args.grad_accum} x {world} = "
          f"{args.batch_size * args.grad_accum * world} samples/step, lr {args.lr} ({args.warmup} warm-up, "
          f"{args.lr_schedule}); recipe {args.recipe}: {cd}")
    print(f"cost per sample and step, in network passes: teacher {t_calls} ({cd.solver}: "
          f"{2 if cd.solver == 'heun' else 1} call(s){' x cond+uncond' if t_calls % 2 == 0 else ''}) + target 1 "
          f"+ student forward+backward ~3 = ~{t_calls + 4} forward passes")
    if args.dmd_weight:  # dmd_losses: the 1-step sample, the guided teacher, the fake and the fake's training
        guidance = cd.guidance if args.dmd_guidance is None else args.dmd_guidance
        print(f"DMD from step {args.dmd_start} at weight {args.dmd_weight:g}, teacher guidance {guidance}, fake lr "
              f"{args.fake_lr}: + student 1-step forward+backward ~3 + teacher 2 + fake 1 + fake forward+backward ~3 "
              f"= ~{t_calls + 13} passes")


def print_result(args: argparse.Namespace, result: dict) -> None:
    timing = (f"{result['sec_per_step']:.2f} s/step, {result['samples_per_s']:.1f} samples/s"
              if result["sec_per_step"] else "no steps run")
    extra = [result[k] for k in ("guidance_embedder", "lora") if result[k]]
    print(f"done: step {result['step']}, loss {result['loss']:.4g}, {timing}; wrote {result['student']}"
          + "".join(f" and {path}" for path in extra))
    val = result["val"] or {}
    for name, what in (("full/adherence", "adherence, full captions"), ("partial/adherence", "partial captions"),
                       ("partial/coverage_tv", "coverage TV of what they omit (lower is better)")):
        if f"{name}/teacher" in val:
            print(f"{what}: teacher {val[f'{name}/teacher']:.3f}"
                  + "".join(f", student {steps_label(k)} {val[f'{name}/{k}']:.3f}" for k in VAL_STUDENT_STEPS))
    grid = os.path.join(args.out_dir, VAL_DIR, f"step_{result['step']:06d}.png")
    print(f"pictures: {grid} (teacher | student {' | '.join(map(str, VAL_STUDENT_STEPS))} steps); curves: "
          f"{os.path.join(args.out_dir, 'val_metrics.png')}, {os.path.join(args.out_dir, 'training_loss.png')}")


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Distil the student as `args` (from `parse_args`) say; returns the final step, metrics and output paths."""
    # Set-up: devices, precision, the run to resume
    cd = cd_config_from_args(args)
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available(), mixed_precision="no")
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main_process = accelerator.is_main_process
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")
    resume_from = resolve_resume(args)
    check_memory(args, cd, device)

    # Data: generated if missing, then read through before the teacher's validation images are made
    ensure_teacher_data(args, device)
    accelerator.wait_for_everyone()
    preset = get_preset(args.preset)
    check_data_dir(args.data_dir, preset.latent_shape, preset.dit_kwargs["caption_channels"])

    # Networks: the frozen teacher (pipe.dit, in --dtype), the student (fp32 or LoRA), its target and slow EMA
    pipe = pipeline_from_args(args, device)
    nets, optimizer, scheduler = make_networks(args, cd, pipe, device)
    student, exported = nets["student"], nets["ema"] if nets["ema"] is not None else nets["student"]
    gen = loss_generator(args.seed, rank, device)
    step, rng_blobs = load_checkpoint(resume_from, world, nets, optimizer, scheduler) if resume_from else (0, None)
    model = accelerator.prepare_model(student)  # DistributedDataParallel over several processes
    fake = accelerator.prepare_model(nets["fake"]) if nets["fake"] is not None else None
    teacher_fwd, target_fwd = pipe.dit, nets["target"] if nets["target"] is not None else student
    if args.compile:
        model, teacher_fwd, target_fwd = torch.compile(model), torch.compile(teacher_fwd), torch.compile(target_fwd)
    loader = get_dataloader(args.data_dir, args.batch_size, seed=args.seed, rank=rank, world_size=world,
                            start_index=step * args.batch_size * args.grad_accum, num_workers=args.num_workers,
                            resolution=pipe.image_size)
    batches = iter(loader)  # draws from the global torch RNG: restore the checkpoint's states after it
    if resume_from:
        set_rng_state(rng_blobs[rank], gen)

    # Outputs (main process): logs truncated to the resumed step, the config, the plan, the validator
    log_path, effective = os.path.join(args.out_dir, LOG_FILE), args.batch_size * args.grad_accum * world
    validator, writer = None, None
    if main_process:
        open_outputs(args, cd, step, world)
        print_plan(args, cd, student, len(loader.dataset), step, device, world, precision)
        validator = make_validator(args, cd, pipe)
        writer = SummaryWriter(args.out_dir) if SummaryWriter else None

    # Loop: grad-accumulated CD steps; validation, checkpoints and a clean stop on SIGINT/SIGTERM
    last_ckpt, val_metrics, step_times, loss, interrupted = resume_from, {}, [], float("nan"), False
    bar = tqdm(total=args.steps, initial=step, unit="step", disable=not main_process, dynamic_ncols=True)
    try:
        if step == 0 and args.val_every > 0:  # the teacher as a few-step sampler: the student's starting point
            val_metrics = validate(accelerator, validator, step, exported, args.out_dir, writer)
        with StopRequest() as stop:
            while step < args.steps:
                t0 = time.time()
                dmd_on = fake is not None and step >= args.dmd_start
                cd_now = dataclasses.replace(cd, num_scales=curriculum_scales(step, args.steps, cd.num_scales)) \
                    if args.curriculum else cd
                stats = accumulate_gradients(accelerator, model, target_fwd, teacher_fwd, batches, pipe, cd_now, gen,
                                             args.grad_accum, autocast, fake if dmd_on else None, args.dmd_weight,
                                             args.dmd_guidance)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    student.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf")).item()
                if dmd_on and args.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(nets["fake"].parameters(), args.grad_clip)
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
                if nets["target"] is not None:
                    ema_update(nets["target"], student, cd.target_decay)
                if nets["ema"] is not None:
                    ema_update(nets["ema"], student, ema_decay(args.ema, step))
                step += 1
                step_times.append(time.time() - t0)
                if main_process:
                    log_step(log_path, writer, bar, dict(
                        step=step, loss=loss, lr=lr, grad_norm=grad_norm, samples_per_s=effective / step_times[-1],
                        peak_mem_gb=peak_memory_gb(device),
                        **{k: stats[k] for k in ("sigma", "gap", "w", "dmd", "fake")},
                        time=time.time()))
                if args.val_every > 0 and step % args.val_every == 0:
                    val_metrics = validate(accelerator, validator, step, exported, args.out_dir, writer)
                if stop_now or (args.ckpt_every > 0 and step % args.ckpt_every == 0):
                    last_ckpt = save_checkpoint(accelerator, args.out_dir, step, nets, optimizer, scheduler, gen,
                                                cd, args.keep_ckpts)
                if stop_now:
                    interrupted = True
                    tqdm.write(f"stopped at step {step}: wrote {last_ckpt}; continue with --resume auto")
                    break
    except torch.OutOfMemoryError:
        raise UserError(f"CUDA out of memory at --batch-size {args.batch_size}: try a smaller --batch-size with a "
                        "larger --grad-accum, --grad-checkpointing, or --dtype bf16 for the teacher") from None
    finally:
        bar.close()

    # End: the last checkpoint and validation, the exported student, the closing summary
    sec_per_step = float(np.mean(step_times)) if step_times else None
    result = dict(step=step, interrupted=interrupted, checkpoint=last_ckpt, out_dir=args.out_dir, loss=loss,
                  val=val_metrics, log=log_path, student=None, guidance_embedder=None, lora=None,
                  sec_per_step=sec_per_step,
                  samples_per_s=effective / sec_per_step if sec_per_step else None)
    if interrupted:
        return result
    if not last_ckpt or not last_ckpt.endswith(f"ckpt_{step:06d}.pt"):
        result["checkpoint"] = save_checkpoint(accelerator, args.out_dir, step, nets, optimizer, scheduler, gen, cd,
                                               args.keep_ckpts)
    if args.val_every <= 0 or step % args.val_every != 0:
        result["val"] = validate(accelerator, validator, step, exported, args.out_dir, writer)
    if main_process:
        meta = {"preset": args.preset, "step": str(step), "recipe": args.recipe,
                "cd": json.dumps(dataclasses.asdict(cd)), "weights": "slow EMA" if nets["ema"] is not None else "student"}
        if args.lora_rank:  # the adapter alone, and merged into the teacher's float32 weights
            lora = exported.lora_state()
            result["lora"] = save_lora(args.out_dir, lora, args.lora_rank, args.lora_alpha, LORA_TARGETS, meta)
            exported = merge_lora(build_dit(preset, args.teacher), lora, args.lora_alpha)
        result["student"], result["guidance_embedder"] = save_student(args.out_dir, exported, meta)
        plot_curves(args.out_dir)
        if writer:
            writer.close()
        print_result(args, result)
    accelerator.wait_for_everyone()
    return result


def main() -> None:
    result = train(parse_args())
    if result["interrupted"]:
        sys.exit(130)


if __name__ == "__main__":
    run_cli(main)
