"""EDM noise schedule and preconditioning (Karras et al. 2022, arXiv 2206.00364) as MicroDiT uses them, and the
consistency-distillation step built on them (parameterisation, teacher ODE step, CDConfig, cd_loss, ema_update).

All functions take latents of any shape (B, ...) and caption embeddings of any shape (B, ...).
Noise levels `sigma` are in latent units (the std of the Gaussian noise added to a latent).
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from utils import UserError

# model_fwd(x_in, c_noise, y, cfg=...) -> raw network output F, the signature of `DiT.forward`.
ModelFwd = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class EDMConfig:
    """MicroDiT's EDM constants (micro_diffusion/models/model.py). sigma_data = 0.9 for SDXL-VAE latents."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.9
    rho: float = 7.0
    P_mean: float = -0.6  # training noise: ln(sigma) ~ N(P_mean, P_std^2)
    P_std: float = 1.2


EDM = EDMConfig()


def get_sigmas(
    num_steps: int,
    sigma_min: float = EDM.sigma_min,
    sigma_max: float = EDM.sigma_max,
    rho: float = EDM.rho,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """Karras et al. (2022) eq. 5 discretisation: (num_steps,) float64, descending from sigma_max to sigma_min.

    No trailing zero; computed with the power formula exactly as the official sampler does.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps == 1:
        return torch.tensor([sigma_max], dtype=torch.float64, device=device)
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + i / (num_steps - 1) * (lo - hi)) ** rho


def _as_batch_sigma(sigma: Union[float, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """sigma (scalar, 0-d, (1,) or (B,)) -> x.dtype tensor of shape (B or 1, 1, ..., 1) broadcasting against x."""
    if not isinstance(sigma, torch.Tensor):
        sigma = torch.tensor(sigma, dtype=x.dtype)  # a Python float is not rounded to float32 first
    sigma = sigma.to(device=x.device, dtype=x.dtype)
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def edm_scalings(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """EDM preconditioning (Karras et al. 2022, Table 1): c_skip, c_out, c_in, c_noise; c_noise = ln(sigma)/4."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def edm_forward(
    x: torch.Tensor,
    sigma: Union[float, torch.Tensor],
    y: torch.Tensor,
    model_fwd: ModelFwd,
    edm_config: EDMConfig = EDM,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Denoised latents D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, y), in x's dtype and shape.

    x: (B, ...) noisy latents; sigma: scalar, (1,) or (B,); y: caption embeddings (B, ...).
    guidance_scale != 1 is passed to `model_fwd` as `cfg`; guidance on F equals guidance on D because the
    c_skip x term is shared by both branches. The operation order matches the official wrapper bit for bit.
    """
    sigma = _as_batch_sigma(sigma, x)
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma, edm_config.sigma_data)
    F = model_fwd((c_in * x).to(x.dtype), c_noise.flatten(), y, cfg=guidance_scale)
    return c_skip * x + c_out * F


def heun_step(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigma_cur: torch.Tensor,
    sigma_next: torch.Tensor,
    second_order: bool = True,
) -> torch.Tensor:
    """One step of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma from sigma_cur to sigma_next.

    Euler, plus Heun's correction when `second_order` (Karras et al. 2022, Algorithm 1 lines 5-8; it needs
    sigma_next > 0). `denoise(x, sigma) -> D`; the sigmas are 0-d tensors or shaped to broadcast against x (B, ...).
    """
    d_cur = (x - denoise(x, sigma_cur)) / sigma_cur
    x_next = x + (sigma_next - sigma_cur) * d_cur
    if second_order:
        d_prime = (x_next - denoise(x_next, sigma_next)) / sigma_next
        x_next = x + (sigma_next - sigma_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def training_noise(
    x0: torch.Tensor, edm_config: EDMConfig = EDM, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's training noise for clean latents x0 (B, ...): ln sigma ~ N(P_mean, P_std^2) per sample, then
    eps ~ N(0, I), in that order from `generator`. Returns (sigma (B, 1, ..., 1), x0 + sigma eps)."""
    draw = dict(generator=generator, device=x0.device, dtype=x0.dtype)
    sigma = (torch.randn((x0.shape[0],) + (1,) * (x0.ndim - 1), **draw) * edm_config.P_std + edm_config.P_mean).exp()
    return sigma, x0 + sigma * torch.randn(x0.shape, **draw)


def edm_loss(
    model_fwd: ModelFwd,
    x0: torch.Tensor,
    y: torch.Tensor,
    edm_config: EDMConfig = EDM,
    cap_drop_prob: float = 0.1,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """The teacher's denoising loss (Karras et al. 2022, eq. 2 with weighting lambda of Table 1).

    ln sigma ~ N(P_mean, P_std^2) per sample; a fraction `cap_drop_prob` of captions is zeroed, which is the
    unconditional input that classifier-free guidance uses. Returns a scalar.
    """
    sigma, x_noisy = training_noise(x0, edm_config, generator)
    keep = (torch.rand((x0.shape[0],) + (1,) * (y.ndim - 1), generator=generator, device=x0.device, dtype=x0.dtype)
            >= cap_drop_prob).to(y.dtype)
    weight = (sigma**2 + edm_config.sigma_data**2) / (sigma * edm_config.sigma_data) ** 2
    denoised = edm_forward(x_noisy, sigma, y * keep, model_fwd, edm_config)
    return (weight * (denoised - x0) ** 2).mean()


# --------------------------------------------------------------------------------------------------------------
# Consistency distillation (CD): Song et al. 2023 (CM, arXiv 2303.01469), Song & Dhariwal 2023 (iCT,
# arXiv 2310.14189), Luo et al. 2023 (LCM, arXiv 2310.04378). The student is f(x, sigma) -> clean latents with
# f(x, sigma_min) = x; it is trained so that f(x_{n+k}, sigma_{n+k}) matches the target network's
# f(x_n, sigma_n), where x_n is the teacher's ODE step from x_{n+k}.
# --------------------------------------------------------------------------------------------------------------

SOLVERS = ("heun", "euler")
LOSSES = ("pseudo_huber", "pseudo_huber_elementwise", "l2")
WEIGHTINGS = ("uniform", "inverse_gap")
INDEX_DISTS = ("uniform", "lognormal")


def consistency_scalings(sigma: torch.Tensor, edm_config: EDMConfig = EDM) -> tuple[torch.Tensor, ...]:
    """CM boundary-condition preconditioning (Song et al. 2023, Appendix C): c_skip, c_out, c_in, c_noise.

    c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2), c_out = sd (sigma - sigma_min) / sqrt(sd^2 + sigma^2); c_in
    and c_noise are EDM's, so the student reads its input exactly as the teacher does. At sigma == sigma_min
    (same dtype) c_skip is exactly 1 and c_out exactly 0.
    """
    sd = edm_config.sigma_data
    _, _, c_in, c_noise = edm_scalings(sigma, sd)
    offset = sigma - torch.full_like(sigma, edm_config.sigma_min)  # sigma_min rounded like sigma: exactly 0 there
    c_skip = sd**2 / (offset**2 + sd**2)
    c_out = sd * offset / (sd**2 + sigma**2).sqrt()
    return c_skip, c_out, c_in, c_noise


def consistency_forward(
    x: torch.Tensor,
    sigma: Union[float, torch.Tensor],
    y: torch.Tensor,
    model_fwd: ModelFwd,
    edm_config: EDMConfig = EDM,
    **model_kwargs,
) -> torch.Tensor:
    """The consistency function f(x, sigma) = c_skip x + c_out F(c_in x, c_noise, y), in x's dtype and shape.

    x: (B, ...) noisy latents; sigma: scalar, (1,) or (B,); y: caption embeddings (B, ...). `model_fwd` is called
    without cfg (cfg = 1); `model_kwargs` go to it as is, e.g. `guidance=w` (B,) for a w-conditioned student.
    f(x, sigma_min) == x exactly (for finite F) when sigma is a Python float or a tensor in x's dtype or wider.
    """
    sigma = _as_batch_sigma(sigma, x)
    c_skip, c_out, c_in, c_noise = consistency_scalings(sigma, edm_config)
    F = model_fwd((c_in * x).to(x.dtype), c_noise.flatten().expand(x.shape[0]), y, **model_kwargs)
    return c_skip * x + c_out * F


def guided_edm_forward(
    x: torch.Tensor,
    sigma: Union[float, torch.Tensor],
    y: torch.Tensor,
    model_fwd: ModelFwd,
    edm_config: EDMConfig = EDM,
    guidance_scale: Union[float, torch.Tensor] = 1.0,
) -> torch.Tensor:
    """Classifier-free guided denoiser D_w = D_u + w (D_c - D_u), uncond = all-zero caption embedding.

    A scalar w (float or 0-d tensor) goes through the model's own cfg (`edm_forward(..., guidance_scale=w)`, the
    DiT batches both branches). A per-sample w (B,) runs one cfg = 1 call on cat([x, x]), cat([y, 0]) and mixes
    the two denoised halves here; both give the same D (guidance on F equals guidance on D).
    """
    if not (isinstance(guidance_scale, torch.Tensor) and guidance_scale.ndim > 0):
        return edm_forward(x, sigma, y, model_fwd, edm_config, guidance_scale=float(guidance_scale))
    sigma = _as_batch_sigma(sigma, x)
    sigma2 = sigma if sigma.shape[0] == 1 else torch.cat([sigma, sigma])
    d_cond, d_uncond = edm_forward(
        torch.cat([x, x]), sigma2, torch.cat([y, torch.zeros_like(y)]), model_fwd, edm_config
    ).chunk(2)
    w = guidance_scale.to(device=x.device, dtype=d_cond.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return d_uncond + w * (d_cond - d_uncond)


def teacher_ode_step(
    teacher_fwd: ModelFwd,
    x: torch.Tensor,
    sigma_from: Union[float, torch.Tensor],
    sigma_to: Union[float, torch.Tensor],
    y: torch.Tensor,
    guidance_scale: Union[float, torch.Tensor] = 1.0,
    solver: str = "heun",
    edm_config: EDMConfig = EDM,
) -> torch.Tensor:
    """The teacher's guided probability-flow ODE step x(sigma_from) -> x(sigma_to), both > 0.

    solver 'heun' is the teacher's own sampler step (`heun_step`, 2 guided calls), 'euler' is 1 call. Sigmas are
    scalars or (B,); guidance_scale is a float or (B,) (see `guided_edm_forward`). Runs in x's dtype (and the
    caller's autocast); call it under torch.no_grad() for distillation.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")

    def denoise(x_: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return guided_edm_forward(x_, sigma, y, teacher_fwd, edm_config, guidance_scale)

    s_from, s_to = _as_batch_sigma(sigma_from, x), _as_batch_sigma(sigma_to, x)
    return heun_step(denoise, x, s_from, s_to, second_order=solver == "heun")


@dataclass(frozen=True)
class CDConfig:
    """Every option of a consistency-distillation step; the field defaults are the project's recipe.

    The discretisation is `cd_sigmas(num_scales)`: N Karras points between the EDMConfig's sigma_min and
    sigma_max, indexed ASCENDING (sigma_0 = sigma_min, sigma_{N-1} = sigma_max). A step draws n in [0, N-1-skip],
    the student sees sigma_{n+skip}, the teacher steps down to sigma_n and the target sees sigma_n.

    The defaults were chosen on the Gaussian-mixture distillation (tests/test_cd.py), then on the shapes lab:
    BENCHMARKS.md, "Consistency distillation on an exact teacher" and "Choosing the recipe on the shapes lab".
    """

    num_scales: int = 40  # N
    skip: int = 2  # k >= 1: one teacher step spans k intervals (LCM's skipping-step)
    solver: str = "heun"  # teacher ODE solver: 'heun' (2 teacher calls) or 'euler' (1)
    target_decay: float = 0.95  # mu of the EMA target; 0 = the online student under no_grad (iCT)
    loss: str = "pseudo_huber"  # one of LOSSES, see `consistency_distance`
    huber_c: Optional[float] = None  # None: 0.00054 sqrt(dim) (iCT) for 'pseudo_huber', 0.001 (LCM) elementwise
    weighting: str = "uniform"  # lambda(sigma_n): 'uniform' or 'inverse_gap' = 1 / (sigma_{n+k} - sigma_n)
    index_dist: str = "lognormal"  # 'lognormal': iCT's lognormal mass over [sigma_n, sigma_{n+k}], or 'uniform'
    p_mean: float = -1.1  # lognormal index distribution: ln sigma ~ N(p_mean, p_std^2) (iCT values)
    p_std: float = 2.0
    guidance: float = 5.0  # fixed teacher cfg scale w (used when guidance_range is None)
    guidance_range: Optional[tuple[float, float]] = None  # (w_min, w_max): w ~ U per sample, student gets w

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(f"CDConfig: {msg}")

        check(self.num_scales >= 2, f"num_scales must be >= 2, got {self.num_scales}")
        check(1 <= self.skip < self.num_scales, f"skip must be in [1, num_scales - 1], got {self.skip}")
        check(self.solver in SOLVERS, f"solver must be one of {SOLVERS}, got {self.solver!r}")
        check(0.0 <= self.target_decay < 1.0, f"target_decay must be in [0, 1), got {self.target_decay}")
        check(self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}")
        check(self.huber_c is None or self.huber_c > 0, f"huber_c must be > 0, got {self.huber_c}")
        check(self.weighting in WEIGHTINGS, f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        check(self.index_dist in INDEX_DISTS, f"index_dist must be one of {INDEX_DISTS}, got {self.index_dist!r}")
        check(self.p_std > 0, f"p_std must be > 0, got {self.p_std}")
        if self.guidance_range is not None:
            check(len(self.guidance_range) == 2 and self.guidance_range[0] <= self.guidance_range[1],
                  f"guidance_range must be (w_min, w_max) with w_min <= w_max, got {self.guidance_range}")



# The seed recipe, as overrides of CDConfig: one Euler teacher step between adjacent Karras points (k = 1), target =
# the online student without gradient (mu = 0), elementwise pseudo-Huber with c = 0.001 (LCM), uniform n and lambda.
SEED_RECIPE = dict(skip=1, solver="euler", target_decay=0.0, loss="pseudo_huber_elementwise", huber_c=0.001,
                   weighting="uniform", index_dist="uniform")


def curriculum_scales(step: int, total_steps: int, num_scales: int, stages: int = 3) -> int:
    """iCT's discretisation curriculum (Song & Dhariwal 2023, sec. 3.4): N doubles in `stages` equal parts of the
    run up to `num_scales`, N(step) = max(2, num_scales // 2^(stages - 1 - stage)): 10, 20, 40 for N = 40. Coarse
    early steps carry the boundary condition up the chain in fewer links; the fine ones remove their bias."""
    stage = min(stages - 1, step * stages // max(1, total_steps))
    return max(2, num_scales // 2 ** (stages - 1 - stage))


def teacher_calls(cfg: CDConfig) -> int:
    """Teacher network passes per sample in one CD step (`teacher_ode_step`): 2 (Heun) or 1 (Euler) calls, x2
    for the conditional and unconditional branches of a guided teacher."""
    guided = cfg.guidance_range is not None or cfg.guidance != 1.0
    return (2 if cfg.solver == "heun" else 1) * (2 if guided else 1)


def cd_sigmas(
    num_scales: int, edm_config: EDMConfig = EDM, device: Optional[Union[str, torch.device]] = None
) -> torch.Tensor:
    """The CD discretisation: `get_sigmas(num_scales)` in ASCENDING order, (N,) float64, sigma_min ... sigma_max.

    sigma_0 is set to exactly sigma_min (the power formula lands an ulp off), so targets at n = 0 are exactly x_0.
    """
    sigmas = get_sigmas(num_scales, edm_config.sigma_min, edm_config.sigma_max, edm_config.rho, device).flip(0)
    sigmas[0] = edm_config.sigma_min
    return sigmas


def sample_cd_indices(
    sigmas: torch.Tensor, cfg: CDConfig, batch: int, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Draw n (batch,) int64 in [0, N-1-k] over ascending `sigmas` (N,).

    'uniform', or 'lognormal' (iCT sec. 3.5): p(n) ∝ erf((ln sigma_{n+k} - P_mean) / (sqrt2 P_std))
    - erf((ln sigma_n - P_mean) / (sqrt2 P_std)), the lognormal's mass on [sigma_n, sigma_{n+k}] (k = 1 in iCT).
    """
    num, k = sigmas.shape[0] - cfg.skip, cfg.skip
    if cfg.index_dist == "uniform":
        return torch.randint(0, num, (batch,), generator=generator, device=sigmas.device)
    cdf = torch.erf((sigmas.log() - cfg.p_mean) / (math.sqrt(2.0) * cfg.p_std))
    return torch.multinomial(cdf[k:] - cdf[:num], batch, replacement=True, generator=generator)


def sample_guidance(
    cfg: CDConfig, batch: int, device: Union[str, torch.device], generator: Optional[torch.Generator] = None
) -> Union[float, torch.Tensor]:
    """The teacher's cfg scale: `cfg.guidance` (float), or w ~ U[w_min, w_max] per sample, (batch,) float32."""
    if cfg.guidance_range is None:
        return cfg.guidance
    w_min, w_max = cfg.guidance_range
    return w_min + (w_max - w_min) * torch.rand(batch, generator=generator, device=device)


def consistency_distance(f_student: torch.Tensor, f_target: torch.Tensor, cfg: CDConfig) -> torch.Tensor:
    """Per-sample distance (B,) between student and target outputs (B, ...), computed in float32.

    'pseudo_huber' (iCT): sqrt(||d||^2 + c^2) - c with ||d|| the L2 norm over the sample's elements,
    c = huber_c or 0.00054 sqrt(dim). 'pseudo_huber_elementwise' (LCM): mean_i sqrt(d_i^2 + c^2) - c,
    c = huber_c or 0.001. 'l2': mean_i d_i^2.
    """
    d = (f_student.float() - f_target.float()).flatten(1)
    if cfg.loss == "l2":
        return d.square().mean(1)
    if cfg.loss == "pseudo_huber":
        c = cfg.huber_c if cfg.huber_c is not None else 0.00054 * math.sqrt(d.shape[1])
        return (d.square().sum(1) + c**2).sqrt() - c
    c = cfg.huber_c if cfg.huber_c is not None else 0.001
    return ((d.square() + c**2).sqrt() - c).mean(1)


def ema_decay(decay: float, step: int) -> float:
    """An EMA's decay at optimizer step `step`, warmed up as min(decay, (1 + step) / (10 + step)) so that short
    runs are not dominated by the initial weights."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * source over parameters and floating buffers (others copied).

    decay = 0 copies source exactly. Both modules must have the same structure.
    """
    pairs = zip(
        [*target.parameters(), *target.buffers()], [*source.parameters(), *source.buffers()], strict=True
    )
    for t, s in pairs:
        if t.is_floating_point():
            t.lerp_(s.to(t.dtype), 1.0 - decay)
        else:
            t.copy_(s)


def cd_loss(
    student_fwd: ModelFwd,
    target_fwd: ModelFwd,
    teacher_fwd: ModelFwd,
    x0: torch.Tensor,
    y: torch.Tensor,
    cfg: CDConfig,
    edm_config: EDMConfig = EDM,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One consistency-distillation step's forward for a batch of clean latents x0 (B, ...) and captions y (B, ...).

    Draws n (`sample_cd_indices`), w (`sample_guidance`) and eps ~ N(0, I), in that order, all from `generator`
    (a torch.Generator on x0's device). x_{n+k} = x0 + sigma_{n+k} eps; the guided teacher steps it to x_n; the
    target gives f(x_n, sigma_n) and the student f(x_{n+k}, sigma_{n+k}). Teacher and target run under no_grad
    (in the caller's autocast). For target_decay = 0 pass the student itself as `target_fwd`. With
    `cfg.guidance_range` student and target get `guidance=w` (B,).
    Returns the scalar loss = mean_b lambda(sigma_n) d(f_student, f_target) (`consistency_distance`) and floats:
    loss, sigma (mean sigma_{n+k}), gap (mean |f_student - f_target| over all elements), w (mean guidance).
    """
    B, device = x0.shape[0], x0.device
    sigmas = cd_sigmas(cfg.num_scales, edm_config, device)
    n = sample_cd_indices(sigmas, cfg, B, generator)
    sigma_lo, sigma_hi = sigmas[n], sigmas[n + cfg.skip]
    w = sample_guidance(cfg, B, device, generator)
    net_kwargs = {} if cfg.guidance_range is None else {"guidance": w}
    eps = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    x_hi = x0 + _as_batch_sigma(sigma_hi, x0) * eps

    with torch.no_grad():
        x_lo = teacher_ode_step(teacher_fwd, x_hi, sigma_hi, sigma_lo, y, w, cfg.solver, edm_config)
        f_target = consistency_forward(x_lo, sigma_lo, y, target_fwd, edm_config, **net_kwargs)
    f_student = consistency_forward(x_hi, sigma_hi, y, student_fwd, edm_config, **net_kwargs)

    dist = consistency_distance(f_student, f_target, cfg)
    weight = 1.0 / (sigma_hi - sigma_lo) if cfg.weighting == "inverse_gap" else torch.ones_like(sigma_hi)
    loss = (weight.to(dist.dtype) * dist).mean()
    gap = (f_student.detach().float() - f_target.float()).abs().mean()
    w_mean = w.mean() if isinstance(w, torch.Tensor) else torch.tensor(float(w))
    values = torch.stack([v.detach().double().to(device) for v in (loss, sigma_hi.mean(), gap, w_mean)])
    return loss, dict(zip(("loss", "sigma", "gap", "w"), values.tolist()))  # one device sync
