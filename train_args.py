"""train.py's command line: its flags, their per-preset defaults (PRESET_DEFAULTS) and their checks, in a module so
that bench_train.py parses the same flags without importing the train.py script. Each --recipe's own flags:
recipes.add_recipe_args."""
import argparse
from typing import Any, Optional

from dataset import add_import_args
from pipeline import add_pipeline_args, get_preset
from recipes import FLAG_DEFAULTS, PRECISIONS, RECIPES, add_recipe_args
from utils import UserError

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


def parse_args(argv: Optional[list[str]] = None, usage: str = "") -> argparse.Namespace:
    """Parse train.py's command line and fill unset options from PRESET_DEFAULTS[--preset]; `usage` (train.py's
    docstring) gives --help its description and epilog."""
    def per_preset(key: str) -> str:
        return "default per preset: " + ", ".join(f"{p} {d[key]}" for p, d in PRESET_DEFAULTS.items())

    parser = argparse.ArgumentParser(description=usage.split("\n")[0] or None,
                                     epilog=usage.split("\n", 2)[2] if usage.count("\n") >= 2 else None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_args(parser)  # --preset --teacher --vae --text-encoder --dtype (the teacher's) --vae-dtype
    parser.set_defaults(preset="tiny")  # the embedded default (add_pipeline_args defaults to the real teacher)
    g = parser.add_argument_group("data")
    g.add_argument("--data-dir", help=f"teacher data (latent shards), images + captions, or latents/*.pt + "
                                     f"prompts/*.txt (imported); {per_preset('data_dir')}")
    g.add_argument("--prompts", help="prompt file for generating the teacher data when --data-dir is empty "
                                     "(default: the preset's own prompts; the shapes world has them)")
    g.add_argument("--gen-num", type=int, help=f"teacher samples to generate from the preset's prompts; "
                                                f"{per_preset('gen_num')}")
    g.add_argument("--gen-batch-size", type=int, help=f"teacher data generation batch; {per_preset('gen_batch_size')}")
    g.add_argument("--num-workers", type=int, help=f"DataLoader workers per process; {per_preset('num_workers')}")
    add_import_args(g)  # --latents-scaled, for a --data-dir of latents/*.pt + prompts/*.txt
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
    add_recipe_args(parser)  # --recipe, CDConfig's flags, DMD's
    g = parser.add_argument_group("LoRA student (lora.py: adapters on the attention, cross-attention, dense-FFN and "
                                  "adaLN projections of every DiT block, the final layer and the timestep embedder; "
                                  "the MoE experts stay the teacher's)")
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
    g.add_argument("--precision", choices=list(PRECISIONS), help="autocast around the networks (weights stay "
                   "fp32): bf16, or fp16 with dynamic loss scaling for cards without bf16 (T4, P100, V100: "
                   "recipes.mixed_precision); default: bf16 on CUDA, fp32 on the CPU")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute the student's transformer blocks "
                   "in the backward pass (less memory, ~30%% more student compute)")
    g.add_argument("--fsdp", action="store_true", help="shard the full student, its EMA target and slow EMA and "
                   "DMD's fake denoiser over the processes of `accelerate launch` (FSDP2 fully_shard; checkpoints "
                   "sharded too) instead of replicating them (DDP); the teacher stays replicated in --dtype")
    g.add_argument("--compile", action="store_true", help="torch.compile the student, target and teacher")
    g.add_argument("--cpu", action="store_true", help="train on the CPU even if CUDA is available")
    args = parser.parse_args(argv)

    for key, value in {**FLAG_DEFAULTS, **RECIPES[args.recipe].flags}.items():
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
        ("--fake-lr", args.fake_lr is None or args.fake_lr > 0, "> 0"),
        ("--tangent-warmup", args.tangent_warmup is None or args.tangent_warmup >= 0, ">= 0")) if not ok]
    if args.dmd_weight:
        args.fake_lr = args.fake_lr or args.lr
        problems += [f"--dmd-weight does not go with {flag} yet" for flag, given in (
            ("--w-min/--w-max", args.w_min is not None), ("--compile", args.compile)) if given]
    if args.lora_rank:
        args.lora_alpha = args.lora_alpha or float(args.lora_rank)
        problems += [f"--lora-rank does not go with {flag} yet" for flag, given in (
            ("--w-min/--w-max (the guidance embedder is not an adapter)", args.w_min is not None),
            ("--compile", args.compile)) if given]
    if args.fsdp:  # LoRA: the adapters are small, DDP holds them at no cost; fp16: its scaler is not shard-aware
        problems += [f"--fsdp does not go with {flag} yet" for flag, given in (
            ("--lora-rank (DDP replicates small adapters at no cost)", args.lora_rank > 0),
            ("--precision fp16 (the loss scaler would need ShardedGradScaler; use bf16)", args.precision == "fp16"),
            ("--compile", args.compile)) if given]
    if args.recipe in ("scm", "rcm"):
        problems += [f"--recipe {args.recipe} does not go with {flag} yet" for flag, given in (
            ("--w-min/--w-max", args.w_min is not None), ("--compile (torch.func.jvp)", args.compile),
            ("--curriculum (a discrete-time schedule)", args.curriculum)) if given]
    if problems:
        raise UserError("; ".join(problems))
    args.val_grid = min(args.val_grid, args.val_samples)
    return args
