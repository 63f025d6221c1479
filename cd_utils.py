"""EDM noise schedule and preconditioning (Karras et al. 2022, arXiv 2206.00364) as MicroDiT uses them.

All functions take latents of any shape (B, ...) and caption embeddings of any shape (B, ...).
Noise levels `sigma` are in latent units (the std of the Gaussian noise added to a latent).
"""
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

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
    sigma = torch.as_tensor(sigma, device=x.device).to(x.dtype)
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
    B = x0.shape[0]
    shape = (B,) + (1,) * (x0.ndim - 1)
    draw = dict(generator=generator, device=x0.device, dtype=x0.dtype)
    sigma = (torch.randn(shape, **draw) * edm_config.P_std + edm_config.P_mean).exp()
    noise = torch.randn(x0.shape, **draw)
    keep = (torch.rand((B,) + (1,) * (y.ndim - 1), **draw) >= cap_drop_prob).to(y.dtype)
    weight = (sigma**2 + edm_config.sigma_data**2) / (sigma * edm_config.sigma_data) ** 2
    denoised = edm_forward(x0 + sigma * noise, sigma, y * keep, model_fwd, edm_config)
    return (weight * (denoised - x0) ** 2).mean()
