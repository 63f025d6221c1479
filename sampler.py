"""Samplers: the teacher's EDM Heun loop (official MicroDiT numerics)."""
import torch

from cd_utils import EDM, EDMConfig, ModelFwd, edm_forward, get_sigmas, heun_step


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
