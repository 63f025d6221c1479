"""Test-only toy world for consistency distillation: an exact 2-D Gaussian-mixture teacher and an MLP student.

`GMMTeacher` wraps the closed-form EDM denoiser D(x; sigma) = E[x0 | x0 + sigma eps = x] of a class-conditional
Gaussian mixture behind the DiT.forward signature, so `edm_sample`, `teacher_ode_step` and `cd_loss` run on it
unchanged. Latents are (B, 2); captions are one-hot class vectors y (B, n_classes), all-zero = unconditional.
"""
import math
from typing import Optional

import torch
from torch import nn

from cd_utils import EDM, EDMConfig, edm_scalings


class GaussianMixture:
    """Isotropic-per-mode mixture: means (K, D), stds (K,), weights (K,) (normalised), all float64."""

    def __init__(self, means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor) -> None:
        self.means = means.double()
        self.stds = stds.double()
        self.weights = weights.double() / weights.sum()

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """E[x0 | x] for x (B, D) at noise level sigma (B,), float64: posterior-weighted per-mode Wiener means."""
        x, sigma2 = x.double(), sigma.double().reshape(-1, 1) ** 2
        var = self.stds**2  # (K,)
        total = var + sigma2  # (B, K): marginal variance of mode k at this sigma
        sq = (x[:, None, :] - self.means).square().sum(-1)  # (B, K)
        logp = self.weights.log() - 0.5 * x.shape[1] * total.log() - 0.5 * sq / total
        resp = logp.softmax(dim=1)
        mode_mean = (var[:, None] * x[:, None, :] + sigma2[..., None] * self.means) / total[..., None]
        return (resp[..., None] * mode_mean).sum(1)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * eps


def four_modes() -> tuple[list[GaussianMixture], GaussianMixture]:
    """Four modes on a circle of radius 1.2 (45, 135, 225, 315 deg) shared by two classes with different weights.

    Class c puts 0.55 on mode c and 0.15 on each other mode; the unconditional mixture is their average, so
    guidance (w > 1) moves most of a class's mass into its own mode: the guided map depends strongly on w.
    """
    angles = torch.tensor([45.0, 135.0, 225.0, 315.0], dtype=torch.float64) * math.pi / 180
    means = 1.2 * torch.stack([angles.cos(), angles.sin()], 1)
    stds = torch.tensor([0.08, 0.15, 0.12, 0.2], dtype=torch.float64)
    weights = [torch.tensor([0.55, 0.15, 0.15, 0.15]), torch.tensor([0.15, 0.55, 0.15, 0.15])]
    per_class = [GaussianMixture(means, stds, w) for w in weights]
    return per_class, GaussianMixture(means, stds, sum(weights))


class GMMTeacher:
    """Exact EDM teacher with the DiT.forward signature: F = (D - c_skip x) / c_out of the mixture for each row's y.

    cfg != 1 is done as the DiT does it: one call over cat([x, x]), cat([y, 0]), then F_u + cfg (F_c - F_u).
    `calls` counts invocations.
    """

    def __init__(self, edm_config: EDMConfig = EDM) -> None:
        self.per_class, self.uncond = four_modes()
        self.edm_config = edm_config
        self.calls = 0

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Exact D(x; sigma | y), x (B, 2), sigma (B,), y (B, n_classes) one-hot or zero; float64."""
        y = y.flatten(1)
        out = self.uncond.denoise(x, sigma)
        for c, mix in enumerate(self.per_class):
            out = torch.where(y[:, c, None] > 0, mix.denoise(x, sigma), out)
        return out

    def __call__(
        self, x_in: torch.Tensor, c_noise: torch.Tensor, y: torch.Tensor, cfg: float = 1.0,
        guidance: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        self.calls += 1
        B = x_in.shape[0]
        if cfg != 1.0:
            c_noise = c_noise.expand(B)
            f_cond, f_uncond = self.raw(
                torch.cat([x_in, x_in]), torch.cat([c_noise, c_noise]), torch.cat([y, torch.zeros_like(y)])
            ).chunk(2)
            return f_uncond + cfg * (f_cond - f_uncond)
        return self.raw(x_in, c_noise, y)

    def raw(self, x_in: torch.Tensor, c_noise: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sigma = (4 * c_noise.double()).exp().expand(x_in.shape[0])
        c_skip, c_out, c_in, _ = (c[:, None] for c in edm_scalings(sigma, self.edm_config.sigma_data))
        x = x_in.double() / c_in
        return ((self.denoise(x, sigma, y) - c_skip * x) / c_out).to(x_in.dtype)


def fourier(t: torch.Tensor, n_freq: int) -> torch.Tensor:
    """(B,) -> (B, 2 n_freq) sin/cos features at frequencies 2^0 .. 2^(n_freq-1)."""
    arg = t.float()[:, None] * (2.0 ** torch.arange(n_freq, device=t.device))
    return torch.cat([arg.sin(), arg.cos()], 1)


class MLPDenoiser(nn.Module):
    """A small DiT stand-in with its signature: F = MLP([x_in, fourier(c_noise), y]) (+ optional w embedding).

    `add_guidance_embedder()` adds a zero-initialised embedding of w added to the first hidden layer, like
    `dit.add_guidance_embedder()`; `forward(..., guidance=w)` uses it. cfg != 1 batches cond/uncond like the DiT.
    """

    def __init__(self, dim: int = 2, y_dim: int = 2, hidden: int = 128, n_freq: int = 6) -> None:
        super().__init__()
        self.n_freq = n_freq
        self.inp = nn.Linear(dim + 2 * n_freq + y_dim, hidden)
        self.body = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, dim),
        )
        self.guidance_embedder: Optional[nn.Module] = None

    def add_guidance_embedder(self) -> None:
        hidden = self.inp.out_features
        self.guidance_embedder = nn.Sequential(nn.Linear(2 * self.n_freq, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        nn.init.zeros_(self.guidance_embedder[2].weight)
        nn.init.zeros_(self.guidance_embedder[2].bias)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg: float = 1.0,
        guidance: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if cfg != 1.0:
            t = t.expand(x.shape[0])
            f_cond, f_uncond = self.forward(
                torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.zeros_like(y)])
            ).chunk(2)
            return f_uncond + cfg * (f_cond - f_uncond)
        h = self.inp(torch.cat([x, fourier(t.expand(x.shape[0]), self.n_freq), y.flatten(1)], 1))
        if guidance is not None:
            h = h + self.guidance_embedder(fourier(guidance.float() / 4, self.n_freq))
        return self.body(h)


def fit_denoiser(
    model: MLPDenoiser, teacher: GMMTeacher, steps: int, batch: int = 512, lr: float = 3e-3, seed: int = 0,
    uncond_prob: float = 0.2,
) -> MLPDenoiser:
    """Regress the model's F onto the teacher's exact F (the 'teacher weights' a student starts from).

    x0 from the class mixtures (a fraction `uncond_prob` unconditional), ln sigma uniform over [sigma_min, sigma_max]
    half the time and ~ N(P_mean, P_std^2) otherwise.
    """
    g = torch.Generator().manual_seed(seed)
    edm = teacher.edm_config
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    lo, hi = math.log(edm.sigma_min), math.log(edm.sigma_max)
    for _ in range(steps):
        x0, y = sample_data(teacher, batch, g, uncond_prob)
        u = torch.rand(batch, generator=g)
        lognormal = edm.P_mean + edm.P_std * torch.randn(batch, generator=g)
        log_sigma = torch.where(torch.rand(batch, generator=g) < 0.5, lo + (hi - lo) * u, lognormal)
        sigma = log_sigma.exp()
        x = x0 + sigma[:, None] * torch.randn(x0.shape, generator=g)
        _, _, c_in, c_noise = edm_scalings(sigma, edm.sigma_data)
        x_in = c_in[:, None] * x
        loss = (model(x_in, c_noise, y) - teacher(x_in, c_noise, y)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model


def sample_data(
    teacher: GMMTeacher, batch: int, generator: torch.Generator, uncond_prob: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean samples x0 (batch, 2) float32 with their one-hot labels y (batch, 2) (zero rows: unconditional)."""
    labels = torch.randint(0, len(teacher.per_class), (batch,), generator=generator)
    y = nn.functional.one_hot(labels, len(teacher.per_class)).float()
    y = y * (torch.rand(batch, 1, generator=generator) >= uncond_prob)
    x0 = teacher.uncond.sample(batch, generator)
    for c, mix in enumerate(teacher.per_class):
        x0 = torch.where(y[:, c, None] > 0, mix.sample(batch, generator), x0)
    return x0.float(), y


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_proj: int = 128, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between equal-size point sets a, b (n, D), random directions from `seed`."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], n_proj, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = (a.double() @ dirs).sort(0).values, (b.double() @ dirs).sort(0).values
    return (pa - pb).abs().mean().item()
