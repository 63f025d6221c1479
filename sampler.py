"""Samplers: the teacher's EDM Heun loop (official MicroDiT numerics)."""
import csv
import json
import os
import sys
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from cd_utils import EDM, EDMConfig, ModelFwd, consistency_forward, edm_forward, get_sigmas, heun_step
from utils import UserError


@torch.no_grad()
def edm_sample(
    dit: ModelFwd,
    noise: torch.Tensor,
    y: torch.Tensor,
    num_steps: int = 30,
    guidance_scale: float = 5.0,
    edm_config: EDMConfig = EDM,
) -> torch.Tensor:
    """The official MicroDiT Heun sampler (EDM Algorithm 1 with S_churn = 0): unit `noise` (B, ...) -> latents.

    The state is float64 and every network call float32 (autocast around this call lowers it); the last step
    is Euler only, so there are 2*num_steps - 1 calls, each on a 2B batch when guidance_scale > 1.
    Returns float32 latents shaped like `noise`.
    """
    sigmas = get_sigmas(num_steps, edm_config.sigma_min, edm_config.sigma_max, edm_config.rho, noise.device)
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    cfg = guidance_scale if guidance_scale > 1.0 else 1.0  # the official loop only guides for cfg > 1

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x32, s32 = x.to(torch.float32), sigma.to(torch.float32).reshape(1)
        return edm_forward(x32, s32, y, dit, edm_config, guidance_scale=cfg).to(torch.float64)

    x = noise.to(torch.float64) * sigmas[0]
    for i, (s_cur, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        # second-order correction on every step except the one to sigma = 0
        x = heun_step(denoise, x, s_cur, s_next, second_order=i < num_steps - 1)
    return x.to(torch.float32)


def teacher_nfe(num_steps: int, guidance_scale: float) -> int:
    """Network passes per image of `edm_sample`: 2*num_steps - 1 calls (the last step is Euler), each a cond +
    uncond pair when guidance_scale > 1 (as the sampler guides only then)."""
    return (2 * num_steps - 1) * (2 if guidance_scale > 1.0 else 1)


# ----------------------------------------------------------------------------------------------------------
# Prompt files and batched text-to-image generation (teacher data, evaluation images)

PROMPT_FILE_FORMATS = (".json", ".jsonl", ".txt", ".tsv", ".csv")


def _prompt_records(path: str, column: str) -> Iterator[tuple[str, Any]]:
    """(where, value) for every prompt slot of a prompt file; `where` names the slot in error messages."""
    ext = os.path.splitext(path)[1].lower()

    def pick(record: Any, where: str) -> Any:
        if not isinstance(record, dict):
            return record
        key = column if column in record else next((k for k in record if k.lower() == column.lower()), None)
        if key is None:
            raise UserError(f"{path}: {where} has no field '{column}' (fields: {', '.join(map(str, record))})")
        return record[key]

    with open(path, encoding="utf-8", newline="") as f:
        if ext == ".json":
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: not valid JSON ({e})") from None
            if not isinstance(data, list):
                raise UserError(f"{path}: expected a JSON list of prompts, got {type(data).__name__}")
            for i, record in enumerate(data):
                yield f"item {i}", pick(record, f"item {i}")
        elif ext == ".jsonl":
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}: line {n} is not valid JSON ({e})") from None
                    yield f"line {n}", pick(record, f"line {n}")
        elif ext == ".txt":
            for n, line in enumerate(f, 1):
                if line.strip():  # blank lines separate nothing: they are not prompts
                    yield f"line {n}", line.rstrip("\r\n")
        elif ext in (".tsv", ".csv"):
            # TSV has no quoting (PartiPrompts.tsv has prompts that start with a literal '"'); CSV is standard.
            reader = (csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if ext == ".tsv"
                      else csv.DictReader(f))
            if not reader.fieldnames:
                return
            key = column if column in reader.fieldnames else next(
                (k for k in reader.fieldnames if k.lower() == column.lower()), None)
            if key is None:
                raise UserError(f"{path}: no column '{column}' (columns: {', '.join(reader.fieldnames)})")
            for row in reader:
                yield f"line {reader.line_num}", row[key]
        else:
            raise UserError(f"{path}: unknown prompt file type '{ext}' (use one of {', '.join(PROMPT_FILE_FORMATS)})")


def load_prompts(path: str, column: str = "Prompt", skip_invalid: bool = False) -> list[str]:
    """Prompts of a prompt file, in file order. The format follows the extension:

    .json  a list of strings, or of objects holding the field `column`;
    .jsonl one string or object per line (JourneyDB annotations: column="prompt");
    .txt   one prompt per line, blank lines ignored;
    .tsv / .csv  a header row naming `column` (PartiPrompts.tsv: column "Prompt"); .tsv is read unquoted.
    `column` is matched exactly, else case-insensitively.

    A missing file, non-UTF-8 text, malformed JSON, a missing column or a file without prompts raise UserError.
    An empty or non-string prompt raises UserError naming its place, or with skip_invalid=True is dropped and
    counted in one warning (for large third-party sources).
    """
    if not os.path.isfile(path):
        raise UserError(f"prompt file not found: {path}")
    prompts, skipped = [], []
    try:
        for where, value in _prompt_records(path, column):
            if isinstance(value, str) and value.strip():
                prompts.append(value)
            elif skip_invalid:
                skipped.append(where)
            else:
                kind = "an empty prompt" if isinstance(value, str) else f"a non-string prompt ({type(value).__name__})"
                raise UserError(f"{path}: {where} is {kind}")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise UserError(f"{path}: malformed {os.path.splitext(path)[1]} ({e})") from None
    if skipped:
        print(f"warning: {path}: skipped {len(skipped)} empty or non-string prompts (first at {skipped[0]})",
              file=sys.stderr)
    if not prompts:
        raise UserError(f"{path}: no prompts in the file")
    return prompts


def initial_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Unit Gaussian noise (B, *shape) float32 on the CPU, row b drawn from `torch.Generator().manual_seed(seeds[b])`.

    Row b depends on seeds[b] only, never on the batch size, the device or how prompts are sharded over ranks.
    """
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


SampleFn = Callable[[torch.Tensor, torch.Tensor, Sequence[int]], torch.Tensor]


@torch.no_grad()
def generate_images(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_steps: int = 30,
    guidance_scale: float = 5.0,
    batch_size: int = 8,
    sample_fn: Optional[SampleFn] = None,
) -> dict[str, torch.Tensor]:
    """Text -> image with a `pipeline.Pipeline`, one image per (prompt, seed), batch by batch.

    Per batch: one text-encoder call, `sample_fn(noise, y, batch_seeds) -> latents` (default: the teacher's
    `edm_sample` with num_steps and guidance_scale; a student plugs in `consistency_sample` here, with
    `multistep_noise(batch_seeds, ...)`), one codec decode.
    The network runs under autocast in `pipe.dtype` when that is not float32; noise comes from `initial_noise`
    (unit variance), so image i depends on prompts[i] and seeds[i] only.
    Returns CPU float32 tensors: images (N, 3, H, W) in [0, 1], latents (N, C, h, w), embeddings (N, 1, 77, D).
    """
    if not prompts or len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt (>0), got {len(prompts)} prompts and {len(seeds)} seeds")
    if sample_fn is None:
        def sample_fn(noise: torch.Tensor, y: torch.Tensor, batch_seeds: Sequence[int]) -> torch.Tensor:
            return edm_sample(pipe.dit, noise, y, num_steps, guidance_scale, pipe.edm_config)
    device = torch.device(pipe.device)
    out: dict[str, list[torch.Tensor]] = {"images": [], "latents": [], "embeddings": []}
    for start in range(0, len(prompts), batch_size):
        batch_seeds = seeds[start:start + batch_size]
        y = pipe.encode_prompts(list(prompts[start:start + batch_size]))
        noise = initial_noise(batch_seeds, pipe.latent_shape).to(device)
        with torch.autocast(device.type, dtype=pipe.dtype, enabled=pipe.dtype != torch.float32):
            latents = sample_fn(noise, y, batch_seeds).float()
        out["images"].append(pipe.decode(latents).float().cpu())
        out["latents"].append(latents.cpu())
        out["embeddings"].append(y.float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images (B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8 for PIL, rounded as diffusers' numpy_to_pil does."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def consistency_sigmas(num_steps: int, edm_config: EDMConfig = EDM) -> torch.Tensor:
    """Default few-step schedule: the first `num_steps` of `get_sigmas(num_steps + 1)`, (num_steps,) float64.

    1 step = [sigma_max]; 2 steps = [sigma_max, ~2.5] for the default EDMConfig (the second sigma's choice:
    BENCHMARKS.md, "Choosing the recipe on the shapes lab"). sigma_min itself is left out: f(x, sigma_min) = x,
    so a step there would only add noise.
    """
    sigmas = get_sigmas(num_steps + 1, edm_config.sigma_min, edm_config.sigma_max, edm_config.rho)
    return sigmas[:num_steps]


def multistep_noise(seeds: Sequence[int], num_steps: int, shape: Sequence[int]) -> list[torch.Tensor]:
    """The fresh unit noise a multistep consistency sampler adds before steps 2..num_steps: num_steps - 1 tensors
    (B, *shape) float32 on the CPU; image b's noise before step k comes from the seed (seeds[b], k) only, so it
    does not depend on the batch, like `initial_noise`."""
    def derived(seed: int, k: int) -> int:
        return int(np.random.SeedSequence([int(seed), k]).generate_state(1)[0])
    return [initial_noise([derived(s, k) for s in seeds], shape) for k in range(1, num_steps)]


@torch.no_grad()
def consistency_sample(
    student_fwd: ModelFwd,
    noise: torch.Tensor,
    y: torch.Tensor,
    num_steps: Optional[int] = None,
    sigmas: Optional[Sequence[float]] = None,
    edm_config: EDMConfig = EDM,
    generator: Optional[torch.Generator] = None,
    gamma: float = 1.0,
    guidance: Optional[Union[float, torch.Tensor]] = None,
    step_noise: Optional[Sequence[torch.Tensor]] = None,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1): unit `noise` (B, ...) -> latents.

    x = noise * sigma_0, x0 = f(x, sigma_0); then for each next sigma: x = re-noised x0 at that sigma, x0 = f(x, sigma).
    One network call per sigma, no cfg (the guidance is distilled in). `sigmas`: an explicit strictly descending
    list of positive noise levels; otherwise `consistency_sigmas(num_steps)` (num_steps defaults to 1: one call at
    sigma_max). gamma (TCD's strategic stochastic sampling, arXiv 2402.19159), in [0, 1]: from x at sigma_cur go
    deterministically to sigma_s = (1 - gamma) sigma_next along the student's own noise estimate
    (x - x0) / sigma_cur, then add fresh noise up to sigma_next. gamma = 1 (default) is CM Algorithm 1 (fresh
    noise only), gamma = 0 is deterministic. The fresh noise is `step_noise` (one unit tensor shaped like noise per
    step after the first; see `multistep_noise`), else drawn from `generator` (on noise's device).
    guidance: a w-conditioned student's w, float or (B,), passed as `guidance=` (B,) float32.
    Returns float32 latents shaped like `noise`.
    """
    if sigmas is None:
        sigmas = consistency_sigmas(1 if num_steps is None else num_steps, edm_config)
    elif num_steps is not None and num_steps != len(sigmas):
        raise ValueError(f"num_steps={num_steps} disagrees with {len(sigmas)} sigmas")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten().tolist()
    if not sigmas or any(s <= 0 for s in sigmas) or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"sigmas must be a non-empty strictly descending list of positive values, got {sigmas}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if step_noise is not None and len(step_noise) != len(sigmas) - 1:
        raise ValueError(f"step_noise has {len(step_noise)} tensors for {len(sigmas)} steps (need one per step after the first)")
    B = noise.shape[0]
    kwargs = {}
    if guidance is not None:
        kwargs["guidance"] = torch.as_tensor(guidance, dtype=torch.float32, device=noise.device).expand(B)

    def f(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return consistency_forward(x, torch.full((B,), sigma, device=x.device), y, student_fwd, edm_config, **kwargs)

    x = noise.to(torch.float32) * sigmas[0]
    x0 = f(x, sigmas[0]).float()
    for i, (s_cur, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        s_mid = (1.0 - gamma) * s_next
        x = x0 + (s_mid / s_cur) * (x - x0)  # deterministic move to s_mid (DDIM with the student's x0)
        z = (torch.randn(noise.shape, generator=generator, device=noise.device, dtype=torch.float32)
             if step_noise is None else step_noise[i].to(device=noise.device, dtype=torch.float32))
        x = x + (s_next**2 - s_mid**2) ** 0.5 * z
        x0 = f(x, s_next).float()
    return x0
