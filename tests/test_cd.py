"""Consistency distillation: parameterisation, teacher step, CD loss options, sampler, and an exact-teacher
distillation run on a 2-D Gaussian mixture (tests/gmm.py)."""
import copy
import dataclasses
import math

import pytest
import torch

from cd_utils import (
    EDM, SEED_RECIPE, EDMConfig, CDConfig, cd_loss, cd_sigmas, consistency_distance, consistency_forward,
    consistency_scalings, curriculum_scales, edm_forward, edm_scalings, ema_update, get_sigmas,
    guided_edm_forward, sample_cd_indices, sample_guidance, teacher_ode_step,
)
import recipes
from recipes import AdaptiveWeighting, SCMConfig, dmd_loss, scm_loss, trigflow_F, trigflow_jvp
from gmm import GaussianMixture, GMMTeacher, MLPDenoiser, fit_denoiser, sample_data, sliced_wasserstein
from sampler import consistency_sample, consistency_sigmas, edm_sample, multistep_noise
from utils import UserError

W = 5.0  # the teacher's cfg scale in the GMM tests


class ToyNet(torch.nn.Module):
    """A DiT-signature network for any latent shape (B, ...) and caption shape (B, ...); records its calls."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.7 * scale))
        self.b = torch.nn.Parameter(torch.tensor(-0.3))
        self.calls: list[dict] = []

    def forward(self, x, t, y, cfg=1.0, guidance=None):
        self.calls.append(dict(batch=x.shape[0], t=t.detach().clone(), cfg=cfg, guidance=guidance))
        t = t.expand(x.shape[0]).reshape(-1, *([1] * (x.ndim - 1)))
        cap = y.flatten(1).mean(1).reshape(-1, *([1] * (x.ndim - 1)))
        out = torch.tanh(self.a * x + t) + self.b * cap
        if guidance is not None:
            out = out + 0.1 * guidance.reshape(-1, *([1] * (x.ndim - 1)))
        if cfg != 1.0:
            uncond = torch.tanh(self.a * x + t)
            out = uncond + cfg * (out - uncond)
        return out


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# Parameterisation and sampler
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, yshape", [((3, 4, 8, 8), (3, 1, 5, 6)), ((5, 7), (5, 3)), ((2, 3, 4, 6), (2, 2))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_boundary_condition_exact(shape, yshape, dtype):
    x, y = randn(*shape).to(dtype) * 3, randn(*yshape, seed=1)
    net = ToyNet(scale=50.0)
    sigma_min = cd_sigmas(10)[0]  # float64 tensor from the discretisation
    for sigma in (EDM.sigma_min, torch.tensor(EDM.sigma_min, dtype=dtype), sigma_min,
                  torch.full((shape[0],), EDM.sigma_min, dtype=dtype)):
        assert torch.equal(consistency_forward(x, sigma, y, net), x)
    # away from the boundary the network matters
    assert not torch.allclose(consistency_forward(x, 0.01, y, net), x, atol=1e-4)


def test_consistency_scalings_approach_edm_at_large_sigma():
    sigma = torch.tensor([EDM.sigma_min, 0.1, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = consistency_scalings(sigma)
    e_skip, e_out, e_in, e_noise = edm_scalings(sigma, EDM.sigma_data)
    assert c_skip[0] == 1 and c_out[0] == 0
    assert torch.equal(c_in, e_in) and torch.equal(c_noise, e_noise)
    torch.testing.assert_close(c_skip[2:], e_skip[2:], rtol=1e-2, atol=0)
    torch.testing.assert_close(c_out[2:], e_out[2:], rtol=1e-2, atol=0)


def test_consistency_forward_passes_kwargs_and_no_cfg():
    net = ToyNet()
    x, y, w = randn(4, 3, 2, 2), randn(4, 1, 2, 5), torch.tensor([1.0, 2.0, 3.0, 4.0])
    consistency_forward(x, 1.0, y, net, guidance=w)
    call = net.calls[-1]
    assert call["cfg"] == 1.0 and call["guidance"] is w and call["t"].shape == (4,)


def test_consistency_sample_one_step_is_one_call_at_sigma_max():
    net = ToyNet()
    noise, y = randn(3, 2, 4, 4), randn(3, 1, 3, 5)
    out = consistency_sample(net, noise, y)
    assert len(net.calls) == 1 and out.dtype == torch.float32 and out.shape == noise.shape
    torch.testing.assert_close((4 * net.calls[0]["t"]).exp(), torch.full((3,), EDM.sigma_max))
    expected = consistency_forward(noise * EDM.sigma_max, EDM.sigma_max, y, net)
    torch.testing.assert_close(out, expected)


def test_consistency_sample_multistep_schedule_and_determinism():
    net = ToyNet()
    noise, y = randn(3, 5), randn(3, 4)
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    out = consistency_sample(net, noise, y, num_steps=4, generator=gen())
    assert len(net.calls) == 4
    sigmas = [(4 * c["t"][0]).exp().item() for c in net.calls]
    expected = consistency_sigmas(4)
    assert expected.tolist() == sorted(expected.tolist(), reverse=True) and len(expected) == 4
    assert expected[0] == EDM.sigma_max and expected[-1] > EDM.sigma_min
    torch.testing.assert_close(torch.tensor(sigmas, dtype=torch.float64), expected, rtol=1e-5, atol=0)
    assert torch.equal(out, consistency_sample(net, noise, y, num_steps=4, generator=gen()))
    other = consistency_sample(net, noise, y, num_steps=4, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(out, other)


def test_consistency_sample_gamma():
    """gamma = 1 is CM Algorithm 1 (x0 re-noised with fresh noise); gamma = 0 uses no fresh noise."""
    net = ToyNet()
    noise, y, sigmas = randn(2, 3), randn(2, 4), [10.0, 1.0, 0.3]
    out = consistency_sample(net, noise, y, sigmas=sigmas, generator=torch.Generator().manual_seed(3), gamma=1.0)
    g = torch.Generator().manual_seed(3)
    x0 = consistency_forward(noise * 10.0, 10.0, y, net)
    for s in sigmas[1:]:
        x0 = consistency_forward(x0 + s * torch.randn(noise.shape, generator=g), s, y, net)
    torch.testing.assert_close(out, x0)
    det = [consistency_sample(net, noise, y, sigmas=sigmas, generator=torch.Generator().manual_seed(s), gamma=0.0)
           for s in (1, 2)]
    assert torch.equal(det[0], det[1])
    tcd = consistency_sample(net, noise, y, sigmas=sigmas, generator=torch.Generator().manual_seed(3), gamma=0.3)
    assert not torch.allclose(tcd, out) and not torch.allclose(tcd, det[0])
    with pytest.raises(ValueError):
        consistency_sample(net, noise, y, sigmas=[1.0, 2.0])
    with pytest.raises(ValueError):
        consistency_sample(net, noise, y, sigmas=sigmas, gamma=1.5)


def test_consistency_sample_step_noise_is_per_image():
    """Given per-image step noise (`multistep_noise`), image i does not depend on the batch it is sampled in."""
    net = ToyNet()
    seeds, noise, y = [11, 12, 13], randn(3, 2, 2, 2), randn(3, 2)
    chunks = multistep_noise(seeds, 4, (2, 2, 2))
    assert len(chunks) == 3 and all(c.shape == (3, 2, 2, 2) for c in chunks)
    assert all(torch.equal(c[1:], d) for c, d in zip(chunks, multistep_noise(seeds[1:], 4, (2, 2, 2))))
    assert not torch.equal(chunks[0], chunks[1])  # a fresh draw per step
    whole = consistency_sample(net, noise, y, num_steps=4, step_noise=chunks)
    part = consistency_sample(net, noise[1:], y[1:], num_steps=4, step_noise=multistep_noise(seeds[1:], 4, (2, 2, 2)))
    torch.testing.assert_close(whole[1:], part)
    x0 = consistency_forward(noise * EDM.sigma_max, EDM.sigma_max, y, net)  # CM Algorithm 1 with the given noise
    for z, s in zip(chunks, consistency_sigmas(4)[1:].tolist()):
        x0 = consistency_forward(x0 + s * z, s, y, net)
    torch.testing.assert_close(whole, x0)
    with pytest.raises(ValueError, match="step_noise"):
        consistency_sample(net, noise, y, num_steps=4, step_noise=chunks[:2])


def test_consistency_sample_guidance_kwarg():
    net = ToyNet()
    noise, y = randn(3, 2, 2, 2), randn(3, 2)
    a = consistency_sample(net, noise, y, guidance=2.0)
    assert torch.equal(net.calls[-1]["guidance"], torch.full((3,), 2.0))
    b = consistency_sample(net, noise, y, guidance=torch.tensor([2.0, 2.0, 6.0]))
    assert torch.equal(a[:2], b[:2]) and not torch.allclose(a[2], b[2])


# ---------------------------------------------------------------------------------------------------------------
# Teacher step
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [1.0, W])
def test_heun_teacher_step_matches_edm_sample(cfg):
    """edm_sample(num_steps=2) = Heun sigma_max -> sigma_min, then Euler to 0, i.e. D(x_1; sigma_min)."""
    teacher = GMMTeacher()
    noise, y = randn(64, 2).double(), torch.nn.functional.one_hot(torch.arange(64) % 2, 2).double()
    edm = EDMConfig(sigma_min=0.3, sigma_max=7.0)
    ref = edm_sample(teacher, noise, y, num_steps=2, guidance_scale=cfg, edm_config=edm)
    s_from, s_to = get_sigmas(2, edm.sigma_min, edm.sigma_max, edm.rho)
    x1 = teacher_ode_step(teacher, noise * s_from, s_from, s_to, y, cfg, "heun", edm)
    out = edm_forward(x1, s_to, y, teacher, edm, guidance_scale=cfg)
    torch.testing.assert_close(out.float(), ref, rtol=1e-5, atol=1e-5)
    euler = teacher_ode_step(teacher, noise * s_from, s_from, s_to, y, cfg, "euler", edm)
    assert (euler - x1).abs().max() > 1e-3  # the correction matters at this step size


def test_teacher_step_call_counts_and_batched_cfg():
    net = ToyNet()
    x, y = randn(4, 3, 2, 2), randn(4, 1, 2, 5)
    teacher_ode_step(net, x, 2.0, 1.0, y, 5.0, "heun")
    assert [(c["batch"], c["cfg"]) for c in net.calls] == [(4, 5.0)] * 2
    net.calls.clear()
    teacher_ode_step(net, x, 2.0, 1.0, y, torch.full((4,), 5.0), "euler")
    assert [(c["batch"], c["cfg"]) for c in net.calls] == [(8, 1.0)]  # per-sample w: one cond+uncond batch
    with pytest.raises(ValueError):
        teacher_ode_step(net, x, 2.0, 1.0, y, 5.0, "rk4")


def test_per_sample_guidance_matches_scalar_guidance():
    teacher = GMMTeacher()
    x, y = randn(6, 2).double() * 3, torch.nn.functional.one_hot(torch.arange(6) % 2, 2).double()
    sigma_from = torch.linspace(1.0, 6.0, 6, dtype=torch.float64)
    sigma_to = torch.linspace(0.5, 4.0, 6, dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 3.0, 5.0, 7.0, 0.0], dtype=torch.float64)
    per_sample = teacher_ode_step(teacher, x, sigma_from, sigma_to, y, w, "heun")
    for i in range(6):
        scalar = teacher_ode_step(teacher, x[i:i + 1], sigma_from[i], sigma_to[i], y[i:i + 1], float(w[i]), "heun")
        torch.testing.assert_close(per_sample[i:i + 1], scalar, rtol=1e-9, atol=1e-9)
    d = guided_edm_forward(x, 2.0, y, teacher, guidance_scale=torch.full((6,), 1.0, dtype=torch.float64))
    torch.testing.assert_close(d, edm_forward(x, 2.0, y, teacher))


# ---------------------------------------------------------------------------------------------------------------
# Config, discretisation, loss options, EMA
# ---------------------------------------------------------------------------------------------------------------

def test_cd_config_recipes_and_validation():
    seed = CDConfig(**SEED_RECIPE)
    assert (seed.skip, seed.solver, seed.target_decay, seed.loss, seed.huber_c) == (
        1, "euler", 0.0, "pseudo_huber_elementwise", 0.001)
    default = CDConfig()
    assert default.solver == "heun" and default.target_decay > 0 and default.guidance == 5.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        default.skip = 3
    for bad in [dict(num_scales=1), dict(skip=0), dict(skip=40, num_scales=40), dict(solver="rk4"),
                dict(target_decay=1.0), dict(loss="l1"), dict(huber_c=0.0), dict(weighting="snr"),
                dict(index_dist="beta"), dict(guidance_range=(5.0, 1.0))]:
        with pytest.raises(UserError, match="CDConfig"):
            CDConfig(**bad)


def test_cd_sigmas_and_indices():
    sigmas = cd_sigmas(40)
    assert sigmas.dtype == torch.float64 and torch.all(sigmas[1:] > sigmas[:-1])
    torch.testing.assert_close(sigmas, get_sigmas(40).flip(0))
    g = torch.Generator().manual_seed(0)
    for k in (1, 3):
        cfg = CDConfig(num_scales=40, skip=k)
        n = sample_cd_indices(sigmas, cfg, 5000, g)
        assert n.dtype == torch.int64 and n.min() == 0 and n.max() == 39 - k
    # lognormal: empirical frequencies follow the erf masses, and they are far from uniform
    cfg = CDConfig(num_scales=40, skip=1, index_dist="lognormal", p_mean=-1.1, p_std=2.0)
    n = sample_cd_indices(sigmas, cfg, 20000, g)
    cdf = torch.erf((sigmas.log() - cfg.p_mean) / (math.sqrt(2) * cfg.p_std))
    p = (cdf[1:] - cdf[:-1]) / (cdf[-1] - cdf[0])
    freq = torch.bincount(n, minlength=39).double() / n.numel()
    assert (freq - p).abs().max() < 0.01
    assert (p - 1 / 39).abs().max() > 0.02


def test_curriculum_scales_double_up_to_num_scales():
    assert [curriculum_scales(s, 300, 40) for s in (0, 99, 100, 199, 200, 299, 300)] == [10, 10, 20, 20, 40, 40, 40]
    assert curriculum_scales(0, 300, 3) == 2  # never below one interval


def test_sample_guidance():
    assert sample_guidance(CDConfig(), 4, "cpu") == 5.0
    w = sample_guidance(CDConfig(guidance_range=(2.0, 8.0)), 1000, "cpu", torch.Generator().manual_seed(0))
    assert w.shape == (1000,) and w.min() >= 2.0 and w.max() <= 8.0 and w.std() > 1.0


def test_consistency_distance_forms():
    a = torch.zeros(2, 1, 2, 2)
    b = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).reshape(2, 1, 2, 2)
    c = 0.5
    d = consistency_distance(a, b, CDConfig(loss="pseudo_huber", huber_c=c))
    torch.testing.assert_close(d, torch.tensor([math.sqrt(25 + c * c) - c, 0.0]))
    d = consistency_distance(a, b, CDConfig(loss="pseudo_huber_elementwise", huber_c=c))
    elem = [math.sqrt(9 + c * c) - c, math.sqrt(16 + c * c) - c]
    torch.testing.assert_close(d, torch.tensor([sum(elem) / 4, 0.0]))
    torch.testing.assert_close(consistency_distance(a, b, CDConfig(loss="l2")), torch.tensor([25 / 4, 0.0]))
    # default c: iCT's 0.00054 sqrt(dim) per sample, LCM's 0.001 elementwise
    small = torch.full((1, 4), 1e-4)
    d_ict = consistency_distance(small, torch.zeros(1, 4), CDConfig(loss="pseudo_huber"))
    c_ict = 0.00054 * 2
    torch.testing.assert_close(d_ict, torch.tensor([math.sqrt(4e-8 + c_ict**2) - c_ict]))
    d_lcm = consistency_distance(small, torch.zeros(1, 4), CDConfig(loss="pseudo_huber_elementwise"))
    torch.testing.assert_close(d_lcm, torch.tensor([math.sqrt(1e-8 + 1e-6) - 1e-3]))


def test_ema_update():
    target, source = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        source.weight.fill_(2.0)
        source.running_mean.fill_(4.0)
        source.num_batches_tracked.fill_(7)
    ema_update(target, source, 0.75)
    torch.testing.assert_close(target.weight, torch.full((3,), 1.25))  # 0.75 * 1 + 0.25 * 2
    torch.testing.assert_close(target.running_mean, torch.full((3,), 1.0))
    assert target.num_batches_tracked.item() == 7
    ema_update(target, source, 0.0)
    assert torch.equal(target.weight, source.weight) and torch.equal(target.running_mean, source.running_mean)
    assert not target.weight.requires_grad or target.weight.grad is None
    with pytest.raises(ValueError):
        ema_update(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, bias=False), 0.5)


# ---------------------------------------------------------------------------------------------------------------
# cd_loss
# ---------------------------------------------------------------------------------------------------------------

OPTIONS = {
    "default": CDConfig(),
    "seed": CDConfig(**SEED_RECIPE),
    "l2": CDConfig(loss="l2"),
    "huber_elementwise": CDConfig(loss="pseudo_huber_elementwise"),
    "huber_per_sample": CDConfig(loss="pseudo_huber", huber_c=0.05),
    "inverse_gap": CDConfig(weighting="inverse_gap"),
    "lognormal": CDConfig(index_dist="lognormal"),
    "skip4": CDConfig(num_scales=20, skip=4),
    "per_sample_w": CDConfig(guidance_range=(1.0, 8.0)),
}


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("shape, yshape", [((4, 3, 4, 4), (4, 1, 6, 5)), ((4, 6), (4, 2))])
def test_cd_loss_smoke(name, shape, yshape):
    cfg = OPTIONS[name]
    student, target, teacher = ToyNet(), ToyNet(), ToyNet(scale=1.1)
    for p in [*target.parameters(), *teacher.parameters()]:
        p.requires_grad_(False)
    x0, y = randn(*shape), randn(*yshape, seed=1)
    loss, stats = cd_loss(student, target, teacher, x0, y, cfg, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    assert set(stats) == {"loss", "sigma", "gap", "w"} and all(isinstance(v, float) for v in stats.values())
    assert stats["loss"] == loss.item() and EDM.sigma_min < stats["sigma"] <= EDM.sigma_max
    loss.backward()
    assert student.a.grad is not None and torch.isfinite(student.a.grad)
    # teacher: 2 calls (heun) or 1 (euler); per-sample w -> 2B batches at cfg 1, the student/target get `guidance`
    steps = 2 if cfg.solver == "heun" else 1
    assert len(teacher.calls) == steps
    if cfg.guidance_range is None:
        assert all(c["cfg"] == cfg.guidance and c["batch"] == 4 for c in teacher.calls)
        assert student.calls[0]["guidance"] is None
    else:
        assert all(c["cfg"] == 1.0 and c["batch"] == 8 for c in teacher.calls)
        w = student.calls[0]["guidance"]
        assert w.shape == (4,) and torch.equal(w, target.calls[0]["guidance"]) and stats["w"] == w.mean().item()
    # reproducible given the generator
    again, _ = cd_loss(student, target, teacher, x0, y, cfg, generator=torch.Generator().manual_seed(0))
    assert again.item() == loss.item()


def test_cd_loss_weighting_and_no_grad_paths():
    """inverse_gap divides each sample's distance by sigma_{n+k} - sigma_n; only the student gets gradients."""
    student, teacher = ToyNet(), ToyNet(scale=1.3)
    target = copy.deepcopy(student)
    x0, y = randn(8, 5), randn(8, 3)
    cfg = CDConfig(num_scales=10, skip=3, loss="l2")
    uni, _ = cd_loss(student, target, teacher, x0, y, cfg, generator=torch.Generator().manual_seed(1))
    inv, _ = cd_loss(student, target, teacher, x0, y, dataclasses.replace(cfg, weighting="inverse_gap"),
                     generator=torch.Generator().manual_seed(1))
    # recompute by hand with the same draws
    g = torch.Generator().manual_seed(1)
    sigmas = cd_sigmas(10)
    n = sample_cd_indices(sigmas, cfg, 8, g)
    eps = torch.randn(x0.shape, generator=g)
    s_lo, s_hi = sigmas[n].float()[:, None], sigmas[n + cfg.skip].float()[:, None]
    x_hi = x0 + s_hi * eps
    x_lo = teacher_ode_step(teacher, x_hi, s_hi, s_lo, y, 5.0, cfg.solver)
    dist = (consistency_forward(x_hi, s_hi, y, student) - consistency_forward(x_lo, s_lo, y, target)).square().mean(1)
    torch.testing.assert_close(uni, dist.mean())
    torch.testing.assert_close(inv, (dist / (s_hi - s_lo).squeeze(1)).mean())
    inv.backward()
    assert student.a.grad is not None
    assert target.a.grad is None and teacher.a.grad is None


# ---------------------------------------------------------------------------------------------------------------
# dmd_loss on exact denoisers: the fake is the closed-form denoiser of the generator's own distribution
# ---------------------------------------------------------------------------------------------------------------

def shifted_teacher(shift: torch.Tensor) -> GMMTeacher:
    """The GMM teacher with every mode moved by `shift` (2,): the exact denoiser of a shifted generator."""
    fake = GMMTeacher()
    fake.per_class = [GaussianMixture(m.means + shift, m.stds, m.weights) for m in fake.per_class]
    fake.uncond = GaussianMixture(fake.uncond.means + shift, fake.uncond.stds, fake.uncond.weights)
    return fake


def dmd_gradient(fake: GMMTeacher, x_gen: torch.Tensor, y: torch.Tensor, guidance: float) -> torch.Tensor:
    x_gen = x_gen.clone().requires_grad_(True)
    cfg = CDConfig(guidance=guidance)
    dmd_loss(x_gen, y, GMMTeacher(), fake, cfg, generator=torch.Generator().manual_seed(0)).backward()
    return x_gen.grad


def test_dmd_gradient_moves_samples_towards_the_teacher():
    teacher, g = GMMTeacher(), torch.Generator().manual_seed(0)
    x_teacher, y = sample_data(teacher, 512, g)
    # a generator that already draws the teacher's distribution (fake = teacher, no guidance): nothing to move
    assert dmd_gradient(teacher, x_teacher, y, guidance=1.0).abs().max() < 1e-6
    # one shifted by delta: descending the loss moves every sample back, against delta (DMD eq. 7)
    delta = torch.tensor([0.3, -0.2], dtype=torch.float64)
    grad = dmd_gradient(shifted_teacher(delta), x_teacher + delta.float(), y, guidance=1.0)
    cos = torch.nn.functional.cosine_similarity(grad.double(), delta.expand_as(grad), dim=1)
    assert (cos > 0).float().mean() > 0.9 and cos.mean() > 0.8, cos.mean()


# ---------------------------------------------------------------------------------------------------------------
# Distillation of an exact teacher (2-D Gaussian mixture)
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gmm_world():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = GMMTeacher()
    fitted = fit_denoiser(MLPDenoiser(n_freq=4), teacher, steps=600, batch=256, seed=0)  # the "teacher weights"
    g = torch.Generator().manual_seed(123)
    noise, other_noise = torch.randn(1000, 2, generator=g), torch.randn(1000, 2, generator=g)
    y = torch.nn.functional.one_hot(torch.arange(1000) % 2, 2).float()
    true_map = edm_sample(teacher, noise, y, num_steps=50, guidance_scale=W)  # the ODE solved finely
    reference = edm_sample(teacher, other_noise, y, num_steps=50, guidance_scale=W)  # independent samples
    yield dict(teacher=teacher, fitted=fitted, noise=noise, y=y, true_map=true_map, reference=reference)
    torch.set_num_threads(threads)


def distill(world, cfg: CDConfig, steps: int, lr: float = 2e-3, batch: int = 256, seed: int = 0) -> MLPDenoiser:
    """Train a copy of the fitted denoiser with `cd_loss` (Adam), the target an EMA copy (or the student, mu = 0)."""
    teacher, student = world["teacher"], copy.deepcopy(world["fitted"])
    if cfg.guidance_range is not None:
        student.add_guidance_embedder()
    target = copy.deepcopy(student).requires_grad_(False) if cfg.target_decay > 0 else student
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x0, y = sample_data(teacher, batch, g)
        loss, _ = cd_loss(student, target, teacher, x0, y, cfg, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if target is not student:
            ema_update(target, student, cfg.target_decay)
    return student


def evaluate(world, net, guidance=None, true_map=None) -> dict[str, float]:
    """1-step error to the true map (mean L2), SWD to the teacher's distribution at 1, 2 and 4 steps."""
    noise, y = world["noise"], world["y"]
    true_map = world["true_map"] if true_map is None else true_map
    out = {"map1": (consistency_sample(net, noise, y, guidance=guidance) - true_map).norm(dim=1).mean().item()}
    for steps in (1, 2, 4):
        x = consistency_sample(net, noise, y, steps, generator=torch.Generator().manual_seed(1), guidance=guidance)
        out[f"swd{steps}"] = sliced_wasserstein(x, world["reference"])
    return out


def test_gmm_distillation_default_recipe(gmm_world):
    world = gmm_world
    untrained = evaluate(world, world["fitted"])
    student = evaluate(world, distill(world, CDConfig(), steps=600))
    teacher_heun = {s: sliced_wasserstein(edm_sample(world["teacher"], world["noise"], world["y"], s, W),
                                          world["reference"]) for s in (2, 3, 4)}
    floor = sliced_wasserstein(world["true_map"], world["reference"])  # sampling noise of the metric
    print(f"\nuntrained {untrained}\nstudent {student}\nteacher heun {teacher_heun}\nswd floor {floor:.3f}")
    assert student["map1"] < 0.3 * untrained["map1"]
    assert student["map1"] < 0.4  # the four modes are 1.7 apart
    for s in (1, 2, 4):
        assert student[f"swd{s}"] < 0.5 * untrained[f"swd{s}"]
        assert student[f"swd{s}"] < 0.5 * min(teacher_heun.values())  # the teacher needs 3-7 calls for this
    assert student["swd4"] < 0.15


def test_gmm_distillation_per_sample_guidance(gmm_world):
    """A w-conditioned student follows the teacher at two guidance scales; a guidance-blind one cannot."""
    world = gmm_world
    cfg = CDConfig(guidance_range=(1.0, 5.0))
    student = distill(world, cfg, steps=600)
    maps = {1.0: edm_sample(world["teacher"], world["noise"], world["y"], 50, 1.0), W: world["true_map"]}
    outs = {w: consistency_sample(student, world["noise"], world["y"], guidance=w) for w in maps}
    err = {(w, v): (outs[w] - maps[v]).norm(dim=1).mean().item() for w in maps for v in maps}
    blind = {w: (consistency_sample(world["fitted"], world["noise"], world["y"]) - maps[w]).norm(dim=1).mean().item()
             for w in maps}
    print(f"\nw-student 1-step error (student w, teacher w): {err}, untrained {blind}")
    # the w input matters, as the teacher's w does: compare the change from w = 1 to w = 5
    teacher_shift = (maps[W] - maps[1.0]).norm(dim=1).mean().item()
    shift_err = ((outs[W] - outs[1.0]) - (maps[W] - maps[1.0])).norm(dim=1).mean().item()
    print(f"teacher w=1 -> w=5 shift {teacher_shift:.3f}, student's shift error {shift_err:.3f}")
    for w in maps:
        assert err[w, w] < 0.5 * blind[w]
    assert shift_err < 0.5 * teacher_shift  # a guidance-blind student would score shift_err = teacher_shift


# ---------------------------------------------------------------------------------------------------------------
# Continuous-time consistency (sCM, recipes.scm_loss) on the exact teacher
# ---------------------------------------------------------------------------------------------------------------

def test_scm_tangent_is_cos_t_times_the_derivative_of_f_along_the_teacher_ode():
    """g of sCM eq. 8 (r = 1) == cos(t) d/dt f(x_t, t) along the guided teacher's ODE, measured by a central
    difference of f itself in float64; the forward-mode JVP to 1e-4 and the float32 finite difference to 2e-3."""
    teacher, net = GMMTeacher(), MLPDenoiser(n_freq=4).double()
    g = torch.Generator().manual_seed(0)
    x0, y = sample_data(teacher, 6, g)
    x0, y, sd = x0.double(), y.double(), EDM.sigma_data
    t = torch.tensor([0.05, 0.3, 0.8, 1.2, 1.5, 1.55], dtype=torch.float64)
    cos, sin = t.cos()[:, None], t.sin()[:, None]
    x_t = cos * x0 + sin * sd * torch.randn(6, 2, generator=g, dtype=torch.float64)
    dxt_dt = (cos * x_t - guided_edm_forward(x_t / cos, sd * t.tan(), y, teacher, EDM, W).double()) / sin

    def f(x, time):
        return consistency_forward(x / time.cos()[:, None], sd * time.tan(), y, net, EDM)

    h = 1e-5
    cos_df_dt = cos * (f(x_t + h * dxt_dt, t + h) - f(x_t - h * dxt_dt, t - h)) / (2 * h)
    F = trigflow_F(net, x_t, t, y, EDM)
    assert torch.allclose(f(x_t, t), cos * x_t - sin * sd * F)  # sCM eq. 9
    for jvp, tol in (("forward", 1e-4), ("finite-difference", 2e-3)):
        dF_dt = trigflow_jvp(net, x_t, t, y, dxt_dt, SCMConfig(jvp=jvp), EDM).double()
        tangent = -cos**2 * (sd * F - dxt_dt) - cos * sin * (x_t + sd * dF_dt)
        assert (tangent - cos_df_dt).abs().max() < tol * cos_df_dt.abs().max(), jvp


def distill_scm(world, scm: SCMConfig, steps: int = 600, lr: float = 2e-3, batch: int = 256) -> MLPDenoiser:
    """Train a copy of the fitted denoiser with `scm_loss` (Adam), theta^- the student itself."""
    teacher, student = world["teacher"], copy.deepcopy(world["fitted"])
    weighting = AdaptiveWeighting() if scm.adaptive else None
    opt = torch.optim.Adam(list(student.parameters()) + list(weighting.parameters() if weighting else []), lr=lr)
    g, cfg = torch.Generator().manual_seed(0), CDConfig(target_decay=0.0)
    for step in range(steps):
        x0, y = sample_data(teacher, batch, g)
        loss, _ = scm_loss(student, student, teacher, weighting, x0, y, cfg, scm, step, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student


def test_gmm_scm_cuts_the_one_step_error_and_fails_without_its_jvp(gmm_world, monkeypatch):
    """sCM halves the 1-step error to the exact guided ODE map (CD, 600 steps: 0.17, test above); with the JVP
    term of the tangent zeroed (dF/dt = 0) the same run diverges."""
    world, scm = gmm_world, SCMConfig(tangent_warmup=150)
    untrained = evaluate(world, world["fitted"])
    student = evaluate(world, distill_scm(world, scm))
    monkeypatch.setattr(recipes, "trigflow_jvp", lambda target, x_t, *a: torch.zeros_like(x_t))
    no_jvp = evaluate(world, distill_scm(world, scm))
    print(f"\nuntrained {untrained}\nsCM {student}\nsCM without dF/dt {no_jvp}")
    assert student["map1"] < 0.55 * untrained["map1"]
    for s in (1, 2, 4):
        assert student[f"swd{s}"] < 0.5 * untrained[f"swd{s}"]
    assert no_jvp["map1"] > 2 * untrained["map1"]
