"""Train the embedded default's teacher: a tiny MicroDiT on the shapes world, with MicroDiT's own EDM loss.

    python train_teacher.py --threads 2           # the `tiny` preset's teacher (weights/tiny_teacher.safetensors)
    python train_teacher.py --threads 2 --resume  # continues an interrupted or split run from its state file
    python train_teacher.py --resume --partial-cycles 4   # a finished run, one more warm restart

The same DiT code, EDM preconditioning and caption dropout as the real teacher; pixels are the latents (identity
codec) and captions go through the preset's frozen, seeded text tower. The state (network, EMA, optimizer, noise
generator, step; the data stream is indexed by step) is written atomically to --state every --save-minutes, so a
run longer than one sitting continues exactly where it stopped. Every --eval-every steps the EMA teacher's 30-step
samples of held-out captions are scored (`shapes.score`): that learning curve, the exact command, the device, the
steps and the time are stored in the weights' metadata. Deterministic on one device for a given torch version.
"""
import argparse
import copy
import json
import math
import os
import shlex
import sys
import time
from typing import Optional

import torch
from safetensors.torch import save_file
from tqdm import tqdm

import microdit
import shapes
from cd_utils import edm_loss, ema_decay, ema_update
from pipeline import REPO_DIR, TEXT_FINGERPRINT_KEY, get_preset, text_fingerprint
from sampler import edm_sample, initial_noise
from utils import UserError, atomic_write, load_torch_file, run_cli

HELD_OUT_OFFSET = 10**6  # held-out captions: shapes stream seed + HELD_OUT_OFFSET (training uses stream seed)
# Options that change the trained weights: a resumed run must use the values its state was started with
# (--partial-cycles may grow: steps before the end of its old value do not depend on it).
SETTINGS = ("preset", "steps", "partial_steps", "batch_size", "lr", "warmup", "ema", "cap_drop", "seed")


@torch.no_grad()
def evaluate_teacher(dit: torch.nn.Module, encode, preset, num_full: int, num_partial: int, seeds_per_caption: int,
                     seed: int, batch_size: int = 250) -> dict[str, float]:
    """`shapes.score_by_form` of the teacher's samples (the preset's Heun steps and guidance) of held-out captions
    (`shapes.lab_prompts`: num_full full captions, num_partial partial ones x seeds_per_caption seeds), image i from
    seed + i, against real renders of the same captions; plus the floors that a second set of real renders reads
    (`<form>/shapes_fd_floor`, `partial/coverage_tv_floor`)."""
    prompts = shapes.lab_prompts(num_full, num_partial, seeds_per_caption, seed)
    real, second = ((shapes.render_captions(prompts, s)[0] + 1) / 2 for s in (seed, seed + 1))
    noise = initial_noise(list(range(seed, seed + len(prompts))), real.shape[1:])
    device = next(dit.parameters()).device
    images = torch.cat([edm_sample(dit, noise[i:i + batch_size].to(device), encode(prompts[i:i + batch_size]),
                                   preset.num_steps, preset.guidance_scale, preset.edm_config).cpu()
                        for i in range(0, len(prompts), batch_size)])
    references = {shapes.DATA_REFERENCE: shapes.reference_set(real)}
    metrics = shapes.score_by_form((images.clamp(-1, 1) + 1) / 2, prompts, references)
    floor = shapes.score_by_form(second, prompts, references)
    metrics.update({k.replace("shapes_fd_data", "shapes_fd_floor"): v for k, v in floor.items() if "shapes_fd_data" in k})
    if "partial/coverage_tv" in floor:
        metrics["partial/coverage_tv_floor"] = floor["partial/coverage_tv"]
    return metrics


def lr_factor(step: int, warmup: int, steps: int, partial_steps: int) -> float:
    """Linear warm-up, then cosine decay to zero over `steps` (a constant rate plateaus early on this small model);
    the same again over each cycle of `partial_steps` that follows (warm restarts, SGDR: Loshchilov & Hutter 2017)."""
    if step >= steps:
        step, steps = (step - steps) % partial_steps, partial_steps
    return min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / steps)))


def load_state(path: str, settings: dict) -> dict:
    """The state file of an earlier sitting of this run; refuses one that was started with other settings."""
    if not os.path.isfile(path):
        raise UserError(f"--resume: no state file at {path}; start the run without --resume")
    state = load_torch_file(path, "training state")
    changed = [f"{k}={state['settings'].get(k)!r} (now {v!r})" for k, v in settings.items()
               if state["settings"].get(k) != v]
    if changed:
        raise UserError(f"{path} belongs to a run with other settings: {', '.join(changed)}")
    return state


def save_weights(path: str, ema: torch.nn.Module, meta: dict[str, str]) -> None:
    state = {k: v.contiguous() for k, v in ema.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="preset whose DiT and text tower are trained/used")
    parser.add_argument("--out", help="output weights (default: the preset's teacher path)")
    parser.add_argument("--state", help="training state file (default: OUT with _state.pt for .safetensors)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --state")
    parser.add_argument("--stop-at", type=int, help="end this sitting after this step (state saved); --resume "
                        "continues")
    parser.add_argument("--steps", type=int, default=20000, help="steps on full captions only (~2.8 h on 2 CPU cores, "
                        "in sittings with --resume)")
    parser.add_argument("--partial-steps", type=int, default=6000, help="then this many steps on the stream of full "
                        "and partial captions (shapes.sample_named), the learning rate warmed up and decayed again")
    parser.add_argument("--partial-cycles", type=int, default=3, help="repeats of --partial-steps, each a warm "
                        "restart of the learning rate; a finished run continues with --resume and a larger value")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200, help="linear learning-rate warm-up steps")
    parser.add_argument("--ema", type=float, default=0.999, help="decay of the weight average that is saved")
    parser.add_argument("--cap-drop", type=float, default=0.1, help="caption dropout (the unconditional branch)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation, data stream and noise seed")
    parser.add_argument("--eval-samples", type=int, default=500, help="held-out full captions for the final report, "
                        "with a fifth as many partial captions x --eval-seeds")
    parser.add_argument("--eval-every", type=int, default=500, help="score the EMA teacher on --eval-captions "
                        "held-out captions every this many steps, for the learning curve (0: only at the end)")
    parser.add_argument("--eval-captions", type=int, default=100, help="full captions of the learning curve, with a "
                        "fourth as many partial captions x half --eval-seeds")
    parser.add_argument("--eval-seeds", type=int, default=16, help="seeds per partial caption (coverage)")
    parser.add_argument("--save-minutes", type=float, default=5.0, help="write the state at least this often")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    for name in ("steps", "partial_cycles", "batch_size", "warmup", "eval_samples", "eval_captions", "eval_seeds"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    # Adam's second moments of tiny gradients underflow into float32 denormals, which the CPU handles ~50x
    # slower (measured: 0.6 s/step at the start, 30 s/step by step 400); flush them to zero.
    torch.set_flush_denormal(True)

    # Set-up: preset, paths, networks (the EMA is the teacher that is saved)
    preset = get_preset(args.preset)
    out = args.out or os.path.join(REPO_DIR, preset.teacher)
    state_path = args.state or (out.removesuffix(".safetensors") + "_state.pt")
    settings = {k: getattr(args, k) for k in SETTINGS}
    state = load_state(state_path, settings) if args.resume else None
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    dit = getattr(microdit, preset.dit_arch)(**preset.dit_kwargs).to(device).train()  # the preset's init_std
    ema = copy.deepcopy(dit).eval().requires_grad_(False)
    text = preset.text_encoder.build(None, args.seed).to(device).eval()
    opt = torch.optim.AdamW(dit.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.warmup, args.steps, args.partial_steps))
    gen = torch.Generator(device).manual_seed(args.seed)
    step, curve, seconds, smooth = 0, [], 0.0, None
    command = shlex.join(["train_teacher.py"] + (sys.argv[1:] if argv is None else argv))
    sittings = [command]
    if state is not None:
        dit.load_state_dict(state["dit"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        step, curve, seconds, smooth = state["step"], state["curve"], state["seconds"], state["smooth_loss"]
        sittings = state["sittings"] + [command]
        print(f"resuming {state_path} at step {step} ({seconds / 60:.1f} min trained)")
    total = args.steps + args.partial_steps * args.partial_cycles
    if step > total:
        raise UserError(f"{state_path} is at step {step}, past the {total} steps of these settings: "
                        f"raise --partial-cycles")
    print(f"training a {sum(p.numel() for p in dit.parameters()) / 1e6:.2f}M-parameter teacher for {args.steps} "
          f"steps on full captions and {args.partial_cycles} x {args.partial_steps} on full and partial ones at "
          f"batch {args.batch_size} on "
          f"{device}, sigma_data {preset.edm_config.sigma_data}")

    def save_state() -> None:
        blob = dict(settings=settings, step=step, dit=dit.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                    sched=sched.state_dict(), gen=gen.get_state(), curve=curve, seconds=seconds, smooth_loss=smooth,
                    sittings=sittings)
        atomic_write(state_path, lambda tmp: torch.save(blob, tmp))

    def evaluate(num_full: int, num_partial: int, seeds: int) -> dict[str, float]:
        return evaluate_teacher(ema, text.encode, preset, num_full, num_partial, seeds, args.seed + HELD_OUT_OFFSET)

    # Loop: batch `step` of the shapes stream is items step*B ... (step+1)*B - 1, whatever the sitting; their
    # captions name every attribute for the first --steps steps, then what `shapes.sample_named` draws
    last_save, stop = time.time(), min(total, args.stop_at or total)
    bar = tqdm(range(step, stop), initial=step, total=total, unit="step")
    for step in bar:
        t0 = time.time()
        images, attrs = shapes.sample(args.batch_size, seed=args.seed, start=step * args.batch_size)
        named = shapes.sample_named(args.batch_size, args.seed, step * args.batch_size) if step >= args.steps else None
        y = text.encode(shapes.captions(attrs, named))
        loss = edm_loss(dit, images.to(device), y, preset.edm_config, cap_drop_prob=args.cap_drop, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_update(ema, dit, ema_decay(args.ema, step))
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        seconds += time.time() - t0
        bar.set_postfix(loss=f"{smooth:.4f}")
        step += 1  # steps done
        if args.eval_every and step % args.eval_every == 0 and step < total:
            m = evaluate(args.eval_captions, args.eval_captions // 4, max(2, args.eval_seeds // 2))
            curve.append(dict(step=step, samples=step * args.batch_size, train_minutes=round(seconds / 60, 2),
                              loss=round(smooth, 5), **{k: round(v, 4) for k, v in m.items()}))
            tqdm.write(f"step {step}: " + ", ".join(f"{k} {v}" for k, v in curve[-1].items() if k != "step"))
        if time.time() - last_save > 60 * args.save_minutes or step == stop:
            save_state()
            last_save = time.time()
    if step < total:
        print(f"stopped at step {step} of {total}; state in {state_path}: continue with --resume")
        return

    # End: the EMA teacher, its final scores on held-out captions and how it was made
    meta = {"command": sittings[0], "sittings": json.dumps(sittings), "device": str(device), "seed": str(args.seed),
            "steps": str(args.steps), "partial_steps": str(args.partial_steps),
            "partial_cycles": str(args.partial_cycles), "batch_size": str(args.batch_size),
            "train_minutes": f"{seconds / 60:.1f}",
            "torch": torch.__version__, "final_loss": f"{smooth:.5f}", "curve": json.dumps(curve),
            TEXT_FINGERPRINT_KEY: json.dumps(text_fingerprint(text))}
    save_weights(out, ema, meta)  # saved before the (long) evaluation
    metrics = evaluate(args.eval_samples, args.eval_samples // 5, args.eval_seeds)
    print(f"done in {seconds / 60:.1f} min of training; EMA teacher at {preset.num_steps} Heun steps, guidance "
          f"{preset.guidance_scale}, {args.eval_samples} held-out captions: "
          + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    meta.update({k: f"{v:.4f}" for k, v in metrics.items()})
    save_weights(out, ema, meta)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)
