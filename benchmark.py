"""Benchmark distilled students beside their teacher: few-step images, speed and quality in one report.

    python benchmark.py                                   # tiny preset, CPU, runs/cd-tiny/student_final.safetensors
    python benchmark.py --steps 1 2 4 8 --compare-teacher --teacher-steps 2 4
    python benchmark.py --preset microdit-xl-512 --teacher dit_4_channel_0.5B_synthetic_data.pt --device cuda \
        --dtype bf16 --student runs/a/student_final.safetensors runs/b/student_final.safetensors --compare-teacher

Prompts: the first --num-prompts of --prompts-file (.tsv/.csv/.json/.jsonl/.txt, `sampler.load_prompts`); by default
PartiPrompts.tsv from the working directory, else from the user cache (PARTI_CACHE), else downloaded once from
PARTI_URL into that cache (not with HF_HUB_OFFLINE=1; offline, a one-line error says where to get it). A preset with
prompts of its own (the shapes world of `tiny`) defaults to those, drawn from --seed: its teacher knows only that
grammar.
Image i of every configuration starts from the noise of seed --seed + i (`sampler.initial_noise`), whatever the
batch size; a multistep student's fresh noise before step k is drawn from the seed (--seed + i, k).

Students: each --student is a DiT state dict in the official layout (train.py's student_final.safetensors; the
default is the one `python train.py --preset PRESET` writes, runs/cd-tiny/ for tiny); a sibling
guidance_embedder.safetensors makes it w-conditioned, sampled with guidance=--student-guidance. A LoRA student's
student_lora.safetensors (train.py --lora-rank) is merged into the --teacher weights.
Output in --out (default output/):
    teacher_30steps/, teacher_{N}steps/ (--compare-teacher, --teacher-steps), {label}_{N}steps/ per student, or
    parti_prompts_{N}steps/ for a single student without --labels (the reference layout); each holds NNNN.png and
    prompts.txt ("NNNN.png<TAB>prompt" per line);
    grid.png (rows: the first --grid-rows prompts, captioned; columns: the configurations, titled), on the shapes
    world grid_partial.png (rows: a few partial captions x (real data, each configuration); columns: their seeds
    side by side), report.json, report.md.
Speed: network passes (NFE) per image, and end-to-end wall time (text encoding + sampling + decoding, PNG writing
excluded) per batch and per image, after one untimed warm-up batch per batch shape, synchronising CUDA.
Quality, where the models are here: CLIP score (open_clip, --clip-model); Inception FD to the teacher-30 images
(torchmetrics or clean-fid, only when installed with their weights); on the shapes world (prompts: --num-prompts
full captions, then --partial-captions x --seeds-per-caption), full and partial captions apart: adherence,
coverage of what partial captions omit, precision, recall and shapes-FD, both to the teacher-30 images and to
real images rendered for the same captions ("data").
"""
import argparse
import os
import re
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import open_clip
import torch
from PIL import Image
from tqdm import tqdm

import shapes
from dataset import image_name
from pipeline import (DFN5B_HUB_ID, GUIDANCE_FILE, LORA_FILE, MICRODIT_XL_512, STUDENT_FILE, TINY, Pipeline, Preset,
                      add_pipeline_args, get_preset, hub_offline, load_student, pipeline_from_args)
from sampler import (SampleFn, consistency_sample, edm_sample, generate_images, load_prompts, multistep_noise,
                     teacher_nfe, to_uint8)
from utils import UserError, atomic_write, atomic_write_json, atomic_write_text, first_line, run_cli, save_grid
from validation import steps_label

PARTI_URL = "https://raw.githubusercontent.com/google-research/parti/main/PartiPrompts.tsv"  # Apache-2.0
PARTI_FILE = "PartiPrompts.tsv"
PARTI_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "microdit_cd", PARTI_FILE)
REFERENCE_PREFIX = "parti_prompts"  # folder prefix of a single student without --labels
DEFAULT_CLIP = f"hf-hub:{DFN5B_HUB_ID}"
DATA = "data (rendered)"  # the shapes world's reference row: real images for the benchmark's captions

@dataclass
class Config:
    """One way of making images: a model, a sampler and a step count."""

    label: str  # "teacher" or the student's label
    folder: str  # image folder under --out
    kind: str  # "teacher" or "student"
    steps: int
    nfe: int  # network passes per image (a guided pass counts twice)
    guidance: Optional[float]  # teacher cfg scale; a w-conditioned student's w; None for a plain student
    sample: SampleFn  # (unit noise (B, C, h, w), caption embeddings, the B seeds) -> latents

    @property
    def name(self) -> str:
        return f"{self.label} {steps_label(self.steps)}"


# ----------------------------------------------------------------------------------------------------------------
# Prompts and students

def get_prompts(args: argparse.Namespace, preset: Preset) -> tuple[list[str], str]:
    """(the prompts, where they come from): the first --num-prompts of --prompts-file, else on the shapes world the
    lab's captions of stream --seed (`shapes.lab_prompts`), else of PartiPrompts.tsv in the working directory."""
    if args.prompts_file:
        path = args.prompts_file
    elif preset.shapes_world:
        prompts = shapes.lab_prompts(args.num_prompts, args.partial_captions, args.seeds_per_caption, args.seed)
        return prompts, (f"the shapes lab's captions of stream {args.seed}: {args.num_prompts} full, "
                         f"{args.partial_captions} partial x {args.seeds_per_caption} seeds")
    else:
        path = parti_prompts_file()
    return load_prompts(path, args.prompt_column)[:args.num_prompts], path


def parti_prompts_file(timeout_s: float = 20.0) -> str:
    """PartiPrompts.tsv: the working directory's, else the cached copy (PARTI_CACHE), else downloaded once from
    PARTI_URL into the cache; the download is checked to parse before it is kept. UserError when it cannot be had."""
    for path in (PARTI_FILE, PARTI_CACHE):
        if os.path.isfile(path):
            return path
    hint = f"put {PARTI_FILE} (from {PARTI_URL}) in the working directory or pass --prompts-file PATH"
    if hub_offline():
        raise UserError(f"no prompt file (HF_HUB_OFFLINE is set, so nothing is downloaded): {hint}")
    print(f"downloading {PARTI_URL} -> {PARTI_CACHE}", file=sys.stderr)
    try:
        with urllib.request.urlopen(PARTI_URL, timeout=timeout_s) as response:
            data = response.read()
    except (OSError, ValueError) as e:  # URLError, HTTPError and timeouts are OSErrors
        raise UserError(f"no prompt file, and the download failed ({first_line(e)}): {hint}") from None

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
        load_prompts(tmp)  # a proxy's error page must not be cached as the prompt list

    atomic_write(PARTI_CACHE, write)
    return PARTI_CACHE


def student_labels(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(path, label, folder prefix) per --student; checks that the files exist and the labels are distinct."""
    paths = args.student or [os.path.join(get_preset(args.preset).run_dir, STUDENT_FILE)]
    for path in paths:
        if not os.path.isfile(path):
            hint = f"run `python train.py --preset {args.preset}` first" if not args.student else "check the path"
            raise UserError(f"student not found: {path}; {hint} (or pass --student PATH)")
    if args.labels and len(args.labels) != len(paths):
        raise UserError(f"--labels names {len(args.labels)} students but --student gives {len(paths)}")
    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
    labels = [re.sub(r"[^A-Za-z0-9._-]+", "_", label) for label in labels]
    if len(set(labels)) != len(labels):
        raise UserError(f"students share a label ({', '.join(labels)}); name them with --labels")
    prefixes = [REFERENCE_PREFIX] if len(paths) == 1 and not args.labels else labels
    return list(zip(paths, labels, prefixes))


# ----------------------------------------------------------------------------------------------------------------
# Samplers

def teacher_sampler(net: Callable, steps: int, guidance: float, pipe: Pipeline) -> SampleFn:
    def sample(noise: torch.Tensor, y: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        return edm_sample(net, noise, y, steps, guidance, pipe.edm_config)
    return sample


def student_sampler(net: Callable, steps: int, guidance: Optional[float], pipe: Pipeline) -> SampleFn:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) on `consistency_sigmas(steps)`; the noise
    added before step k is drawn per image (`multistep_noise`), so image i does not depend on its batch."""
    def sample(noise: torch.Tensor, y: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        return consistency_sample(net, noise, y, num_steps=steps, edm_config=pipe.edm_config, guidance=guidance,
                                  step_noise=multistep_noise(seeds, steps, noise.shape[1:]))
    return sample


# ----------------------------------------------------------------------------------------------------------------
# Generation, timing, files

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(pipe: Pipeline, config: Config, prompts: Sequence[str], seeds: Sequence[int],
               batch_size: int) -> tuple[np.ndarray, dict]:
    """All images of one configuration, (N, H, W, 3) uint8, and its timings.

    Each batch is one `generate_images` call timed end to end (text encoding, sampling, decoding). One untimed
    warm-up call per batch shape (the first batch, and a smaller last one) absorbs lazy initialisation and
    torch.compile.
    """
    batches = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]

    def generate(batch: list[int]) -> torch.Tensor:
        return generate_images(pipe, [prompts[i] for i in batch], [seeds[i] for i in batch], batch_size=len(batch),
                               sample_fn=config.sample)["images"]

    for batch in {len(b): b for b in (batches[0], batches[-1])}.values():
        generate(batch)
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipe.device)
    images, seconds = [], []
    for batch in tqdm(batches, desc=config.name, unit="batch", leave=False):
        sync(pipe.device)
        start = time.perf_counter()
        out = generate(batch)
        sync(pipe.device)
        seconds.append(time.perf_counter() - start)
        images.append(to_uint8(out))
    total = sum(seconds)
    full = [s for s, b in zip(seconds, batches) if len(b) == batch_size] or seconds
    timing = dict(batch_latency_s=sum(full) / len(full), latency_per_image_s=total / len(prompts),
                  images_per_s=len(prompts) / total, total_s=total, timed_batches=len(seconds),
                  peak_memory_gib=(torch.cuda.max_memory_allocated(pipe.device) / 2**30
                                   if pipe.device.type == "cuda" else None))
    return np.concatenate(images), timing


def write_folder(folder: str, prompts: Sequence[str], images: np.ndarray) -> None:
    """NNNN.png per image and prompts.txt ("NNNN.png<TAB>prompt" per line; tabs and newlines in a prompt become
    spaces); numbered PNGs left by an earlier, longer run are removed."""
    names = [image_name(i, len(prompts)) for i in range(len(prompts))]
    for name, image in zip(names, images):
        atomic_write(os.path.join(folder, name), lambda tmp, im=image: Image.fromarray(im).save(tmp, format="PNG"))
    one_line = [re.sub(r"[\t\r\n]", " ", prompt) for prompt in prompts]
    atomic_write_text(os.path.join(folder, "prompts.txt"), "".join(f"{n}\t{p}\n" for n, p in zip(names, one_line)))
    for stale in set(os.listdir(folder)) - set(names):
        if re.fullmatch(r"\d{4,}\.png", stale):
            os.remove(os.path.join(folder, stale))


# ----------------------------------------------------------------------------------------------------------------
# Quality

def to_unit(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1]: metrics see exactly the saved PNGs."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def clip_scores(images: dict[str, np.ndarray], prompts: Sequence[str], model_name: str, device: torch.device,
                batch_size: int) -> tuple[Optional[dict[str, float]], Optional[str]]:
    """CLIP score per configuration: 100 * mean of max(cos(image, prompt), 0) (Hessel et al. 2021; torchmetrics'
    CLIPScore) with open_clip `model_name` ("hf-hub:ORG/NAME" or "ARCH:PRETRAINED"). Returns (scores, None), or
    (None, a one-line note) when the model is not available here."""
    if model_name == "none":
        return None, "CLIP score: skipped (--clip-model none)"
    arch, pretrained = (model_name, None) if model_name.startswith("hf-hub:") else model_name.split(":", 1)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(arch)
    except Exception as e:  # not cached and no network, unknown name: all mean "not available here"
        return None, f"CLIP score: skipped, {model_name} is not available here ({first_line(e)[:160]})"
    model.eval()
    chunks = range(0, len(prompts), batch_size)
    text = torch.cat([model.encode_text(tokenizer(list(prompts[i:i + batch_size])).to(device)) for i in chunks])
    text = torch.nn.functional.normalize(text.float(), dim=-1)
    scores = {}
    for name, imgs in images.items():
        pixels = [torch.stack([preprocess(Image.fromarray(im)) for im in imgs[i:i + batch_size]]) for i in chunks]
        feats = torch.cat([model.encode_image(x.to(device)) for x in pixels])
        cos = (torch.nn.functional.normalize(feats.float(), dim=-1) * text).sum(-1)
        scores[name] = 100 * cos.clamp(min=0).mean().item()
    return scores, None


def inception_fds(images: dict[str, np.ndarray], reference: str, folders: dict[str, str],
                  device: torch.device) -> tuple[Optional[dict[str, float]], Optional[str]]:
    """Frechet Inception distance of every other configuration to the `reference` images, with torchmetrics
    (preferred) or clean-fid when one is installed and its Inception weights can be loaded. (None, note) if not."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        FrechetInceptionDistance = None
    try:
        from cleanfid import fid as cleanfid
    except ImportError:
        cleanfid = None
    others = [name for name in images if name != reference]
    if FrechetInceptionDistance is None and cleanfid is None:
        return None, "Inception FD: skipped, neither torchmetrics nor clean-fid is installed"
    if reference not in images or not others:
        return None, "Inception FD: skipped, it compares students with the teacher-30 images (--compare-teacher)"
    try:
        if FrechetInceptionDistance is None:
            return {name: float(cleanfid.compute_fid(folders[name], folders[reference], mode="clean", device=device,
                                                     num_workers=0, verbose=False)) for name in others}, None
        metric = FrechetInceptionDistance(feature=2048, reset_real_features=False).to(device)
        for i in range(0, len(images[reference]), 50):
            metric.update(torch.from_numpy(images[reference][i:i + 50]).permute(0, 3, 1, 2).to(device), real=True)
        fds = {}
        for name in others:
            metric.reset()  # keeps the reference statistics
            for i in range(0, len(images[name]), 50):
                metric.update(torch.from_numpy(images[name][i:i + 50]).permute(0, 3, 1, 2).to(device), real=False)
            fds[name] = float(metric.compute())
        return fds, None
    except Exception as e:  # weights not downloadable here, too few images
        return None, f"Inception FD: skipped ({first_line(e)})"


def real_renders(prompts: Sequence[str], seed: int) -> Optional[np.ndarray]:
    """DATA: real images of the captions, (N, H, W, 3) uint8, what they omit and their jitter drawn from stream
    `seed` (`shapes.render_captions`); None for prompts outside the shapes grammar."""
    try:
        return to_uint8((shapes.render_captions(prompts, seed)[0] + 1) / 2)
    except UserError:
        return None


def shapes_metrics(images: dict[str, np.ndarray], prompts: Sequence[str], data: Optional[np.ndarray],
                   reference: str) -> tuple[dict[str, dict[str, float]], Optional[str]]:
    """`shapes.score_by_form` per configuration and for DATA (`real_renders`), full and partial captions apart,
    against the data and the `reference` (teacher-30) images: <form>/shapes_fd_data, <form>/precision_teacher,
    partial/coverage_tv_teacher, ... (a set is not compared with itself).

    Returns ({name: metrics}, None), or ({}, a one-line note) for prompts outside the shapes grammar, fewer than
    2 images or no trained classifier.
    """
    if len(prompts) < 2:
        return {}, "shapes metrics: skipped, shapes-FD needs at least 2 images"
    if data is None:
        return {}, "shapes metrics: skipped, the prompts are not shapes-world captions"
    try:
        classifier = shapes.load_classifier()
    except UserError as e:
        return {}, f"shapes metrics: skipped, {e}"
    sets = {DATA: data, **images}
    references = {shapes.DATA_REFERENCE: DATA, "teacher": reference}
    readings = {ref: shapes.reference_set(to_unit(sets[name]), classifier)
                for ref, name in references.items() if name in sets}
    return {name: shapes.score_by_form(to_unit(x), prompts, {ref: r for ref, r in readings.items()
                                                             if references[ref] != name}, classifier)
            for name, x in sets.items()}, None


def partial_caption_grid(path: str, columns: dict[str, np.ndarray], prompts: Sequence[str], captions: int = 3,
                         seeds: int = 8) -> bool:
    """grid_partial.png: the first `captions` partial captions that repeat, each as one row per configuration
    {row title: images (N, H, W, 3)} showing its first `seeds` seeds side by side: diversity, or its loss, at a
    glance. Returns False (nothing written) when no partial caption repeats."""
    groups: dict[str, list[int]] = {}
    for i in shapes.split_by_form(prompts).get("partial", []):
        groups.setdefault(prompts[i], []).append(i)
    chosen = [index[:seeds] for index in groups.values() if len(index) > 1][:captions]
    if not chosen:
        return False
    k = min(len(index) for index in chosen)
    rows = [(name, index) for index in chosen for name in columns]
    save_grid(path, [(f"seed {j + 1} of {k}", np.stack([columns[name][index[j]] for name, index in rows]))
                     for j in range(k)], [f"{name}: {prompts[index[0]]}" for name, index in rows])
    return True


# ----------------------------------------------------------------------------------------------------------------
# Benchmark and report

COLUMNS = (  # (header, row key, format); a column is shown when some row has a value
    ("folder", "folder", "{}"),
    ("steps", "steps", "{}"),
    ("NFE / image", "nfe", "{}"),
    ("guidance", "guidance", "{:g}"),
    ("batch latency s", "batch_latency_s", "{:.3f}"),
    ("s / image", "latency_per_image_s", "{:.4f}"),
    ("images / s", "images_per_s", "{:.2f}"),
    ("peak GiB", "peak_memory_gib", "{:.1f}"),
    ("speed-up (measured)", "speedup", "{:.1f}x"),
    ("speed-up (NFE)", "nfe_speedup", "{:.1f}x"),
    ("CLIP score", "clip_score", "{:.2f}"),
    ("FD-Inception to teacher 30", "fd_inception_teacher30", "{:.2f}"),
)
SHAPES_COLUMNS = (  # the shapes lab's table, one per caption form: (header, `shapes.score` name, format)
    ("adherence", "adherence", "{:.3f}"),
    ("attributes right", "attributes_right", "{:.3f}"),
    *((f"acc. {a}", f"acc_{a}", "{:.3f}") for a in shapes.ATTRIBUTES),
    ("one object", "one_object", "{:.3f}"),
    ("sharp", "sharp", "{:.3f}"),
    ("coverage TV to world", "coverage_tv", "{:.3f}"),
    ("coverage TV to teacher 30", "coverage_tv_teacher", "{:.3f}"),
    ("precision to data", "precision_data", "{:.3f}"),
    ("recall to data", "recall_data", "{:.3f}"),
    ("precision to teacher 30", "precision_teacher", "{:.3f}"),
    ("recall to teacher 30", "recall_teacher", "{:.3f}"),
    ("shapes-FD to teacher 30", "shapes_fd_teacher", "{:.1f}"),
    ("shapes-FD to data", "shapes_fd_data", "{:.1f}"),
)
CAPTION_FORMS = (("full", "full captions (every attribute named)"),
                 ("partial", "partial captions (some attributes omitted; several seeds each)"))


LEGEND = (  # (row key, line): a line is shown when its column is
    ("clip_score", "- CLIP score: 100 x mean max(cos(image, prompt), 0) with the --clip-model image and text towers."),
    ("fd_inception_teacher30", "- FD-Inception to teacher 30: Frechet Inception distance to the teacher's own "
                               "30-step images of the same prompts and seeds (how closely the student reproduces "
                               "the teacher); biased upwards on a few hundred images: compare rows, not papers."),
    ("adherence", "- Adherence: share of images whose attributes, as the shapes classifier reads them, match all "
                  "the caption names, with exactly one object, and sharp (`shapes.score`); attributes right: the "
                  "first condition alone; acc. <attribute>: the share right among captions naming it."),
    ("sharp", "- Sharp: share of images whose blur, as the classifier reads it, is under half its training blur "
              "(real images ~0.03; a blurred or averaged image, e.g. the mean a 1-step sampler draws, ~0.7)."),
    ("coverage_tv", "- Coverage TV: for each partial caption, the histogram over its seeds of each attribute it "
                    "omits, its total-variation distance to the world's distribution (to world) or to the "
                    "teacher-30's histogram of the same seeds (to teacher 30); mean over captions and attributes. "
                    "Lower is better; the real-data row is the sampling floor."),
    ("precision_data", "- Precision / recall (Kynkaanniemi et al. 2019, k-NN manifolds, k = 5, in the classifier's "
                       "features): fidelity (share of the images on the reference's manifold) and diversity (share "
                       "of the reference on theirs), against real renders of the captions and the teacher-30 images."),
    ("shapes_fd_teacher", "- shapes-FD to teacher 30: Frechet distance in shapes-classifier features to the "
                          "teacher's 30-step images (same prompts, same seeds): closeness to the teacher."),
    ("shapes_fd_data", "- shapes-FD to data: the same distance to real shapes images rendered for the same captions "
                       "(the cleaner reference: sample quality against the data itself)."),
)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]] = COLUMNS, prefix: str = "") -> str:
    """A markdown table: one line per row that has a value in some column, the columns where some row has one."""
    columns = [c for c in columns if any(row.get(prefix + c[1]) is not None for row in rows)]
    rows = [row for row in rows if any(row.get(prefix + key) is not None for _, key, _ in columns)]
    lines = ["| configuration | " + " | ".join(c[0] for c in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        cells = [fmt.format(row[prefix + key]) if row.get(prefix + key) is not None else "" for _, key, fmt in columns]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    s = report["settings"]
    students = "; ".join(f"{st['label']} = {st['path']}" + (f" (w-conditioned, w = {st['guidance']:g})"
                                                             if st["w_conditioned"] else "") for st in s["students"])
    return "\n".join([
        f"# Benchmark: {s['preset']}, {s['num_prompts']} prompts",
        "",
        f"Prompts: {s['prompts']}; noise seed {s['seed']} + i. Teacher: {s['teacher']}. Students: {students}.",
        f"Device: {s['device_name']}, DiT dtype {s['dtype']}, compile {s['compile']}, batch size {s['batch_size']}, "
        f"torch {s['torch']}.",
        "",
        markdown_table(report["configurations"]),
        "",
        *[line for form, title in CAPTION_FORMS if any(f"{form}/adherence" in row for row in report["configurations"])
          for line in (f"Shapes lab, {title}:", "", markdown_table(report["configurations"], SHAPES_COLUMNS,
                                                                    f"{form}/"), "")],
        "- NFE: network passes per image; a guided teacher pass counts twice (Heun: 2 x (2N - 1)), a student "
        "step once.",
        "- Latency: wall time of whole batches (text encoding + sampling + decoding; PNG writing excluded), "
        "synchronised, after an untimed warm-up batch; s / image and images / s over all images.",
        "- Speed-up: teacher-30 latency per image over this one (measured), and the NFE ratio.",
        *[line for key, line in LEGEND if any(row.get(key) is not None or any(row.get(f"{form}/{key}") is not None
                                                                             for form, _ in CAPTION_FORMS)
                                              for row in report["configurations"])],
        *[f"- Note: {note}" for note in report["notes"]],
        "",
    ])


def run_benchmark(args: argparse.Namespace) -> dict:
    """Render the prompts with every configuration, write the images, time them and score them.

    args: the options of `parse_args`. Returns the report (also written to report.json and report.md in
    args.out): {"settings": {...}, "configurations": [one dict per row of the table], "notes": [...]}.
    """
    preset = get_preset(args.preset)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} exists and is not a folder")
    students = student_labels(args)
    prompts, source = get_prompts(args, preset)
    seeds = [args.seed + i for i in range(len(prompts))]
    device = torch.device(args.device)
    pipe = pipeline_from_args(args, device)  # tiny-random's random parts come from seed 0, as in every script
    compiled = torch.compile if args.compile else (lambda module: module)

    guidance, ref_steps = preset.guidance_scale, preset.num_steps
    teacher = compiled(pipe.dit)

    def teacher_config(steps: int) -> Config:
        return Config("teacher", f"teacher_{steps}steps", "teacher", steps, teacher_nfe(steps, guidance), guidance,
                      teacher_sampler(teacher, steps, guidance, pipe))

    configs = [teacher_config(ref_steps)] if args.compare_teacher else []
    student_settings = []
    for path, label, prefix in students:
        dit, w_conditioned = load_student(preset, path, pipe.device, pipe.dtype, args.teacher)
        w = (guidance if args.student_guidance is None else args.student_guidance) if w_conditioned else None
        student_settings.append(dict(label=label, path=path, w_conditioned=w_conditioned, guidance=w))
        net = compiled(dit)
        configs += [Config(label, f"{prefix}_{n}steps", "student", n, n, w, student_sampler(net, n, w, pipe))
                    for n in args.steps]
    if args.compare_teacher:
        configs += [teacher_config(n) for n in args.teacher_steps if n != ref_steps]
    folders = [c.folder for c in configs]
    if len(set(folders)) != len(folders):
        raise UserError(f"two configurations would write to the same folder ({', '.join(folders)}); "
                        "rename the students with --labels")

    images, rows = {}, []
    for config in tqdm(configs, desc="benchmark", unit="config"):
        images[config.name], timing = run_config(pipe, config, prompts, seeds, args.batch_size)
        write_folder(os.path.join(args.out, config.folder), prompts, images[config.name])
        rows.append(dict(name=config.name, kind=config.kind, label=config.label, folder=config.folder,
                         steps=config.steps, nfe=config.nfe, guidance=config.guidance, **timing))
    reference = teacher_config(ref_steps).name
    ref_row = next((row for row in rows if row["name"] == reference), None)
    notes = [] if ref_row else ["measured speed-up and distances to the teacher: run with --compare-teacher"]
    for row in rows:
        row["nfe_speedup"] = teacher_nfe(ref_steps, guidance) / row["nfe"]
        row["speedup"] = ref_row["latency_per_image_s"] / row["latency_per_image_s"] if ref_row else None

    clip, note = clip_scores(images, prompts, args.clip_model, device, args.batch_size)
    fds, fd_note = inception_fds(images, reference, {c.name: os.path.join(args.out, c.folder) for c in configs}, device)
    data = real_renders(prompts, args.seed) if preset.shapes_world else None
    shape_scores, shapes_note = shapes_metrics(images, prompts, data, reference) if preset.shapes_world \
        else ({}, None)
    notes += [n for n in (note, fd_note, shapes_note) if n]
    for row in rows:
        row["clip_score"] = clip[row["name"]] if clip else None
        row["fd_inception_teacher30"] = fds.get(row["name"]) if fds else None
        row.update(shape_scores.get(row["name"], {}))
    if DATA in shape_scores:
        rows.append(dict(name=DATA, kind="data", **shape_scores[DATA]))

    save_grid(os.path.join(args.out, "grid.png"),
              [(f"{c.label}\n{steps_label(c.steps)}\n{c.nfe} NFE", images[c.name]) for c in configs], prompts,
              args.grid_rows)
    if data is not None:
        partial_caption_grid(os.path.join(args.out, "grid_partial.png"), {"real data": data, **images}, prompts)
    settings = dict(preset=preset.name, teacher=args.teacher or preset.teacher or "random (seed 0)",
                    students=student_settings, prompts=source, num_prompts=len(prompts), seed=args.seed,
                    batch_size=args.batch_size, device=str(device),
                    device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
                    dtype=args.dtype, compile=args.compile, clip_model=args.clip_model, torch=torch.__version__)
    report = dict(settings=settings, configurations=rows, notes=notes)
    atomic_write_json(os.path.join(args.out, "report.json"), report)
    atomic_write_text(os.path.join(args.out, "report.md"), report_markdown(report))
    return report


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[4], help="student steps, one or several")
    parser.add_argument("--num-prompts", type=int, default=200, help="the first N prompts of the prompt list (the "
                        "shapes world: N full captions)")
    parser.add_argument("--partial-captions", type=int, help="the shapes world: partial captions after the full ones "
                        "(default: a tenth of --num-prompts)")
    parser.add_argument("--seeds-per-caption", type=int, default=16, help="the shapes world: seeds (images) of each "
                        "partial caption, for the coverage of what it omits")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="image i uses noise seed SEED + i (and, on the tiny "
                        "preset, SEED also draws the default captions)")
    parser.add_argument("--student", nargs="+", metavar="PATH", help="student DiT state dicts or LoRA adapters "
                        f"({LORA_FILE}, applied onto the teacher) (default: the output of `python train.py --preset "
                        f"PRESET`, e.g. {TINY.run_dir}/{STUDENT_FILE})")
    parser.add_argument("--labels", nargs="+", help="one label per --student (default: each file's folder name)")
    parser.add_argument("--student-guidance", type=float, help="w of w-conditioned students (those with a "
                        f"sibling {GUIDANCE_FILE}; default: the preset's guidance scale)")
    add_pipeline_args(parser)  # --preset --teacher --vae --text-encoder --dtype --vae-dtype
    parser.set_defaults(preset=TINY.name)
    parser.add_argument("--prompts-file", help="prompt list (.tsv/.csv/.json/.jsonl/.txt); default: the preset's own "
                        f"prompts (tiny: shapes captions), else {PARTI_FILE} in the working directory, else the "
                        "cached or once-downloaded copy (see above)")
    parser.add_argument("--prompt-column", default="Prompt", help="column / field of --prompts-file with the prompts")
    parser.add_argument("--out", default="output", help="output folder")
    parser.add_argument("--compare-teacher", action="store_true",
                        help="also render with the teacher at the preset's Heun steps and guidance (30, 5)")
    parser.add_argument("--teacher-steps", type=int, nargs="+", default=[], help="also the guided teacher at "
                        "these step counts (implies --compare-teacher)")
    parser.add_argument("--clip-model", help="open_clip model of the CLIP score: hf-hub:ORG/NAME, ARCH:PRETRAINED "
                        f"(PRETRAINED may be a weights file), or none; default: {DEFAULT_CLIP} for {MICRODIT_XL_512.name}, "
                        "none for the toy presets (32 px shapes and random images say nothing to CLIP)")
    parser.add_argument("--grid-rows", type=int, default=8, help="prompts (rows) in grid.png")
    parser.add_argument("--compile", action="store_true", help="torch.compile the DiTs (warm-up excluded)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.clip_model is None:
        args.clip_model = DEFAULT_CLIP if args.preset == MICRODIT_XL_512.name else "none"
    args.steps, args.teacher_steps = list(dict.fromkeys(args.steps)), list(dict.fromkeys(args.teacher_steps))
    args.compare_teacher = args.compare_teacher or bool(args.teacher_steps)
    args.partial_captions = args.num_prompts // 10 if args.partial_captions is None else args.partial_captions
    if args.partial_captions < 0 or args.seeds_per_caption < 2:
        raise UserError("--partial-captions must be >= 0 and --seeds-per-caption >= 2")
    if min(args.steps + args.teacher_steps) < 1 or args.num_prompts < 1 or args.batch_size < 1 or args.grid_rows < 1:
        raise UserError("--steps, --teacher-steps, --num-prompts, --batch-size and --grid-rows must be >= 1")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.clip_model != "none" and not args.clip_model.startswith("hf-hub:") and ":" not in args.clip_model:
        raise UserError(f"--clip-model {args.clip_model}: use hf-hub:ORG/NAME, ARCH:PRETRAINED (open_clip) or none")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    report = run_benchmark(args)
    print(report_markdown(report))
    print(f"images, grid.png, grid_partial.png (shapes), report.json and report.md in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
