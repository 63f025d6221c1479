"""Time one DiT forward and one guided teacher sample (Heun, official numerics) for a preset.

    python bench_model.py --preset microdit-xl-512 --device cuda --dtype bf16 --batch-size 1 8 [--compile]
    python bench_model.py --preset tiny-random --batch-size 4

With no --teacher the DiT has random weights (the speed is the same). Prints a markdown table.
"""
import argparse

import torch

import microdit
from pipeline import DTYPES, PRESETS, build_dit, get_preset
from sampler import edm_sample, teacher_nfe
from utils import run_cli, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-random", help=f"one of: {', '.join(PRESETS)}")
    parser.add_argument("--teacher", help="checkpoint to load (default: random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=list(DTYPES),
                        help="autocast dtype of the DiT (weights stay float32)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=30, help="Heun steps of the timed teacher sample")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the DiT")
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per batch size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    preset, device = get_preset(args.preset), torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.teacher:
        dit = build_dit(preset, args.teacher)
    else:
        torch.manual_seed(args.seed)
        dit = getattr(microdit, preset.dit_arch)(**preset.dit_kwargs)
    dit = dit.to(device).eval().requires_grad_(False)
    net = torch.compile(dit) if args.compile else dit
    amp = torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")
    params = sum(p.numel() for p in dit.parameters())
    print(f"{args.preset}: {params / 1e6:.1f}M parameters, {device}, {args.dtype}, compile={args.compile}")
    print("| batch | forward ms | forward+cfg ms | peak GiB | sample s (steps, NFE) | s/image |")
    print("|---|---|---|---|---|---|")
    for batch in args.batch_size:
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(batch, *preset.latent_shape, generator=g).to(device)
        y = torch.randn(batch, 1, 77, dit.caption_channels, generator=g).to(device)
        t = torch.full((batch,), 0.5, device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad(), amp:
            fwd = timed(lambda: net(x, t, y), device, warmup=3, repeats=args.repeats)
            fwd_cfg = timed(lambda: net(x, t, y, cfg=args.guidance), device, warmup=3, repeats=args.repeats)
            sample = timed(lambda: edm_sample(net, x, y, args.steps, args.guidance, preset.edm_config),
                           device, warmup=1, repeats=1)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        print(f"| {batch} | {fwd * 1e3:.1f} | {fwd_cfg * 1e3:.1f} | {peak:.2f} | "
              f"{sample:.2f} ({args.steps}, {teacher_nfe(args.steps, args.guidance)}) | {sample / batch:.3f} |")


if __name__ == "__main__":
    run_cli(main)
