"""Validation of a distillation run, and its curves.

`Validator`: fixed prompts and seeds; the teacher's images at its own sampler (rendered once, cached in
OUT_DIR/val/teacher.pt), the student's at VAL_STUDENT_STEPS, one labelled grid per call and, on the shapes world,
`shapes.score_by_form` of each image set, full and partial captions apart: adherence, coverage of what partial
captions omit, precision / recall / shapes-FD against real images of the captions ("data") and against the
teacher's images of the same prompts and seeds ("teacher"). `plot_curves` draws training_loss.png and
val_metrics.png from the run's jsonl logs; `make_validator` and `validate` are how train.py uses them.
"""
import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from tqdm import tqdm

import shapes
from cd_utils import CDConfig
from pipeline import Pipeline, teacher_path
from sampler import consistency_sample, generate_images, load_prompts, multistep_noise, to_uint8
from utils import UserError, append_jsonl, atomic_write, load_torch_file, read_jsonl, save_grid

VAL_STUDENT_STEPS = (1, 2, 4)
VAL_SEEDS_PER_CAPTION = 8  # seeds of each partial validation caption: its spread over what it omits
VAL_DIR, LOG_FILE, VAL_LOG_FILE = "val", "log.jsonl", "val_metrics.jsonl"  # in the run's folder
PLOTTED = (  # the panels of val_metrics.png and their y axes
    ("full/adherence", "share of images"), ("partial/adherence", "share of images"),
    ("partial/coverage_tv", "total variation to the world"), ("partial/recall_data", "share of real images"),
    ("full/shapes_fd_teacher", "Frechet distance (classifier features)"),
    ("partial/shapes_fd_teacher", "Frechet distance (classifier features)"))


def steps_label(k: int) -> str:
    """"1 step", "4 steps": how grids and tables name a sampler's step count."""
    return f"{k} step{'s' if k > 1 else ''}"


def validation_prompts(pipe: Pipeline, num: int, seed: int,
                       prompts: Optional[str | Sequence[str]]) -> tuple[list[str], Optional[torch.Tensor]]:
    """(num prompts, real images (num, 3, H, W) in [0, 1] or None): the shapes world's held-out captions of stream
    `seed` (`shapes.lab_prompts`: full captions, then a quarter of num as partial captions with
    VAL_SEEDS_PER_CAPTION seeds each) with real renders of them, unless `prompts` (a prompt file or a list) is
    given, which is cycled."""
    if pipe.preset.shapes_world and not prompts:
        num_partial = num // 4 // VAL_SEEDS_PER_CAPTION
        lab = shapes.lab_prompts(num - num_partial * VAL_SEEDS_PER_CAPTION, num_partial, VAL_SEEDS_PER_CAPTION, seed)
        return lab, (shapes.render_captions(lab, seed)[0] + 1) / 2
    listed = load_prompts(prompts) if isinstance(prompts, str) else list(prompts)
    return [listed[i % len(listed)] for i in range(num)], None


class Validator:
    """Renders and scores the validation set, the teacher at `teacher_steps` Heun steps; `validator(step, student)`
    writes OUT_DIR/val/step_XXXXXX.png (teacher | student 1 | 2 | 4 steps, rows captioned: the first full captions,
    then seeds of one partial caption) and returns the metrics {"<form>/<name>/<k>": value, and the teacher's as
    "<form>/<name>/teacher"} (empty outside the shapes world or without the shapes classifier)."""

    def __init__(self, pipe: Pipeline, out_dir: str, prompts: Sequence[str], seeds: Sequence[int],
                 real: Optional[torch.Tensor], guidance: float, w_conditioned: bool, batch_size: int,
                 grid_rows: int, teacher_file: Optional[str], teacher_steps: int):
        self.pipe, self.prompts, self.seeds, self.teacher_steps = pipe, list(prompts), list(seeds), teacher_steps
        self.guidance, self.w_conditioned, self.batch_size = guidance, w_conditioned, batch_size
        self.folder = os.path.join(out_dir, VAL_DIR)
        partial = shapes.split_by_form(self.prompts).get("partial", []) if real is not None else []
        shown = min(len(partial), grid_rows // 2)
        self.grid_index = list(range(grid_rows - shown)) + partial[:shown]
        self.teacher_images = self.render_teacher(teacher_file)
        self.scored = real is not None and os.path.isfile(shapes.DEFAULT_CLASSIFIER)
        if real is not None and not self.scored:
            print(f"warning: no shapes classifier at {shapes.DEFAULT_CLASSIFIER}: validation metrics skipped "
                  "(python shapes.py train-classifier)", file=sys.stderr)
        self.references, self.teacher_metrics = {}, {}
        if self.scored:  # classifier readings of the fixed sets, made once for every validation
            self.references = {shapes.DATA_REFERENCE: shapes.reference_set(real)}
            self.teacher_metrics = shapes.score_by_form(self.teacher_images, self.prompts, self.references)
            self.references["teacher"] = shapes.reference_set(self.teacher_images)

    def render_teacher(self, teacher_file: Optional[str]) -> torch.Tensor:
        """The teacher's images of the validation set, (N, 3, H, W) in [0, 1], from the cache if it matches."""
        preset = self.pipe.preset
        stat = os.stat(teacher_file) if teacher_file else None  # a retrained teacher at the same path: render again
        key = dict(preset=preset.name, teacher=teacher_file, teacher_file=(stat.st_size, stat.st_mtime_ns) if stat
                   else None, dtype=str(self.pipe.dtype), prompts=self.prompts, seeds=self.seeds,
                   steps=self.teacher_steps, guidance=self.guidance)
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
        columns = [(f"teacher\n{steps_label(self.teacher_steps)}", to_uint8(self.teacher_images[self.grid_index]))]
        metrics = {}
        for k in VAL_STUDENT_STEPS:
            def sample_fn(noise: torch.Tensor, y: torch.Tensor, seeds: list[int]) -> torch.Tensor:
                return consistency_sample(student, noise, y, num_steps=k, edm_config=self.pipe.edm_config,
                                          guidance=self.guidance if self.w_conditioned else None,
                                          step_noise=multistep_noise(seeds, k, noise.shape[1:]))

            images = generate_images(self.pipe, self.prompts, self.seeds, batch_size=self.batch_size,
                                     sample_fn=sample_fn)["images"]
            columns.append((f"student\n{steps_label(k)}", to_uint8(images[self.grid_index])))
            if self.scored:
                scores = shapes.score_by_form(images, self.prompts, self.references)
                metrics.update({f"{name}/{k}": v for name, v in scores.items()})
        metrics.update({f"{name}/teacher": v for name, v in self.teacher_metrics.items()})
        save_grid(os.path.join(self.folder, f"step_{step:06d}.png"), columns,
                  [f"{self.prompts[i]} (seed {self.seeds[i]})" for i in self.grid_index])
        return metrics


def plot_curves(out_dir: str) -> None:
    """training_loss.png (raw and smoothed loss per step) and val_metrics.png (one panel per PLOTTED metric: the
    student at each step count, the teacher dashed) from OUT_DIR's LOG_FILE and VAL_LOG_FILE."""
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
        for v in loss:  # exponential moving average, span ~len/10
            s = (1 - alpha) * s + alpha * v
            smooth.append(s)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, loss, alpha=0.3, label="loss")
        ax.plot(steps, smooth, label="smoothed")
        ax.set(xlabel="optimizer step", ylabel="CD loss", yscale="log" if (loss > 0).all() else "linear")
        ax.legend()
        save(fig, "training_loss.png")
    val = read_jsonl(os.path.join(out_dir, VAL_LOG_FILE))
    panels = [(name, unit) for name, unit in PLOTTED if any(f"{name}/{k}" in r for r in val for k in VAL_STUDENT_STEPS)]
    if panels:
        cols = min(3, len(panels))
        rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.8 * rows), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, (name, unit) in zip(axes.flat, panels):
            for k in VAL_STUDENT_STEPS:
                points = [(r["step"], r[f"{name}/{k}"]) for r in val if f"{name}/{k}" in r]
                ax.plot(*zip(*points), marker="o", label=f"student {steps_label(k)}")
            teacher = [r[f"{name}/teacher"] for r in val if f"{name}/teacher" in r]
            if teacher:
                ax.axhline(teacher[-1], color="k", ls="--", label="teacher")
            ax.set(title=name.replace("/", " captions: "), xlabel="optimizer step", ylabel=unit)
            ax.legend(fontsize=8)
        save(fig, "val_metrics.png")


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
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if "/adherence/" in k)
        tqdm.write(f"step {step}: validation grid {VAL_DIR}/step_{step:06d}.png{'; ' + shown if shown else ''}")
    accelerator.wait_for_everyone()
    return metrics
