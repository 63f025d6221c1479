"""Time train.py's consistency-distillation step for full and LoRA students at growing batch sizes, until the
device's memory runs out: seconds per step, samples/s, FLOPs, MFU and peak memory.

    python bench_train.py --preset microdit-xl-512-random --device cuda --dtype bf16 --lora-rank 0 32 \
        --batch-size 8 16 32 64          # part of bench_gpu.sh
    python bench_train.py --preset tiny-random --batch-size 2 4                  # a check on the CPU

The networks, the flags and the step are train.py's (`train_args.parse_args` with --recipe, `recipes.make_networks`,
`recipes.accumulate_gradients`); the batches are random latents and caption embeddings of the preset's shapes (the
speed does not depend on them). One step = the recipe's losses (default: `cd_loss`, the guided teacher ODE step,
Heun; the EMA target; the student's forward) under the --precision autocast, their backward, gradient clipping,
AdamW and the EMA updates. FLOPs: torch's
FlopCounterMode over one whole step (recomputation included with --grad-checkpointing); MFU = FLOPs / step time /
--peak-tflops.
Peak memory: CUDA's max_memory_allocated per batch size, or the process's peak resident memory on the CPU.
"""
import argparse
import itertools
from typing import Optional

import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

import recipes
import train_args
from pipeline import DTYPES, PRESETS, get_preset, load_pipeline
from utils import peak_memory_gb, run_cli, timed

PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense bf16 tensor-core peaks (SXM), by device name


def default_peak_tflops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def bench_student(args: argparse.Namespace, lora_rank: int, device: torch.device, peak: Optional[float]) -> None:
    """Print one table row per batch size for the student of `lora_rank` (0: full), stopping at the first OOM."""
    preset = get_preset(args.preset)
    targs = train_args.parse_args(["--preset", preset.name, "--dtype", args.dtype, "--lora-rank", str(lora_rank),
                                   "--recipe", args.recipe]
                                  + (["--teacher", args.teacher] if args.teacher else [])
                                  + (["--grad-checkpointing"] if args.grad_checkpointing else []))
    cd = recipes.cd_config_from_args(targs)
    step_cfg = recipes.step_config_from_args(targs, cd, preset.edm_config)
    pipe = load_pipeline(preset.name, args.teacher, device, DTYPES[args.dtype])
    nets, optimizer, _ = recipes.make_networks(targs, cd, pipe, device)
    student = nets["student"]
    calls = dict(nets, teacher=pipe.dit, target=nets["target"] if nets["target"] is not None else student)
    accelerator = Accelerator(cpu=device.type == "cpu")
    autocast, scaler = recipes.mixed_precision(args.precision, device)
    gen = torch.Generator(device).manual_seed(0)
    kind = f"LoRA rank {lora_rank}" if lora_rank else "full"
    trained = sum(p.numel() for p in student.parameters())

    for batch in args.batch_size:
        x0 = torch.randn(batch, *preset.latent_shape, device=device)
        y = torch.randn(batch, 1, 77, preset.dit_kwargs["caption_channels"], device=device)

        def step() -> None:
            recipes.accumulate_gradients(accelerator, recipes.RECIPES[targs.recipe].losses, calls,
                                         itertools.repeat((x0, y)), step_cfg, 0, gen, 1, autocast, scaler)
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(student.parameters(), targs.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            recipes.update_averages(nets, cd, targs.ema, 0)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            seconds = timed(step, device, warmup=1, repeats=args.repeats)
            with FlopCounterMode(display=False) as counter:
                step()
        except torch.OutOfMemoryError:
            print(f"| {kind} | {trained / 1e6:.1f}M | {batch} | out of memory | | | | | |")
            break
        flops = counter.get_total_flops()
        tflops = flops / seconds / 1e12
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
        print(f"| {kind} | {trained / 1e6:.1f}M | {batch} | {seconds:.3f} | {batch / seconds:.2f} | "
              f"{flops / batch / 1e9:.4g} | {tflops:.3g} | {mfu} | {peak_memory_gb(device):.1f} |", flush=True)
    del nets, optimizer, student, calls, pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="microdit-xl-512-random", help=f"one of: {', '.join(PRESETS)}")
    parser.add_argument("--teacher", help="teacher checkpoint (default: the preset's, or random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=list(DTYPES),
                        help="the teacher's (and a LoRA student's base) dtype, train.py's --dtype")
    parser.add_argument("--precision", choices=list(recipes.PRECISIONS), help="train.py's --precision (default: "
                                                                              "bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--recipe", choices=list(recipes.RECIPES), default="default", help="train.py's --recipe")
    parser.add_argument("--lora-rank", type=int, nargs="+", default=[0, 32], help="0: the full student")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[8, 16, 32, 64],
                        help="ascending: the first that does not fit ends the student's rows")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per batch size (after one warm-up)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak for MFU (default: "
                        f"{', '.join(f'{k} {v:g}' for k, v in PEAK_TFLOPS.items())} by device name)")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    peak = args.peak_tflops or default_peak_tflops(device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    print(f"{args.preset}: one step of train.py's --recipe {args.recipe}, {device}, teacher {args.dtype}, precision "
          f"{args.precision}, grad checkpointing {args.grad_checkpointing}; MFU against {peak or 'no'} TFLOP/s")
    print("| student | trained params | batch | s / step | samples / s | GFLOP / sample | TFLOP/s | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rank in args.lora_rank:
        bench_student(args, rank, device, peak)


if __name__ == "__main__":
    run_cli(main)
