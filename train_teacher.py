"""Train the embedded default's teacher: a tiny MicroDiT on the shapes world, with MicroDiT's own EDM loss.

    python train_teacher.py --threads 2   # writes the `tiny` preset's teacher (weights/tiny_teacher.safetensors)

The same DiT code, EDM preconditioning and 10% caption dropout as the real teacher; pixels are the latents
(identity codec) and captions go through the preset's frozen, seeded text tower. The exact command line is
stored in the file's metadata. Deterministic on the CPU for a given torch version.
"""
import argparse
import copy
import json
import math
import os
import shlex
import sys
import time

import torch
from safetensors.torch import save_file
from tqdm import tqdm

import microdit
import shapes
from cd_utils import edm_loss, ema_update
from pipeline import REPO_DIR, TEXT_FINGERPRINT_KEY, get_preset, text_fingerprint
from sampler import edm_sample, initial_noise
from utils import atomic_write, run_cli


def evaluate_teacher(dit: torch.nn.Module, encode, edm_config, num: int, seed: int, steps: int,
                     guidance: float, batch_size: int = 250) -> dict:
    """Prompt adherence and shapes-FD (to real images) of `num` teacher samples on held-out captions."""
    real, attrs = shapes.sample(num, seed=seed)
    prompts = shapes.captions(attrs)
    noise = initial_noise(list(range(seed, seed + num)), real.shape[1:])
    out = []
    for i in range(0, num, batch_size):
        out.append(edm_sample(dit, noise[i:i + batch_size], encode(prompts[i:i + batch_size]), steps, guidance,
                              edm_config))
    images = (torch.cat(out).clamp(-1, 1) + 1) / 2
    return {"adherence": shapes.prompt_adherence(images, prompts),
            "shapes_fd": shapes.shapes_fd(images, (real + 1) / 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="preset whose DiT and text tower are trained/used")
    parser.add_argument("--out", help="output file (default: the preset's teacher path)")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200, help="linear learning-rate warm-up steps")
    parser.add_argument("--ema", type=float, default=0.999, help="decay of the weight average that is saved")
    parser.add_argument("--seed", type=int, default=0, help="initialisation, data stream and noise seed")
    parser.add_argument("--eval-samples", type=int, default=500, help="held-out samples for the final report")
    parser.add_argument("--eval-every", type=int, default=500, help="print the EMA teacher's adherence on 64 held-out "
                        "captions every this many steps (0: only at the end)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Adam's second moments of tiny gradients underflow into float32 denormals, which the CPU handles ~50x
    # slower (measured: 0.6 s/step at the start, 30 s/step by step 400); flush them to zero.
    torch.set_flush_denormal(True)

    preset = get_preset(args.preset)
    out = args.out or os.path.join(REPO_DIR, preset.teacher)
    torch.manual_seed(args.seed)
    dit = getattr(microdit, preset.dit_arch)(**preset.dit_kwargs).train()  # from scratch, official init
    ema = copy.deepcopy(dit).eval().requires_grad_(False)
    text = preset.text_encoder.build(None, args.seed).eval()
    opt = torch.optim.AdamW(dit.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    # linear warm-up, then cosine decay to zero: a constant rate plateaus early on this small model
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / args.warmup,
                                                                 0.5 * (1 + math.cos(math.pi * s / args.steps))))
    gen = torch.Generator().manual_seed(args.seed)
    print(f"training {sum(p.numel() for p in dit.parameters()) / 1e6:.2f}M-parameter teacher for {args.steps} "
          f"steps at batch {args.batch_size}, sigma_data {preset.edm_config.sigma_data}")

    start, smooth = time.time(), None
    bar = tqdm(range(args.steps), unit="step")
    for step in bar:
        images, attrs = shapes.sample(args.batch_size, seed=args.seed, start=step * args.batch_size)
        y = text.encode(shapes.captions(attrs))
        loss = edm_loss(dit, images, y, preset.edm_config, cap_drop_prob=0.1, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_update(ema, dit, min(args.ema, (1 + step) / (10 + step)))  # warm-up: no trace of the init left
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smooth:.4f}")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            m = evaluate_teacher(ema, text.encode, preset.edm_config, 64, seed=args.seed + 10**6,
                                 steps=preset.num_steps, guidance=preset.guidance_scale)
            tqdm.write(f"step {step + 1}: loss {smooth:.4f}, adherence {m['adherence']:.3f} (64 held-out captions)")
    minutes = (time.time() - start) / 60

    meta = {"command": shlex.join([os.path.basename(sys.argv[0])] + sys.argv[1:]), "seed": str(args.seed),
            "steps": str(args.steps), "train_minutes": f"{minutes:.1f}", "torch": torch.__version__,
            "final_loss": f"{smooth:.5f}", TEXT_FINGERPRINT_KEY: json.dumps(text_fingerprint(text))}
    state = {k: v.contiguous() for k, v in ema.state_dict().items()}
    atomic_write(out, lambda tmp: save_file(state, tmp, metadata=meta))  # saved before the (long) evaluation
    metrics = evaluate_teacher(ema, text.encode, preset.edm_config, args.eval_samples, seed=args.seed + 10**6,
                               steps=preset.num_steps, guidance=preset.guidance_scale)
    print(f"done in {minutes:.1f} min; EMA teacher at {preset.num_steps} Heun steps, guidance "
          f"{preset.guidance_scale}: adherence {metrics['adherence']:.3f}, shapes-FD {metrics['shapes_fd']:.2f}")
    meta.update({k: f"{v:.4f}" for k, v in metrics.items()})
    atomic_write(out, lambda tmp: save_file(state, tmp, metadata=meta))
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)
