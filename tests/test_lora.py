"""LoRA students (lora.py, train.py --lora-rank) on tiny-random: the adapter-free view is the teacher bit for bit,
only the student's factors learn, the merged export is base + adapter, resume is exact, checkpoints are small."""
import os
import shutil

import pytest
import torch
from accelerate.state import PartialState
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch._subclasses.fake_tensor import FakeTensorMode

import bench_memory
import checkpoints
import recipes
import train
from cd_utils import CDConfig, cd_loss
from lora import LORA_TARGETS, add_adapters
from microdit import load_dit_weights
from pipeline import LORA_FILE, build_dit, get_preset, load_pipeline, load_student, merge_lora
from test_train import data_dir, load_checkpoint, run, tensors  # noqa: F401 (data_dir: the fixture)
from utils import UserError

PRESET = get_preset("tiny-random")
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A tiny-random teacher with every weight perturbed: its zero-initialised final layer would hide the rest."""
    dit = build_dit(PRESET)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    path = str(tmp_path_factory.mktemp("lora") / "teacher.safetensors")
    save_file(dit.state_dict(), path)
    return path


def inputs(batch=3, seed=0):
    """A batch of DiT inputs of tiny-random: x (B, 4, 8, 8), c_noise (B,), y (B, 1, 77, 32)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, *PRESET.latent_shape, generator=g), torch.randn(batch, generator=g),
            torch.randn(batch, 1, 77, PRESET.text_encoder.width, generator=g))


def adapted(teacher_file, rank=4, alpha=8.0, names=("student", "target", "ema")):
    """The frozen teacher with adapters whose B factors are random (so that they change the output)."""
    dit = build_dit(PRESET, teacher_file).eval().requires_grad_(False)
    adapters = add_adapters(dit, list(names), rank, alpha)
    with torch.no_grad():
        for name in names:
            for key, p in adapters[name].factors.items():
                if key.endswith("lora_B"):
                    p.normal_(std=0.05)
    return dit, adapters


def test_the_adapter_free_view_is_the_teacher_bit_for_bit(teacher_file):
    _, adapters = adapted(teacher_file)
    teacher = build_dit(PRESET, teacher_file).eval()
    x, t, y = inputs()
    with torch.no_grad():
        student = adapters["student"](x, t, y, cfg=5.0)  # runs before the teacher view: the state is switched back
        assert torch.equal(adapters[None](x, t, y, cfg=5.0), teacher(x, t, y, cfg=5.0))
        assert not torch.allclose(student, teacher(x, t, y, cfg=5.0), atol=1e-3)
        assert not torch.allclose(adapters["target"](x, t, y), adapters["student"](x, t, y), atol=1e-3)


def test_adapters_hold_their_factors_and_target_every_dense_projection(teacher_file):
    dit, adapters = adapted(teacher_file)
    adapted_layers = {name for name, _ in adapters["student"].layers}
    dense = {name for name, m in build_dit(PRESET, teacher_file).named_modules() if isinstance(m, torch.nn.Linear)}
    expected = {n for n in dense if n.split(".")[0] in ("blocks", "patch_mixer") and
                n.split(".", 2)[2] in ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear",
                                       "cross_attn.proj", "mlp.w1", "mlp.w2", "mlp.w3", "adaLN_modulation.1")}
    expected |= {"final_layer.adaLN_modulation.1", "final_layer.linear", "t_embedder.mlp.0", "t_embedder.mlp.2"}
    assert adapted_layers == expected and any(".mlp.w1" in n for n in expected)
    assert any("patch_mixer" in n and "adaLN" in n for n in expected)  # the mixer's modulation too
    assert not any("mlp.gate" in n or "y_emb" in n for n in adapted_layers)  # MoE gates, caption path stay frozen
    keys = adapters["student"].state_dict().keys()
    assert len(keys) == 2 * len(expected) and all(k.endswith(("lora_A", "lora_B")) for k in keys)
    assert adapters[None].state_dict() == {}
    assert all(p.dtype == torch.float32 for p in adapters["student"].parameters())


def test_only_the_student_factors_receive_gradients(teacher_file):
    dit, adapters = adapted(teacher_file, names=("student", "target"))
    cd = CDConfig(num_scales=10, target_decay=0.9)
    x0, _, y = inputs(batch=4)
    loss, _ = cd_loss(adapters["student"], adapters["target"], adapters[None], x0, y, cd, PRESET.edm_config,
                      torch.Generator().manual_seed(0))
    loss.backward()
    student = set(map(id, adapters["student"].parameters()))
    for name, p in dit.named_parameters():
        if id(p) in student:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name  # the base and the target's factors


def test_merge_lora_adds_the_low_rank_update_and_names_a_misfit(teacher_file):
    dit, adapters = adapted(teacher_file)
    lora = adapters["ema"].lora_state()
    merged = merge_lora(build_dit(PRESET, teacher_file), lora, alpha=8.0)
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, y), adapters["ema"](x, t, y), rtol=1e-5, atol=1e-5)
    key = next(k for k in lora if k.endswith("lora_A.weight"))
    bad = {**lora, key: lora[key][:, :-1]}
    with pytest.raises(UserError, match=key.rsplit(".lora_", 1)[0].replace(".", r"\.") + ".*do not fit"):
        merge_lora(build_dit(PRESET, teacher_file), bad, alpha=8.0)


def test_lora_training_exports_a_merged_student_and_the_adapter(data_dir, teacher_file, tmp_path):
    result = run(data_dir, tmp_path, "--steps", 3, "--lora-rank", 4, "--lr", 1e-2, "--warmup", 0,
                 "--ckpt-every", 0, "--teacher", teacher_file)
    assert result["lora"].endswith(LORA_FILE)
    with safe_open(result["lora"], "pt") as f:
        meta = f.metadata()
    assert (meta["lora_rank"], meta["lora_alpha"], meta["lora_targets"]) == ("4", "4.0", LORA_TARGETS)
    strict = build_dit(PRESET, teacher_file)
    load_dit_weights(strict, result["student"])  # the official layout, strictly
    ckpt = load_checkpoint(tmp_path, 3)
    assert ckpt["student"].keys() == ckpt["ema"].keys() == ckpt["target"].keys()
    full_size = sum(v.numel() for v in build_dit(PRESET, teacher_file).state_dict().values())
    assert sum(v.numel() for v in tensors(ckpt).values() if v.is_floating_point()) < full_size  # adapters only

    _, adapters = adapted(teacher_file, alpha=4.0)  # train.py's default alpha: the rank
    adapters["ema"].load_state_dict(ckpt["ema"])  # base + the exported slow-EMA adapter
    merged, _ = load_student(PRESET, result["student"], torch.device("cpu"), torch.float32)
    from_lora, w_conditioned = load_student(PRESET, result["lora"], torch.device("cpu"), torch.float32,
                                            teacher_file)
    x, t, y = inputs()
    with torch.no_grad():
        reference = adapters["ema"](x, t, y)
        assert not torch.allclose(reference, build_dit(PRESET, teacher_file)(x, t, y), atol=1e-4)  # it learnt
        torch.testing.assert_close(merged(x, t, y), reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(from_lora(x, t, y), reference, rtol=1e-5, atol=1e-5)
    assert not w_conditioned


def test_lora_resume_is_exact_and_checkpointing_changes_nothing(data_dir, teacher_file, tmp_path):
    common = ["--teacher", teacher_file, "--steps", 4, "--lora-rank", 4, "--lr", 1e-2, "--ckpt-every", 2,
              "--keep-ckpts", 3, "--ema", 0.9, "--target-decay", 0.5, "--batch-size", 2, "--grad-accum", 2]
    straight = run(data_dir, tmp_path / "straight", *common)
    os.makedirs(tmp_path / "resumed" / checkpoints.CKPT_DIR)
    shutil.copy(checkpoints.checkpoint_path(str(tmp_path / "straight"), 2), tmp_path / "resumed" / checkpoints.CKPT_DIR)
    PartialState._reset_state()
    run(data_dir, tmp_path / "resumed", *common, "--resume", "auto")
    a, b = tensors(load_checkpoint(tmp_path / "straight", 4)), tensors(load_checkpoint(tmp_path / "resumed", 4))
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]
    PartialState._reset_state()
    with pytest.raises(UserError, match="does not fit this run's student network.*--lora-rank"):
        run(data_dir, tmp_path / "resumed", *common, "--lora-rank", 8, "--resume", "auto")  # the last flag wins
    PartialState._reset_state()
    recomputed = run(data_dir, tmp_path / "ckpt", *common, "--grad-checkpointing")
    lora_a, lora_b = load_file(straight["lora"]), load_file(recomputed["lora"])
    assert all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)


def test_scm_trains_a_lora_student_with_either_jvp(data_dir, teacher_file, tmp_path):
    """--recipe scm on adapters: the forward-mode JVP runs through peft's layers (the adapter is selected before the
    transform) and gives the same first step as the finite difference up to its error."""
    runs = {}
    for jvp in ("forward", "finite-difference"):
        PartialState._reset_state()
        runs[jvp] = run(data_dir, tmp_path / jvp, "--teacher", teacher_file, "--recipe", "scm", "--lora-rank", 4,
                        "--steps", 1, "--jvp", jvp)
        assert os.path.isfile(runs[jvp]["lora"]) and os.path.isfile(runs[jvp]["student"])
    assert runs["forward"]["loss"] == pytest.approx(runs["finite-difference"]["loss"], rel=1e-2)


def dmd_gradients(teacher_file, checkpointing):
    """{adapter: its factors' gradients} after one backward of DMD2's two losses on adapters of one DiT."""
    dit = build_dit(PRESET, teacher_file).eval().requires_grad_(False)
    torch.manual_seed(0)
    adapters = add_adapters(dit, ["student", "target", "fake"], 4, 8.0, trainable=("student", "fake"))
    with torch.no_grad():  # the adapters differ from the teacher and from each other
        for name in ("student", "fake"):
            for key, p in adapters[name].factors.items():
                if key.endswith("lora_B"):
                    p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    if checkpointing:
        recipes.enable_grad_checkpointing(dit)
    x0, _, y = inputs(batch=4)
    gen, fake = recipes.dmd_losses(adapters["student"], adapters["fake"], adapters[None], x0, y, CDConfig(),
                                   PRESET.edm_config, torch.Generator().manual_seed(0))
    (gen + fake).backward()
    assert all(p.grad is None for p in dit.parameters() if id(p) not in
               {id(q) for name in ("student", "fake") for q in adapters[name].parameters()})
    return {name: [p.grad for p in adapters[name].parameters()] for name in ("student", "fake")}


def test_lora_dmd_trains_the_student_and_fake_adapters_with_or_without_checkpointing(teacher_file):
    """The fake denoiser is a second trainable adapter: one backward of the step's losses (the student's forward
    ran before the teacher's and the fake's) reaches both adapters, and gradient checkpointing recomputes each
    block with the adapter of its forward (without lora.recompute_context it would use the fake's)."""
    plain, recomputed = dmd_gradients(teacher_file, False), dmd_gradients(teacher_file, True)
    for name in ("student", "fake"):
        assert all(g is not None for g in plain[name]) and sum(g.abs().sum() for g in plain[name]) > 0, name
        for a, b in zip(plain[name], recomputed[name], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_lora_one_step_recipe_resumes_exactly_and_exports(data_dir, teacher_file, tmp_path):
    common = ["--teacher", teacher_file, "--recipe", "one-step", "--steps", 4, "--lora-rank", 4, "--lr", 1e-2,
              "--ckpt-every", 2, "--keep-ckpts", 3, "--batch-size", 2, "--grad-checkpointing"]
    straight = run(data_dir, tmp_path / "straight", *common)
    assert os.path.isfile(straight["lora"]) and os.path.isfile(straight["student"])
    ckpt = load_checkpoint(tmp_path / "straight", 4)
    assert ckpt["fake"].keys() == ckpt["student"].keys()  # an adapter, checkpointed as the student is
    assert not all(torch.equal(ckpt["fake"][k], ckpt["student"][k]) for k in ckpt["fake"])
    os.makedirs(tmp_path / "resumed" / checkpoints.CKPT_DIR)
    shutil.copy(checkpoints.checkpoint_path(str(tmp_path / "straight"), 2), tmp_path / "resumed" / checkpoints.CKPT_DIR)
    PartialState._reset_state()
    run(data_dir, tmp_path / "resumed", *common, "--resume", "auto")
    a, b = tensors(ckpt), tensors(load_checkpoint(tmp_path / "resumed", 4))
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("flags, message", [(["--w-min", 2, "--w-max", 6], "does not go with --w-min"),
                                            (["--compile"], "does not go with --compile"),
                                            (["--lora-alpha", 0], "--lora-alpha must be > 0")])
def test_unsupported_lora_combinations_fail_before_any_work(flags, message):
    with pytest.raises(UserError, match=message):
        train.parse_args(["--preset", "tiny-random", "--lora-rank", "4", *map(str, flags)])


def test_the_pipeline_keeps_sampling_the_teacher_during_lora_training(data_dir, teacher_file, tmp_path):
    """make_networks puts the adapters on the pipeline's own DiT and leaves pipe.dit the adapter-free view."""
    args = train.parse_args(["--preset", "tiny-random", "--data-dir", data_dir, "--out-dir", str(tmp_path),
                             "--lora-rank", "4", "--teacher", teacher_file, "--cpu"])
    pipe = load_pipeline("tiny-random", teacher=teacher_file)
    base = pipe.dit
    nets, optimizer, _ = recipes.make_networks(args, CDConfig(), pipe, torch.device("cpu"))
    assert pipe.dit.name is None and pipe.dit.dit is base and nets["student"].dit is base
    assert [p for g in optimizer.param_groups for p in g["params"]] == list(nets["student"].parameters())
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(pipe.dit(x, t, y), build_dit(PRESET, teacher_file)(x, t, y))


def test_bench_memory_counts_on_fake_tensors_what_real_ones_save(teacher_file):
    """The activation count of bench_memory.py is made on fake tensors: on tiny-random it is the same count on real
    ones (within 1%: the meta LayerNorm keeps bf16 mean and rstd where the CPU kernel keeps fp32); a LoRA student
    keeps less per sample and far smaller state; checkpointing keeps less."""
    real = build_dit(PRESET, teacher_file)
    outside, inside, inputs = bench_memory.saved_bytes(real, real, PRESET.name, 2)
    net, dit, _, _ = bench_memory.meta_student(PRESET.name, 0, torch.float32)
    with FakeTensorMode(allow_non_fake_inputs=True):
        dit.to_empty(device="cpu")
        fake_outside, fake_inside, fake_inputs = bench_memory.saved_bytes(net, dit, PRESET.name, 2)
    assert fake_inputs == inputs and fake_outside == pytest.approx(outside, rel=0.01)
    assert fake_inside == pytest.approx(inside, rel=0.01) and min(inside) > 0
    full, lora, lora_ckpt = (bench_memory.memory_row(PRESET.name, rank, torch.bfloat16, ckpt)
                             for rank, ckpt in ((0, False), (4, False), (4, True)))
    assert lora["weights_gib"] < full["weights_gib"] / 5 and lora["trained"] < full["trained"] / 10
    assert lora_ckpt["per_sample_gib"] < lora["per_sample_gib"] < full["per_sample_gib"]
    # train.py --dmd-weight: the fake denoiser's fp32 weights, gradients and AdamW moments, twice the activations
    dmd = bench_memory.memory_row(PRESET.name, 0, torch.bfloat16, False, dmd=True)
    assert dmd["weights_gib"] - full["weights_gib"] == pytest.approx(16 * full["trained"] / 2**30)
    assert dmd["per_sample_gib"] == pytest.approx(2 * full["per_sample_gib"]) and dmd["student"] == "full + DMD"
    assert dmd["fixed_gib"] == pytest.approx(2 * full["fixed_gib"])
    # LoRA + DMD: the fake is a second adapter; FSDP over 4 GPUs: a quarter of the trained state per GPU, plus the
    # gathered blocks and roots, the same activations
    lora_dmd = bench_memory.memory_row(PRESET.name, 4, torch.bfloat16, False, dmd=True)
    assert lora_dmd["weights_gib"] - lora["weights_gib"] == pytest.approx(16 * lora["trained"] / 2**30)
    assert lora_dmd["per_sample_gib"] == pytest.approx(2 * lora["per_sample_gib"])
    sharded = bench_memory.memory_row(PRESET.name, 0, torch.bfloat16, False, dmd=True, gpus=4)
    teacher = full["trained"] * 2 / 2**30  # bf16
    gathered = bench_memory.fsdp_gathered_bytes(build_dit(PRESET)) / 2**30
    assert sharded["weights_gib"] == pytest.approx(teacher + (dmd["weights_gib"] - teacher) / 4 + gathered, rel=1e-6)
    assert sharded["per_sample_gib"] == dmd["per_sample_gib"] and sharded["student"] == "full + DMD, FSDP over 4 GPUs"
