"""Consistency distillation of a MicroDiT teacher into a 1-4 step student; each --recipe's losses: recipes.py.

    python train.py                                     # embedded default: the shapes world, ~5 min on 2 CPU cores
    python train.py --recipe seed                       # Euler teacher step, online target, pseudo-Huber c=0.001
    python train.py --recipe one-step                   # CD + distribution matching (DMD2) of the 1-step samples
    python train.py --recipe scm                        # continuous-time consistency (sCM); rcm: sCM + DMD2
    python train.py --preset microdit-xl-512 --teacher dit_4_channel_0.5B_synthetic_data.pt --data-dir data/teacher
    accelerate launch --num_processes 8 train.py --preset microdit-xl-512 --teacher ... --data-dir data/teacher
    python train.py --resume auto                       # continue from the last checkpoint in --out-dir
    python train.py --preset microdit-xl-512 --lora-rank 32 --dtype bf16 --grad-checkpointing --batch-size 4 ...
    accelerate launch --num_processes 2 train.py ... --lora-rank 32 --dtype fp16 --precision fp16   # 2 x T4
    accelerate launch --num_processes 4 train.py ... --recipe one-step --fsdp --grad-checkpointing  # 4 x 40 GB

Data: the latent shards of `generate_data.py` (teacher latents + text embeddings: no VAE or text encoder in the
loop), or images + captions (encoded on the fly). An empty --data-dir is first filled by generate_data with the
preset's own prompts (the shapes world) or --prompts FILE; a folder of latents/*.pt + prompts/*.txt is first
imported into latent shards beside them (dataset.import_latent_files; --latents-scaled).

Networks: the teacher (frozen), the student (initialised from the teacher, trained), the target network of
CDConfig (an EMA of the student with decay target_decay, or for target_decay = 0 the online student under
no_grad: no copy), and a slow EMA of the student (--ema) that is validated and exported, as the EMA weights of a
diffusion model are. With --ema 0 the online student is validated and exported. With --lora-rank R the student,
the target, the slow EMA (and DMD's fake) are LoRA adapters (`lora.py`) on the teacher's own DiT, held once in
--dtype: for a 16-24 GB GPU (memory: README). With --fsdp the full student, target, slow EMA and fake are sharded
over the processes (FSDP2) and checkpoints are sharded folders (`checkpoints.py`); the exported student is one
file as always. --precision fp16 (cards without bf16) scales the loss dynamically and skips overflowing steps.

Outputs in --out-dir: log.jsonl (one line per step), val/step_XXXXXX.png (rows = validation prompts, captioned;
columns = teacher at its 30 Heun steps | student at 1 | 2 | 4 steps, titled), val_metrics.jsonl (`validation.py`:
on the shapes world, `shapes.score` of the teacher and of the student at each step count), training_loss.png,
val_metrics.png, checkpoints/ckpt_XXXXXX.pt (the last --keep-ckpts), config.json, student_final.safetensors
(official DiT layout) and, for a w-conditioned student (--w-min/--w-max), guidance_embedder.safetensors; a LoRA
student's student_final.safetensors is merged into the teacher's weights and student_lora.safetensors holds the
adapter alone (both load with benchmark.py --student).
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import generate_data
import train_args
from checkpoints import full_network, load_checkpoint, resolve_resume, save_checkpoint
from cd_utils import CDConfig
from dataset import (MANIFEST_JSON, check_data_dir, get_dataloader, has_captions, import_from_args, latent_files,
                     list_shards)
from lora import LORA_TARGETS
from pipeline import Pipeline, build_dit, get_preset, merge_lora, pipeline_from_args, save_lora, save_student
from recipes import RECIPES, accumulate_gradients, cd_config_from_args, check_memory, describe_recipe, \
    make_networks, mixed_precision, new_student, passes_per_sample, step_config_from_args, update_averages
from utils import (StopRequest, UserError, append_jsonl, atomic_write_json, peak_memory_gb, read_jsonl, run_cli,
                   set_rng_state, truncate_jsonl)
from validation import LOG_FILE, VAL_DIR, VAL_LOG_FILE, VAL_STUDENT_STEPS, make_validator, plot_curves, steps_label, \
    validate

try:  # optional
    from torch.utils.tensorboard import SummaryWriter
except ImportError:
    SummaryWriter = None

# ----------------------------------------------------------------------------------------------------------------
# Command line (train_args.py)

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """train_args.parse_args with this script's docstring as --help's text."""
    return train_args.parse_args(argv, __doc__)


# ----------------------------------------------------------------------------------------------------------------
# Data

def needs_teacher_data(data_dir: str) -> bool:
    """True if DATA_DIR has neither latent shards nor captioned images, or holds an unfinished generate_data run."""
    manifest = os.path.join(data_dir, MANIFEST_JSON)
    if os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as f:
            return not json.load(f).get("complete", True)
    return not list_shards(data_dir) and not has_captions(data_dir)


def ensure_teacher_data(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Import --data-dir's latent files (latents/*.pt + prompts/*.txt) into latent shards (main process), or
    fill (or finish) it with teacher data through generate_data (every process takes its share)."""
    if latent_files(args.data_dir):
        if accelerator.is_main_process:
            import_from_args(args, args.data_dir, args.data_dir, accelerator.device)
        return
    if not any(gather_object([needs_teacher_data(args.data_dir)])):  # collective: all ranks decide alike
        return
    preset = get_preset(args.preset)
    prompts = generate_data.data_prompts(args.preset, args.prompts, args.gen_num)
    print(f"no teacher data in {args.data_dir}: generating it ({len(prompts)} prompts, {preset.num_steps} Heun "
          f"steps, guidance {preset.guidance_scale}, seed {generate_data.TEACHER_DATA_SEED})")
    generate_data.generate(args, prompts, args.data_dir, args.gen_batch_size, preset.num_steps, preset.guidance_scale,
                           device=str(accelerator.device))


def model_inputs(batch: dict, pipe: Pipeline, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A data batch -> (x0 (B, C, h, w), y (B, 1, 77, D)) float32 on `device`; images + captions are encoded."""
    if "latents" in batch:
        return (batch["latents"].to(device, torch.float32, non_blocking=True),
                batch["embeddings"].to(device, torch.float32, non_blocking=True))
    with torch.no_grad():
        return pipe.codec.encode(batch["image"].to(device)).float(), pipe.encode_prompts(batch["caption"])


def loss_generator(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """The CD noise generator of one rank, seeded from (seed, rank)."""
    state = int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0])
    return torch.Generator(device).manual_seed(state)


# ----------------------------------------------------------------------------------------------------------------
# Training

def open_outputs(args: argparse.Namespace, cd: CDConfig, step: int, world: int) -> None:
    """OUT_DIR with config.json and the logs of a resumed run cut back to its checkpoint's step."""
    os.makedirs(args.out_dir, exist_ok=True)
    for name in (LOG_FILE, VAL_LOG_FILE):
        truncate_jsonl(os.path.join(args.out_dir, name), step)
    atomic_write_json(os.path.join(args.out_dir, "config.json"),
                      dict(args=vars(args), cd=dataclasses.asdict(cd), world_size=world, command=sys.argv))


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
    kind = f"LoRA rank {args.lora_rank} alpha {args.lora_alpha:g}" if args.lora_rank else "full"
    print(f"preset {args.preset}: {kind} student, {n_params / 1e6:.2f}M trained parameters, {num_items} training "
          f"items in {args.data_dir}; {device}, {world} process(es), {precision}; peak memory so far "
          f"{peak_memory_gb(device):.2f} GiB")
    print(f"steps {step} -> {args.steps}: batch {args.batch_size} x grad-accum {args.grad_accum} x {world} = "
          f"{args.batch_size * args.grad_accum * world} samples/step, lr {args.lr} ({args.warmup} warm-up, "
          f"{args.lr_schedule}); recipe {args.recipe}: {describe_recipe(args, cd)}")
    print(f"cost per sample and step, in network passes: {passes_per_sample(args, cd)}")


def print_result(args: argparse.Namespace, result: dict) -> None:
    timing = (f"{result['sec_per_step']:.2f} s/step, {result['samples_per_s']:.1f} samples/s"
              if result["sec_per_step"] else "no steps run")
    extra = [result[k] for k in ("guidance_embedder", "lora") if result[k]]
    print(f"done: step {result['step']}, loss {result['loss']:.4g}, {timing}; wrote {result['student']}"
          + "".join(f" and {path}" for path in extra))
    skipped = sum(record.get("skipped", 0) for record in read_jsonl(result["log"]))
    if skipped:
        print(f"fp16: {skipped} step(s) skipped where a gradient overflowed (log.jsonl: skipped)")
    val = result["val"] or {}
    for name, what in (("full/adherence", "adherence, full captions"), ("partial/adherence", "partial captions"),
                       ("partial/coverage_tv", "coverage TV of what they omit (lower is better)")):
        if f"{name}/teacher" in val:
            print(f"{what}: teacher {val[f'{name}/teacher']:.3f}"
                  + "".join(f", student {steps_label(k)} {val[f'{name}/{k}']:.3f}" for k in VAL_STUDENT_STEPS))
    grid = os.path.join(args.out_dir, VAL_DIR, f"step_{result['step']:06d}.png")
    print(f"pictures: {grid} (teacher | student {' | '.join(map(str, VAL_STUDENT_STEPS))} steps); curves: "
          f"{os.path.join(args.out_dir, 'val_metrics.png')}, {os.path.join(args.out_dir, 'training_loss.png')}")


def export_student(args: argparse.Namespace, cd: CDConfig, step: int, exported: torch.nn.Module,
                   weights: str) -> dict[str, Optional[str]]:
    """Write the student in the official DiT layout (a LoRA student: the adapter alone, and merged into the
    teacher's float32 weights); returns the paths {"student", "guidance_embedder", "lora"} (None: not written)."""
    meta = {"preset": args.preset, "step": str(step), "recipe": args.recipe, "cd": json.dumps(dataclasses.asdict(cd)),
            "weights": weights}
    paths = dict(lora=None)
    if args.lora_rank:
        lora = exported.lora_state()
        paths["lora"] = save_lora(args.out_dir, lora, args.lora_rank, args.lora_alpha, LORA_TARGETS, meta)
        exported = merge_lora(build_dit(get_preset(args.preset), args.teacher), lora, args.lora_alpha)
    paths["student"], paths["guidance_embedder"] = save_student(args.out_dir, exported, meta)
    return paths


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Distil the student as `args` (from `parse_args`) say; returns the final step, metrics and output paths."""
    # Set-up: devices, precision, the run to resume
    cd = cd_config_from_args(args)
    preset = get_preset(args.preset)
    step_cfg = step_config_from_args(args, cd, preset.edm_config)
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available(), mixed_precision="no")
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main_process = accelerator.is_main_process
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    autocast, scaler = mixed_precision(precision, device)  # fp16: dynamic loss scaling
    if args.fsdp and world < 2:
        raise UserError("--fsdp shards the networks over several processes: launch train.py with accelerate launch "
                        "--num_processes N (or torchrun --nproc_per_node N)")
    resume_from = resolve_resume(args)
    check_memory(args, cd, device, world)

    # Data: imported or generated if missing, then read through before the teacher's validation images are made
    ensure_teacher_data(args, accelerator)
    accelerator.wait_for_everyone()
    check_data_dir(args.data_dir, preset.latent_shape, preset.dit_kwargs["caption_channels"])

    # Networks: the frozen teacher (pipe.dit, in --dtype), the student (fp32 or LoRA, --fsdp: sharded), its target
    # and slow EMA; `whole` gathers a sharded one onto the main process for validation and export
    pipe = pipeline_from_args(args, device)
    nets, optimizer, scheduler = make_networks(args, cd, pipe, device)
    student, exported = nets["student"], nets["ema"] if nets["ema"] is not None else nets["student"]

    def whole(net: torch.nn.Module) -> Optional[torch.nn.Module]:
        return full_network(net, lambda: new_student(preset, args.teacher, cd), main_process, device)
    gen = loss_generator(args.seed, rank, device)
    optim = dict(optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    step, rng_blobs = load_checkpoint(resume_from, world, nets, optim) if resume_from else (0, None)
    calls = {k: nets[k] if nets[k] is None or isinstance(nets[k], FSDPModule)  # DDP over several processes
             else accelerator.prepare_model(nets[k]) for k in ("student", "fake", "weighting")}
    calls.update(teacher=pipe.dit, target=nets["target"] if nets["target"] is not None else student)
    if args.compile:
        calls.update({k: torch.compile(calls[k]) for k in ("student", "teacher", "target")})
    loader = get_dataloader(args.data_dir, args.batch_size, seed=args.seed, rank=rank, world_size=world,
                            start_index=step * args.batch_size * args.grad_accum, num_workers=args.num_workers,
                            resolution=pipe.image_size)
    batches = iter(loader)  # draws from the global torch RNG: restore the checkpoint's states after it
    inputs = (model_inputs(batch, pipe, device) for batch in batches)
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

    # Loop: grad-accumulated steps of the recipe's losses; validation, checkpoints and a clean stop on SIGINT/SIGTERM
    last_ckpt, val_metrics, step_times, loss, interrupted = resume_from, {}, [], float("nan"), False
    bar = tqdm(total=args.steps, initial=step, unit="step", disable=not main_process, dynamic_ncols=True)
    try:
        if step == 0 and args.val_every > 0:  # the teacher as a few-step sampler: the student's starting point
            val_metrics = validate(accelerator, validator, step, whole(exported), args.out_dir, writer)
        with StopRequest() as stop:
            while step < args.steps:
                t0 = time.time()
                stats = accumulate_gradients(accelerator, RECIPES[args.recipe].losses, calls, inputs, step_cfg, step,
                                             gen, args.grad_accum, autocast, scaler)
                scaler.unscale_(optimizer)  # fp16: the gradients at their true scale before clipping
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    student.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
                grad_norm = (grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm).item()
                if nets["fake"] is not None and args.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(nets["fake"].parameters(), args.grad_clip)
                # one all-reduce: the mean loss over ranks and whether any rank was asked to stop
                reduced = accelerator.reduce(torch.tensor([stats["loss"], float(stop.requested)], device=device))
                loss, stop_now = reduced[0].item() / world, reduced[1].item() > 0
                if not (math.isfinite(loss) and (math.isfinite(grad_norm) or scaler.is_enabled())):
                    where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                    fp16 = ("; an fp16 forward may have overflowed: try --dtype fp32 (the teacher) or --precision "
                            "fp32/bf16" if "fp16" in (args.dtype, precision) else "")
                    raise UserError(f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step + 1}; "
                                    f"stopped before updating the weights ({where}); try a lower --lr or "
                                    f"another --loss/--weighting{fp16}")
                lr, scale = scheduler.get_last_lr()[0], scaler.get_scale()
                scaler.step(optimizer)  # fp16: skipped when a gradient overflowed, and the scale halves
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                update_averages(nets, cd, args.ema, step)
                step += 1
                step_times.append(time.time() - t0)
                if main_process:
                    log_step(log_path, writer, bar, dict(
                        step=step, loss=loss, lr=lr, grad_norm=grad_norm, samples_per_s=effective / step_times[-1],
                        peak_mem_gb=peak_memory_gb(device), skipped=int(scaler.get_scale() < scale),
                        **{k: stats[k] for k in ("sigma", "gap", "w", "dmd", "fake")},
                        time=time.time()))
                if args.val_every > 0 and step % args.val_every == 0:
                    val_metrics = validate(accelerator, validator, step, whole(exported), args.out_dir, writer)
                if stop_now or (args.ckpt_every > 0 and step % args.ckpt_every == 0):
                    last_ckpt = save_checkpoint(accelerator, args.out_dir, step, nets, optim, gen, cd,
                                                args.keep_ckpts)
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
                  sec_per_step=sec_per_step, samples_per_s=effective / sec_per_step if sec_per_step else None)
    if interrupted:
        return result
    if not last_ckpt or not os.path.basename(last_ckpt).startswith(f"ckpt_{step:06d}."):
        result["checkpoint"] = save_checkpoint(accelerator, args.out_dir, step, nets, optim, gen, cd, args.keep_ckpts)
    final = whole(exported)
    if args.val_every <= 0 or step % args.val_every != 0:
        result["val"] = validate(accelerator, validator, step, final, args.out_dir, writer)
    if main_process:
        result.update(export_student(args, cd, step, final, "slow EMA" if nets["ema"] is not None else "student"))
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
