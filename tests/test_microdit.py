"""MicroDiT against the official code's outputs (tests/fixtures, made by SonyResearch/micro_diffusion)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cd_utils import EDMConfig, edm_forward
from conftest import FIXTURES, ROOT, released_xl_shapes
from microdit import DiT, MicroDiT_Tiny_2, MicroDiT_XL_2, CheckpointError, load_dit_weights, read_state_dict
from sampler import edm_sample

REFERENCE = os.path.join(FIXTURES, "microdit_reference_small.safetensors")


def reference_model():
    meta = safe_open(REFERENCE, "pt").metadata()
    tensors = load_file(REFERENCE)
    cfg = json.loads(meta["dit_config"])
    depth = cfg["depth"]
    cfg["qkv_multipliers"] = np.linspace(*cfg.pop("qkv_ratio"), depth).tolist()
    cfg["ffn_multipliers"] = np.linspace(*cfg.pop("mlp_ratio"), depth).tolist()
    dit = DiT(**cfg).eval()
    load_dit_weights(dit, {k[len("dit."):]: v for k, v in tensors.items() if k.startswith("dit.")})
    return dit, tensors, meta


@pytest.mark.parametrize("impl", ["einsum", "gather"])
def test_matches_official_outputs(impl):
    dit, t, meta = reference_model()
    dit.set_moe_impl(impl)
    edm = EDMConfig(**json.loads(meta["edm"]))
    cfg, steps = float(meta["cfg_scale"]), int(meta["sampler_steps"])
    x, tt, y, sigma = t["in.x"], t["in.t"], t["in.y"], t["in.sigma"]
    with torch.no_grad():
        ours = {
            "out_without_cfg": dit.forward_without_cfg(x, tt, y),
            "out_with_cfg": dit(x, tt, y, cfg=cfg),
            "denoised_edm": edm_forward(x, sigma, y, dit, edm),
            "denoised_edm_cfg": edm_forward(x, sigma, y, dit, edm, guidance_scale=cfg),
        }
    ours["edm_heun_sample"] = edm_sample(dit, t["in.noise"], y, steps, cfg, edm)
    for name, value in ours.items():
        ref = t[f"out.{name}"]
        rel = ((value - ref).norm() / ref.norm()).item()
        assert rel < (1e-4 if name == "edm_heun_sample" else 1e-5), (name, rel)


def test_cfg_is_one_batched_call_with_zero_uncond():
    dit, t, _ = reference_model()
    x, tt, y = t["in.x"], t["in.t"], t["in.y"]
    with torch.no_grad():
        cond = dit.forward_without_cfg(x, tt, y)
        uncond = dit.forward_without_cfg(x, tt, torch.zeros_like(y))
        guided = dit(x, tt, y, cfg=3.0)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cond, uncond)


def test_xl_512_layout_matches_released_checkpoint():
    with torch.device("meta"):
        dit = MicroDiT_XL_2(input_size=64, pos_interp_scale=2.0)
    ours = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    assert ours == released_xl_shapes()
    assert len(ours) == 478
    assert sum(int(np.prod(s)) for s in ours.values()) == 1_166_490_912


def test_tiny_preset_parameter_count():
    with torch.device("meta"):
        dit = MicroDiT_Tiny_2()
    assert sum(p.numel() for p in dit.parameters()) == 200_692_752
    assert len(dit.state_dict()) == 290


def test_guidance_embedder_starts_as_identity_and_has_own_keys():
    dit, t, _ = reference_model()
    base = set(dit.state_dict())
    dit.add_guidance_embedder()
    extra = set(dit.state_dict()) - base
    assert extra and all(k.startswith("guidance_embedder.") for k in extra)
    w = torch.tensor([2.0, 5.0, 9.0])
    with torch.no_grad():
        plain = dit.forward_without_cfg(t["in.x"], t["in.t"], t["in.y"])
        with_w = dit.forward_without_cfg(t["in.x"], t["in.t"], t["in.y"], guidance=w)
    assert torch.equal(plain, with_w)


def test_checkpoint_formats_and_nesting(tmp_path):
    dit, _, _ = reference_model()
    state = dit.state_dict()
    torch.save({"state": {"model": {f"dit.{k}": v for k, v in state.items()} | {"vae.w": torch.zeros(1)}}},
               tmp_path / "composer.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "plain.safetensors"))
    torch.save(state, tmp_path / "plain.pt")
    for name in ("composer.pt", "plain.safetensors", "plain.pt"):
        loaded = read_state_dict(str(tmp_path / name))
        assert loaded.keys() == state.keys()
        load_dit_weights(dit, str(tmp_path / name))


def test_mismatched_checkpoint_names_the_keys():
    dit, _, _ = reference_model()
    state = dict(dit.state_dict())
    del state["final_layer.linear.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["x_embedder.proj.weight"] = torch.zeros(64, 16, 2, 2)
    with pytest.raises(CheckpointError) as err:
        load_dit_weights(dit, state)
    msg = str(err.value)
    assert "final_layer.linear.bias" in msg and "extra.weight" in msg and "x_embedder.proj.weight" in msg
    assert "\n" not in msg and "1 mis-shaped, 1 missing, 1 unexpected" in msg


def test_cli_missing_checkpoint_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench_model.py"), "--preset", "tiny-random",
                           "--teacher", str(tmp_path / "nope.pt")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope.pt" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_forward_mode_jvp_through_attention_and_moe(one_thread):
    """What continuous-time consistency models (sCM, Lu & Song 2024) need: d f(x, sigma) along a tangent, by
    torch.func.jvp through the DiT (expert-choice MoE included). On the CPU the fused SDPA kernel has no forward-mode
    derivative, so attention runs on the math backend; the JVP then equals a central difference (float64)."""
    from torch.func import jvp
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dit, tensors, _ = reference_model()
    dit = dit.double()
    x, t, y = (tensors[f"in.{k}"].double() for k in ("x", "t", "y"))
    tangent = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    f = lambda x_: dit(x_, t, y)  # noqa: E731
    with pytest.raises(NotImplementedError, match="forward AD"):
        jvp(f, (x,), (tangent,))
    with sdpa_kernel(SDPBackend.MATH):
        _, derivative = jvp(f, (x,), (tangent,))
        difference = (f(x + 1e-5 * tangent) - f(x - 1e-5 * tangent)) / 2e-5
    assert ((derivative - difference).norm() / difference.norm()).item() < 1e-6


def test_scm_jvp_forward_mode_equals_finite_difference_on_the_dit(one_thread):
    """recipes.trigflow_jvp, the two ways of --jvp, on the official-layout DiT as sCM calls it (TrigFlow F of the
    consistency function, along a tangent in x_t and t): the float32 central difference is within 1% of forward
    mode. (Where a token changes expert between the difference's two points the difference spikes: at t = 1.5 a step
    of 1.5e-3, twice today's, moved a token and the difference was off by 19x; forward mode keeps the routing.)"""
    from recipes import SCMConfig, trigflow_jvp
    dit, tensors, _ = reference_model()
    x, y = tensors["in.x"], tensors["in.y"]
    t = torch.linspace(0.2, 1.5, x.shape[0])
    dxt_dt = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    forward, difference = (trigflow_jvp(dit, x, t, y, dxt_dt, SCMConfig(jvp=mode), EDMConfig())
                           for mode in ("forward", "finite-difference"))
    assert ((forward - difference).flatten(1).norm(dim=1) / forward.flatten(1).norm(dim=1)).max().item() < 1e-2
