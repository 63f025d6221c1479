"""The distillation recipes, one home each: the networks a recipe trains, its flags and its per-step losses.

    --recipe    losses of one step                                                    paper
    default     consistency distillation (`cd_losses`: `cd_utils.cd_loss`)             CM, LCM, iCT
    seed        the same, one Euler step between adjacent points, online target        CM, LCM (cd_utils.SEED_RECIPE)
    one-step    CD + DMD2's distribution matching of the 1-step samples (`dmd_losses`)  DMD, DMD2
    scm         continuous-time consistency distillation (`scm_losses`: `scm_loss`)    sCM
    rcm         sCM + DMD2's distribution matching                                    rCM

`train.py` orchestrates (data, optimizer steps, checkpoints, validation); `bench_train.py` times the same step.
A step's losses are a list of parts, each one forward and one backward (`accumulate_gradients`): a network that
runs twice in a step (the student in CD and again in DMD) needs a backward per forward under
DistributedDataParallel, which all-reduces on the last backward of the step.
"""
import argparse
import copy
import dataclasses
import functools
import math
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.utils.checkpoint
from accelerate import Accelerator
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.attention import SDPBackend, sdpa_kernel

import microdit
from cd_utils import EDM, INDEX_DISTS, LOSSES, SEED_RECIPE, SOLVERS, WEIGHTINGS, CDConfig, EDMConfig, ModelFwd, \
    cd_loss, curriculum_scales, consistency_distance, consistency_forward, edm_forward, edm_loss, ema_decay, \
    ema_update, guided_edm_forward, teacher_calls, training_noise
from lora import add_adapters, lora_layers, recompute_context
from pipeline import DTYPES, GUIDANCE_FILE, Pipeline, Preset, build_dit, get_preset
from utils import UserError, seed_everything

LossPart = Callable[[], tuple[torch.Tensor, dict[str, float]]]  # () -> (loss to backpropagate, floats to log)
STATS = ("loss", "sigma", "gap", "w", "dmd", "fake")  # what a step logs (0 where its recipe has no such term)


# ----------------------------------------------------------------------------------------------------------------
# Distribution matching (DMD: Yin et al. 2024, arXiv 2311.18828; DMD2: Yin et al. 2024, arXiv 2405.14867), as a
# refinement of the 1-step map on top of CD: the student's 1-step samples are pushed along the difference between
# a "fake" denoiser trained on those samples and the guided teacher, which moves them towards the teacher's
# distribution rather than towards the mean of what the teacher could draw (the softness of a 1-step CD student).
# ----------------------------------------------------------------------------------------------------------------

def dmd_loss(
    x_gen: torch.Tensor,
    y: torch.Tensor,
    teacher_fwd: ModelFwd,
    fake_fwd: ModelFwd,
    cfg: CDConfig,
    edm_config: EDMConfig = EDM,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Distribution-matching loss of generated clean latents x_gen (B, ...) (with grad to the generator): a scalar.

    x_t = x_gen + sigma eps, the teacher's training noise (`training_noise`). The KL gradient is
    s_fake - s_real = (D_fake - D_real) / sigma^2 (DMD eq. 7 through Tweedie), weighted per sample by
    sigma^2 / mean|x_gen - D_real| (DMD eq. 8): g = (D_fake - D_real) / mean|x_gen - D_real|, D_real the teacher
    guided at cfg.guidance, D_fake the fake denoiser (cfg 1). x_gen is regressed onto sg(x_gen - g) with the CD distance
    (`consistency_distance`), so that this gradient and cd_loss's have the same per-sample scale.
    """
    x = x_gen.detach()
    with torch.no_grad():
        sigma, x_t = training_noise(x, edm_config, generator)
        d_real = guided_edm_forward(x_t, sigma, y, teacher_fwd, edm_config, cfg.guidance)
        d_fake = edm_forward(x_t, sigma, y, fake_fwd, edm_config)
        scale = (x - d_real).abs().flatten(1).mean(1).clamp_min(1e-6)
        step = (d_fake - d_real) / scale.view(-1, *([1] * (x.ndim - 1)))
    return consistency_distance(x_gen, x - step, cfg).mean()


def dmd_losses(
    student_fwd: ModelFwd,
    fake_fwd: ModelFwd,
    teacher_fwd: ModelFwd,
    x0: torch.Tensor,
    y: torch.Tensor,
    cfg: CDConfig,
    edm_config: EDMConfig = EDM,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DMD2 step's two losses for captions y (B, ...); x0 (B, ...) gives the latents' shape only.

    The student's 1-step samples x_gen = f(sigma_max eps, sigma_max) (eps from `generator`) give the generator's
    loss (`dmd_loss`) and, detached, the fake denoiser's EDM loss on them (`edm_loss` with every caption kept: the
    fake models the student's conditional distribution). Returns (generator loss, fake loss), scalars; their
    gradients reach disjoint networks, so one backward of their sum trains both.
    """
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_gen = consistency_forward(eps * edm_config.sigma_max, edm_config.sigma_max, y, student_fwd, edm_config)
    gen_loss = dmd_loss(x_gen, y, teacher_fwd, fake_fwd, cfg, edm_config, generator)
    fake_loss = edm_loss(fake_fwd, x_gen.detach(), y, edm_config, cap_drop_prob=0.0, generator=generator)
    return gen_loss, fake_loss


# ----------------------------------------------------------------------------------------------------------------
# Continuous-time consistency (sCM: Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency
# Models", arXiv 2410.11081) on the EDM teacher: TrigFlow time t = arctan(sigma / sigma_d), x_t = cos(t) x_0 +
# sin(t) z with z ~ N(0, sigma_d^2 I), so that x_t = cos(t) (x_0 + sigma eps) is the EDM latent scaled by cos t.
# The student keeps the project's consistency function f (`consistency_forward`, the official DiT layout) and is
# read in TrigFlow's terms through the paper's parameterisation f = cos(t) x_t - sin(t) sigma_d F. rCM (Zheng et al.
# 2025, "Large Scale Diffusion Distillation via Score-Regularized Continuous-Time Consistency", arXiv 2510.08431)
# adds DMD2's loss.
# ----------------------------------------------------------------------------------------------------------------

JVP_MODES = ("forward", "finite-difference")


@dataclass(frozen=True)
class SCMConfig:
    """sCM's options. tangent_warmup: optimizer steps over which the tangent's second term ramps in, r = min(1,
    step / tangent_warmup) ("tangent warmup"; 0: r = 1); norm_c: the tangent normalisation g / (||g||_rms + c)
    (c = 0.1, the RMS as in NVlabs/FastGen so that c means the same at every resolution); adaptive: the learned
    adaptive weighting (`AdaptiveWeighting`); jvp: 'forward' (torch.func.jvp, exact; attention on the math SDPA
    backend) or 'finite-difference' (a central difference along the teacher's tangent, step fd_step x the distance
    of t to 0 or pi/2, two forwards in float32 that any attention kernel runs). The time distribution and the
    guidance are CDConfig's (ln sigma ~ N(p_mean, p_std^2) truncated to [sigma_min, sigma_max]; w = guidance)."""

    tangent_warmup: int = 0
    norm_c: float = 0.1
    adaptive: bool = True
    jvp: str = "forward"
    fd_step: float = 1e-2

    def __post_init__(self) -> None:
        if self.jvp not in JVP_MODES:
            raise UserError(f"SCMConfig: jvp must be one of {JVP_MODES}, got {self.jvp!r}")


class AdaptiveWeighting(nn.Module):
    """sCM's learned log-variance u(t) of the loss e^-u ||.||^2 + u (Lu & Song 2024, "adaptive weighting"; EDM2's
    uncertainty weighting): fixed random Fourier features of c_noise = ln(sigma) / 4 into one zero-initialised
    linear layer (u = 0 at the start). Not part of the student: checkpointed, not exported."""

    def __init__(self, channels: int = 128, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(channels, generator=g))
        self.register_buffer("phases", torch.rand(channels, generator=g))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        """c_noise (B,) -> u (B,)."""
        features = math.sqrt(2) * torch.cos(2 * math.pi * (c_noise[:, None].float() * self.freqs + self.phases))
        return self.linear(features).squeeze(1)


def trigflow_F(student_fwd: ModelFwd, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
               edm_config: EDMConfig) -> torch.Tensor:
    """The student as TrigFlow's network output F (sCM: f = cos(t) x_t - sin(t) sigma_d F), from the
    consistency function f of the EDM latent x_t / cos t at sigma = sigma_d tan t. x_t (B, ...), t (B,) in (0, pi/2);
    differentiable in x_t and t (forward mode too)."""
    sd = edm_config.sigma_data
    cos, sin = (v.reshape(-1, *([1] * (x_t.ndim - 1))) for v in (t.cos(), t.sin()))
    f = consistency_forward(x_t / cos, sd * t.tan(), y, student_fwd, edm_config)
    return (cos * x_t - f) / (sd * sin)


def scm_loss(
    student_fwd: ModelFwd,
    target_fwd: ModelFwd,
    teacher_fwd: ModelFwd,
    weighting: Optional[nn.Module],
    x0: torch.Tensor,
    y: torch.Tensor,
    cfg: CDConfig,
    scm: SCMConfig,
    step: int,
    edm_config: EDMConfig = EDM,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One sCM distillation step's loss for clean latents x0 (B, ...) and captions y (B, ...) (Lu & Song 2024,
    continuous-time consistency distillation with the guided teacher's PF-ODE): draws ln sigma, then z, from
    `generator`.

    dx_t/dt = sigma_d F_teacher = (cos t x_t - D_w(x_t / cos t; sigma)) / sin t (TrigFlow's PF-ODE, D the guided
    EDM denoiser); the tangent g = cos(t) df^-/dt = -cos^2(t) (sigma_d F^- - dx_t/dt) - r cos(t) sin(t) (x_t +
    sigma_d dF^-/dt) (r the warm-up), dF^-/dt along the ODE by a JVP of `target_fwd` (the online student,
    theta^- = sg(theta), F^- = sg(F_theta)); normalised g / (||g||_rms + c); loss = mean_b w(t) e^-u(t)
    ||F_theta - F^- - g||^2 / dim + u(t) with the prior weight w = 1 / sigma (FastGen, Sana-Sprint) and u the adaptive
    weighting (0 without).
    Returns the scalar loss and floats: loss, sigma (mean), gap (mean RMS of g before normalisation), w.
    """
    B, sd = x0.shape[0], edm_config.sigma_data
    log_sigma = torch.randn(B, generator=generator, device=x0.device) * cfg.p_std + cfg.p_mean
    sigma = log_sigma.clamp(math.log(edm_config.sigma_min), math.log(edm_config.sigma_max)).exp()
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) * sd
    t = torch.atan(sigma / sd)
    cos, sin = (v.reshape(-1, *([1] * (x0.ndim - 1))) for v in (t.cos(), t.sin()))
    x_t = cos * x0 + sin * z

    F_theta = trigflow_F(student_fwd, x_t, t, y, edm_config).float()
    with torch.no_grad():
        dxt_dt = (cos * x_t - guided_edm_forward(x_t / cos, sigma, y, teacher_fwd, edm_config, cfg.guidance)) / sin
        dF_dt = trigflow_jvp(target_fwd, x_t, t, y, dxt_dt, scm, edm_config)
        r = 1.0 if scm.tangent_warmup == 0 else min(1.0, step / scm.tangent_warmup)
        g = -cos**2 * (sd * F_theta.detach() - dxt_dt) - r * cos * sin * (x_t + sd * dF_dt)
        g_rms = g.flatten(1).square().mean(1).sqrt()
        g = g / (g_rms.reshape(-1, *([1] * (x0.ndim - 1))) + scm.norm_c)
    per_sample = (F_theta - F_theta.detach() - g).flatten(1).square().mean(1)
    u = weighting(sigma.log() / 4) if weighting is not None else torch.zeros_like(sigma)
    loss = (per_sample / sigma * torch.exp(-u) + u).mean()
    values = torch.stack([v.detach().double() for v in (loss, sigma.mean(), g_rms.mean())]).tolist()
    return loss, dict(loss=values[0], sigma=values[1], gap=values[2], w=cfg.guidance)


def trigflow_jvp(target_fwd: ModelFwd, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, dxt_dt: torch.Tensor,
                 scm: SCMConfig, edm_config: EDMConfig) -> torch.Tensor:
    """dF^-/dt (B, ...) along the ODE dx_t/dt = dxt_dt, float32, without grad. 'forward': torch.func.jvp
    with tangents (dxt_dt, 1) and attention on the math SDPA backend (the fused kernels have no forward-mode
    derivative). 'finite-difference': (F(x_t + h dxt_dt, t + h) - F(x_t - h dxt_dt, t - h)) / 2h with
    h = fd_step min(t, pi/2 - t), in float32 (autocast off)."""
    def F(x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        return trigflow_F(target_fwd, x, time, y, edm_config)

    if scm.jvp == "forward":
        if hasattr(target_fwd, "select"):  # a LoRA adapter (lora.Adapter): peft's switch cannot run inside jvp
            target_fwd.select()
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(F, (x_t, t), (dxt_dt, torch.ones_like(t)))[1].float()
    h = scm.fd_step * torch.minimum(t, math.pi / 2 - t)  # tan t is singular at pi/2: shrink the step at both ends
    h_x = h.reshape(-1, *([1] * (x_t.ndim - 1)))
    with torch.autocast(x_t.device.type, enabled=False):
        x, d = x_t.float(), dxt_dt.float()
        return (F(x + h_x * d, t + h) - F(x - h_x * d, t - h)) / (2 * h_x)


# ----------------------------------------------------------------------------------------------------------------
# The recipes' losses
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepConfig:
    """What a recipe's losses read besides the networks: the CD options and their curriculum, the teacher's EDM
    constants, the DMD regulariser (on with dmd_weight > 0 from optimizer step dmd_start; its teacher guided at
    dmd_guidance, by default the CD teacher's) and sCM's options."""

    cd: CDConfig
    edm: EDMConfig = EDM
    curriculum_steps: int = 0  # > 0: iCT's curriculum of cd.num_scales over this many steps (`curriculum_scales`)
    dmd_weight: float = 0.0
    dmd_start: int = 0
    dmd_guidance: Optional[float] = None
    scm: SCMConfig = SCMConfig()


def dmd_parts(nets: dict, x0: torch.Tensor, y: torch.Tensor, cfg: StepConfig, step: int,
              gen: torch.Generator) -> list[LossPart]:
    """DMD2's regulariser as a loss part (Yin et al. 2024, eqs. 7-8; `dmd_losses`): dmd_weight x the student's
    distribution-matching loss + the fake denoiser's own loss; none before dmd_start or at weight 0."""
    if cfg.dmd_weight == 0 or step < cfg.dmd_start:
        return []
    dmd_cd = cfg.cd if cfg.dmd_guidance is None else dataclasses.replace(cfg.cd, guidance=cfg.dmd_guidance)

    def part() -> tuple[torch.Tensor, dict[str, float]]:
        dmd, fake = dmd_losses(nets["student"], nets["fake"], nets["teacher"], x0, y, dmd_cd, cfg.edm, gen)
        return cfg.dmd_weight * dmd + fake, dict(dmd=dmd.item(), fake=fake.item())
    return [part]


def cd_losses(nets: dict, x0: torch.Tensor, y: torch.Tensor, cfg: StepConfig, step: int,
              gen: torch.Generator) -> list[LossPart]:
    """Consistency distillation (CM: Song et al. 2023, arXiv 2303.01469; LCM: Luo et al. 2023; iCT's
    distance and index distribution): `cd_utils.cd_loss` of the student against its target at the guided
    teacher's ODE step, then DMD2's regulariser where it is on (`dmd_parts`). nets: "student" (called with grad),
    "target", "teacher", "fake"; x0 (B, ...) clean latents, y (B, ...) captions."""
    cd = cfg.cd if not cfg.curriculum_steps else dataclasses.replace(
        cfg.cd, num_scales=curriculum_scales(step, cfg.curriculum_steps, cfg.cd.num_scales))

    def part() -> tuple[torch.Tensor, dict[str, float]]:
        return cd_loss(nets["student"], nets["target"], nets["teacher"], x0, y, cd, cfg.edm, gen)
    return [part] + dmd_parts(nets, x0, y, cfg, step, gen)


def scm_losses(nets: dict, x0: torch.Tensor, y: torch.Tensor, cfg: StepConfig, step: int,
               gen: torch.Generator) -> list[LossPart]:
    """Continuous-time consistency distillation (sCM, Lu & Song 2024; `scm_loss`), then
    DMD2's regulariser where it is on: rCM (Zheng et al. 2025, sCM + DMD). nets: "student" (with grad), "target"
    (the online student, for the JVP), "teacher", "weighting" (or None), "fake"."""
    def part() -> tuple[torch.Tensor, dict[str, float]]:
        return scm_loss(nets["student"], nets["target"], nets["teacher"], nets["weighting"], x0, y, cfg.cd, cfg.scm,
                        step, cfg.edm, gen)
    return [part] + dmd_parts(nets, x0, y, cfg, step, gen)


@dataclass(frozen=True)
class Recipe:
    """A --recipe: its losses, its overrides of CDConfig's defaults, and the training flags it sets where the
    command line does not."""

    losses: Callable[..., list[LossPart]]
    cd: dict
    flags: dict
    help: str


# The one-step recipe's flags: BENCHMARKS.md, "One step as good as four".
RECIPES = {
    "default": Recipe(cd_losses, {}, {}, "CDConfig() as cd_utils defines it"),
    "seed": Recipe(cd_losses, SEED_RECIPE, {}, "cd_utils.SEED_RECIPE (one Euler teacher step between adjacent "
                                               "Karras points, online target, pseudo-Huber c = 0.001)"),
    "one-step": Recipe(cd_losses, {}, dict(dmd_weight=0.25, lr_schedule="cosine"),
                       "the default's CD plus DMD of the 1-step map"),
    "scm": Recipe(scm_losses, dict(target_decay=0.0), {}, "continuous-time consistency distillation (sCM) with the "
                  "online student as theta^-"),
    "rcm": Recipe(scm_losses, dict(target_decay=0.0), dict(dmd_weight=0.25, lr_schedule="cosine"),
                  "sCM plus DMD of the 1-step map (rCM)"),
}
FLAG_DEFAULTS = dict(dmd_weight=0.0, lr_schedule="constant")  # where neither the command line nor the recipe sets them


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # train.py --precision: autocast dtype


def mixed_precision(precision: str, device: torch.device) -> tuple[torch.autocast, torch.amp.GradScaler]:
    """The autocast around a step's forwards (weights stay float32) and, for fp16, dynamic loss scaling
    (Micikevicius et al. 2018, arXiv 1710.03740: the loss is multiplied by a scale that halves when a gradient
    overflows, that step being skipped, and doubles after 2000 clean steps); the scaler is a no-op otherwise."""
    dtype = PRECISIONS[precision]
    return (torch.autocast(device.type, dtype or torch.float32, enabled=dtype is not None),
            torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))


def accumulate_gradients(accelerator: Accelerator, losses: Callable[..., list[LossPart]], nets: dict,
                         inputs: Iterator[tuple[torch.Tensor, torch.Tensor]], cfg: StepConfig, step: int,
                         gen: torch.Generator, grad_accum: int, autocast: torch.autocast,
                         scaler: Optional[torch.amp.GradScaler] = None) -> dict[str, float]:
    """Backpropagate a recipe's `losses` over `grad_accum` batches (x0, y) from `inputs`, each part's loss divided
    by grad_accum (and multiplied by fp16's loss scale: `mixed_precision`); the DDP-wrapped networks in `nets`
    ("student", "fake") all-reduce once, on the step's last backward (the online "target" and the "teacher" run
    without grad). FSDP-sharded ones reduce-scatter on every backward (accelerate's no_sync is a no-op for them),
    which keeps their gradients sharded between micro-steps: memory before communication. Returns the mean of the
    parts' STATS over the batches."""
    ddp = [net for key, net in nets.items() if key in ("student", "fake", "weighting") and net is not None]
    stats = dict.fromkeys(STATS, 0.0)
    for micro in range(grad_accum):
        x0, y = next(inputs)
        parts = losses(nets, x0, y, cfg, step, gen)
        for i, part in enumerate(parts):
            with ExitStack() as stack:
                if micro < grad_accum - 1 or i < len(parts) - 1:
                    for net in ddp:
                        stack.enter_context(accelerator.no_sync(net))
                with autocast:
                    loss, part_stats = part()
                accelerator.backward(loss / grad_accum if scaler is None else scaler.scale(loss / grad_accum))
            if "loss" in part_stats:
                part_stats["loss"] = loss.item()  # what was backpropagated (a non-finite one stops train.py)
            for key, value in part_stats.items():
                stats[key] += value / grad_accum
    return stats


def update_averages(nets: dict, cd: CDConfig, ema: float, step: int) -> None:
    """After optimizer step `step` (0-based): the EMA target at cd.target_decay, the slow EMA at `ema` warmed up."""
    for net in (nets["student"], nets["target"], nets["ema"]):
        if isinstance(net, FSDPModule):  # FSDP2 leaves a root's own weights gathered after a forward without grad
            net.reshard()
    if nets["target"] is not None:
        ema_update(nets["target"], nets["student"], cd.target_decay)
    if nets["ema"] is not None:
        ema_update(nets["ema"], nets["student"], ema_decay(ema, step))


def describe_recipe(args: argparse.Namespace, cd: CDConfig) -> str:
    """The options a recipe's losses read, as one line (sCM reads CDConfig's time distribution and guidance only)."""
    if RECIPES[args.recipe].losses is scm_losses:
        scm = step_config_from_args(args, cd, EDM).scm
        return f"{scm}, ln sigma ~ N({cd.p_mean}, {cd.p_std}^2), w = {cd.guidance}"
    return str(cd)


def passes_per_sample(args: argparse.Namespace, cd: CDConfig) -> str:
    """A recipe's cost per sample and step in network passes, as a sentence."""
    t_calls = teacher_calls(cd)
    if RECIPES[args.recipe].losses is scm_losses:  # forward-mode JVP: ~2 passes' work; a central difference: 2
        passes, text = 7, (f"teacher 2 (one guided call) + JVP of the online student ~2 ({args.jvp}) + student "
                           "forward+backward ~3 = ~7 forward passes")
    else:
        passes, text = t_calls + 4, (f"teacher {t_calls} ({cd.solver}: {2 if cd.solver == 'heun' else 1} call(s)"
                                     f"{' x cond+uncond' if t_calls % 2 == 0 else ''}) + target 1 + student "
                                     f"forward+backward ~3 = ~{t_calls + 4} forward passes")
    if args.dmd_weight:  # dmd_losses: the 1-step sample, the guided teacher, the fake and the fake's training
        guidance = cd.guidance if args.dmd_guidance is None else args.dmd_guidance
        text += (f"; DMD from step {args.dmd_start} at weight {args.dmd_weight:g}, teacher guidance {guidance}, fake "
                 f"lr {args.fake_lr}: + student 1-step forward+backward ~3 + teacher 2 + fake 1 + fake "
                 f"forward+backward ~3 = ~{passes + 9} passes")
    return text


# ----------------------------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------------------------

def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """--recipe and the flags of the recipes' losses (unset: the recipe's value, see `step_config_from_args`)."""
    def recipe_values(field: str) -> str:
        default = getattr(CDConfig, field)
        return f"[default recipe: {default}; seed recipe: {SEED_RECIPE.get(field, default)}]"

    g = parser.add_argument_group("consistency distillation (CDConfig; unset flags keep the --recipe's value)")
    g.add_argument("--recipe", choices=list(RECIPES), default="default",
                   help="; ".join(f"{name}: {r.help}" + (f" with {r.flags}" if r.flags else "")
                                  for name, r in RECIPES.items()))
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
    g = parser.add_argument_group("distribution matching (DMD2, recipes.dmd_losses): a refinement of the 1-step map")
    g.add_argument("--dmd-weight", type=float, help="lambda > 0: add lambda x the DMD loss of the student's 1-step "
                   "samples to the recipe's loss, with a fake denoiser (a trained copy of the teacher) learning "
                   "those samples; 0: off [default recipe: 0; one-step recipe: "
                   f"{RECIPES['one-step'].flags['dmd_weight']}]")
    g.add_argument("--dmd-start", type=int, default=0, help="the optimizer step from which the DMD loss is on "
                   "(default %(default)s)")
    g.add_argument("--fake-lr", type=float, help="the fake denoiser's AdamW learning rate (default: --lr)")
    g.add_argument("--dmd-guidance", type=float, help="the guidance of DMD's teacher (default: --w, the CD teacher's)")
    g = parser.add_argument_group("continuous-time consistency (--recipe scm / rcm; recipes.SCMConfig): the time "
                                  "distribution is --p-mean/--p-std, the teacher's guidance --w")
    g.add_argument("--tangent-warmup", type=int, help="steps over which the tangent's second term ramps in "
                   "(default: --steps, the whole run: on the lab a ramp over a tenth of 300 steps broke the student, "
                   "BENCHMARKS.md)")
    g.add_argument("--jvp", choices=JVP_MODES, default="forward", help="dF/dt along the teacher's ODE: forward-mode "
                   "autodiff (exact; attention on the math SDPA backend) or a central finite difference (two float32 "
                   "forwards; any attention kernel) (default %(default)s)")
    g.add_argument("--scm-weighting", choices=("adaptive", "uniform"), default="adaptive",
                   help="sCM's learned adaptive weighting or none (default %(default)s)")


def cd_config_from_args(args: argparse.Namespace) -> CDConfig:
    """CDConfig of the --recipe with every CD flag that was given (--w-min/--w-max: guidance_range)."""
    fields = [f.name for f in dataclasses.fields(CDConfig) if f.name != "guidance_range"]
    overrides = {**RECIPES[args.recipe].cd, **{k: getattr(args, k) for k in fields if getattr(args, k) is not None}}
    if (args.w_min is None) != (args.w_max is None):
        raise UserError("--w-min and --w-max go together")
    if args.w_min is not None:
        overrides["guidance_range"] = (args.w_min, args.w_max)
    return CDConfig(**overrides)


def step_config_from_args(args: argparse.Namespace, cd: CDConfig, edm: EDMConfig) -> StepConfig:
    scm = SCMConfig(tangent_warmup=args.steps if args.tangent_warmup is None else args.tangent_warmup,
                    adaptive=args.scm_weighting == "adaptive", jvp=args.jvp)
    return StepConfig(cd, edm, args.steps if args.curriculum else 0, args.dmd_weight, args.dmd_start,
                      args.dmd_guidance, scm)


# ----------------------------------------------------------------------------------------------------------------
# Networks, optimizer, memory
# ----------------------------------------------------------------------------------------------------------------

def enable_grad_checkpointing(dit: torch.nn.Module) -> None:
    """Recompute every transformer block (patch mixer and backbone) in the backward pass (torch.utils.checkpoint),
    a DiT with LoRA adapters with the adapter of the block's forward (`lora.recompute_context`)."""
    blocks = dit.transformer_blocks()
    context = dict(context_fn=recompute_context(dit)) if lora_layers(dit) else {}
    for block in blocks:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False,
                                          **context)


def new_student(preset: Preset, teacher: Optional[str], cd: CDConfig) -> nn.Module:
    """A full student as it starts: the teacher's DiT, float32 on the CPU, with a zero-initialised guidance embedder
    for a w-conditioned one (cd.guidance_range)."""
    dit = build_dit(preset, teacher)
    if cd.guidance_range is not None:
        dit.add_guidance_embedder()
    return dit


def fully_shard_dit(dit: nn.Module, mesh: DeviceMesh) -> None:
    """FSDP (Zhao et al. 2023, arXiv 2304.11277) through PyTorch's FSDP2 `fully_shard`: every transformer block
    (patch mixer and backbone) and then the rest of `dit` sharded over the mesh's processes, each holding 1/N of
    every parameter (a DTensor) and all-gathering one block's weights for its forward and backward."""
    for block in dit.transformer_blocks():
        fully_shard(block, mesh=mesh)
    fully_shard(dit, mesh=mesh)


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
    """({"student", "target", "ema", "fake", "weighting"}: the student initialised from the teacher, its EMA
    target (None for target_decay 0), slow EMA (None for --ema 0), DMD fake denoiser (None for --dmd-weight 0) and
    sCM's adaptive weighting (None but for --recipe scm/rcm with --scm-weighting adaptive)), the AdamW optimizer
    (the student's and the weighting's parameters, then the fake's in a second group at --fake-lr) and its
    schedule.

    Full student: a float32 copy of the teacher on `device`; the target, slow EMA and fake are copies of it. LoRA
    student (--lora-rank): `lora.Adapter`s on the teacher's DiT (the fake a second trainable adapter, starting as
    the teacher), and pipe.dit becomes the adapter-free one (the teacher)."""
    seed_everything(args.seed)  # a new guidance embedder or the LoRA A factors are drawn from it
    if args.lora_rank:
        names = ["student"] + [n for n, on in (("target", cd.target_decay > 0), ("ema", args.ema > 0),
                                               ("fake", args.dmd_weight > 0)) if on]
        base = pipe.dit
        adapters = add_adapters(base, names, args.lora_rank, args.lora_alpha, trainable=("student", "fake"))
        pipe.dit = adapters[None]  # the pipeline (validation, teacher passes) keeps sampling the teacher
        nets = {k: adapters.get(k) for k in ("student", "target", "ema", "fake")}
    else:
        base = new_student(pipe.preset, args.teacher, cd).to(device).train()
        nets = dict(student=base, target=frozen_copy(base) if cd.target_decay > 0 else None,
                    ema=frozen_copy(base) if args.ema > 0 else None,
                    fake=copy.deepcopy(base).requires_grad_(True) if args.dmd_weight > 0 else None)
    adaptive = RECIPES[args.recipe].losses is scm_losses and args.scm_weighting == "adaptive"
    nets["weighting"] = AdaptiveWeighting().to(device) if adaptive else None
    student = nets["student"]
    if args.grad_checkpointing:
        for net in (base, None if args.lora_rank else nets["fake"]):
            if net is not None:
                enable_grad_checkpointing(net)
    if args.fsdp:  # before the optimizer: sharding replaces the parameters
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
        for key in ("student", "target", "ema", "fake"):
            if nets[key] is not None:
                fully_shard_dit(nets[key], mesh)
    groups = [{"params": list(student.parameters())
               + (list(nets["weighting"].parameters()) if nets["weighting"] is not None else [])}]
    if nets["fake"] is not None:
        groups.append({"params": list(nets["fake"].parameters()), "lr": args.fake_lr})
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, args.warmup, args.steps, args.lr_schedule))
    return nets, optimizer, scheduler


def state_bytes(base_params: int, trained_params: int, teacher_dtype: torch.dtype, averages: int,
                fake: bool = False, shards: int = 1) -> int:
    """Bytes per device of a run's networks and optimizer state: the teacher in its dtype, and per trained parameter
    (the full student's or the LoRA factors) fp32 weights 4 + gradients 4 + AdamW moments 8, + 4 per weight average
    (EMA target, slow EMA), + 16 for DMD's fake denoiser (a trained copy of the student, or a second adapter); with
    FSDP over `shards` processes the trained part is divided among them (the teacher stays whole on each). The
    activations (bench_memory.py counts them), text encoder and VAE come on top."""
    trained = trained_params * (16 + 4 * averages + (16 if fake else 0))
    return base_params * torch.finfo(teacher_dtype).bits // 8 + -(-trained // shards)


def available_memory_gib(device: torch.device) -> float:
    """Free memory of a CUDA device, or the system's available memory (MemAvailable) for the CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**30
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) / 2**20  # kB


def check_memory(args: argparse.Namespace, cd: CDConfig, device: torch.device, world: int = 1) -> None:
    """Refuse, before any expensive work, a run whose networks and optimizer state alone (`state_bytes`) do not fit
    in the device's free memory (on the CPU the kernel would otherwise kill the run without a message), naming
    the flags with which they would."""
    preset = get_preset(args.preset)
    with torch.device("meta"):  # shapes only: nothing is allocated
        dit = getattr(microdit, preset.dit_arch)(**preset.dit_kwargs)
    base = sum(p.numel() for p in dit.parameters())

    def adapter_params(rank: int) -> int:
        name = f"rank_{rank}"
        return sum(p.numel() for p in add_adapters(dit, [name], rank, float(rank))[name].parameters())

    trained = adapter_params(args.lora_rank) if args.lora_rank else base
    averages = (cd.target_decay > 0) + (args.ema > 0)
    dmd, shards = args.dmd_weight > 0, world if args.fsdp else 1

    def gib(trained_params: int, dmd: bool = dmd, shards: int = shards, averages: int = averages) -> float:
        return state_bytes(base, trained_params, DTYPES[args.dtype], averages, dmd, shards) / 2**30

    need, have = gib(trained), available_memory_gib(device)
    if need <= have:
        return
    options = [(f"--fsdp (over these {world} processes)", gib(base, shards=world))
               if world > 1 and not args.fsdp and not args.lora_rank else None,
               ("--lora-rank 32", gib(adapter_params(32), shards=1)) if args.lora_rank != 32 else None,
               ("--dmd-weight 0", gib(trained, dmd=False)) if dmd else None,
               ("--ema 0", gib(trained, averages=averages - 1)) if args.ema > 0 else None]
    fits = [f"{flag} ({size:.1f} GiB)" for flag, size in filter(None, options) if size <= have]
    kind = f"LoRA rank {args.lora_rank}" if args.lora_rank else "full"
    raise UserError(f"the {kind} student of {preset.name} needs {need:.1f} GiB for its networks and optimizer state "
                    f"alone ({base / 1e6:.0f}M teacher parameters in {args.dtype}, {trained / 1e6:.1f}M trained with "
                    f"AdamW, {averages} weight average(s){' and a DMD fake denoiser' if dmd else ''}) and {device} "
                    f"has {have:.1f} GiB free: "
                    + (f"it would fit with {' or '.join(fits)}" if fits else "train on a device with more memory"))
