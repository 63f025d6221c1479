"""train.py on the tiny-random preset (CPU): loss falls, exact resume, exports, guard rails, two processes."""
import copy
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from accelerate.state import AcceleratorState, PartialState
from safetensors.torch import load_file

import checkpoints
import generate_data
import recipes
import shapes
import train
import train_args
from cd_utils import SEED_RECIPE, CDConfig, cd_loss
from dataset import ImageCaptionDataset, LatentCaptionDataset
from microdit import load_dit_weights
from pipeline import GUIDANCE_FILE, STUDENT_FILE, build_dit, get_preset, load_pipeline
from utils import UserError, read_jsonl, read_rng_state
from validation import LOG_FILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle", "a blue square on green", "a photo of a cat", "two dogs", "a house",
           "a tree at night", "a yellow star", "the sea"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Teacher data of the tiny-random preset: 8 prompts, 2 Heun steps (generate_data's own function)."""
    folder = tmp_path_factory.mktemp("train")
    (folder / "prompts.json").write_text(json.dumps(PROMPTS))
    generate_data.main(["--prompts", str(folder / "prompts.json"), "--out", str(folder / "data"), "--preset",
                        "tiny-random", "--steps", "2", "--batch-size", "8", "--device", "cpu"])
    PartialState._reset_state()
    return str(folder / "data")


def run(data_dir, out_dir, *extra):
    """train() on tiny-random, validated only at the end on one sample (the teacher is rendered once)."""
    argv = ["--preset", "tiny-random", "--data-dir", data_dir, "--out-dir", str(out_dir), "--batch-size", "4",
            "--val-every", "0", "--val-samples", "1", "--cpu", *map(str, extra)]
    return train.train(train.parse_args(argv))


def load_checkpoint(out_dir, step):
    return torch.load(checkpoints.checkpoint_path(str(out_dir), step), weights_only=True)


def tensors(tree, prefix=""):
    """{path: tensor} of every tensor in a nested dict/list (a checkpoint)."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return {k: v for key, sub in items for k, v in tensors(sub, f"{prefix}/{key}").items()}


def fixed_batch_loss(model, teacher, data_dir, cd):
    """The CD loss of `model` (as student and target) on every training item, averaged over 4 fixed noise draws."""
    ds = LatentCaptionDataset(data_dir)
    x0 = torch.stack([ds[i]["latents"] for i in range(len(ds))]).float()
    y = torch.stack([ds[i]["embeddings"] for i in range(len(ds))]).float()
    edm = get_preset("tiny-random").edm_config
    with torch.no_grad():
        return sum(cd_loss(model, model, teacher, x0, y, cd, edm, torch.Generator().manual_seed(s))[0].item()
                   for s in range(4)) / 4


def test_a_few_steps_lower_the_loss(data_dir, tmp_path):
    args = ["--recipe", "seed", "--steps", 20, "--batch-size", 8, "--lr", 3e-3, "--warmup", 0, "--ema", 0]
    result = run(data_dir, tmp_path, *args)
    teacher = build_dit(get_preset("tiny-random")).eval()
    student = build_dit(get_preset("tiny-random")).eval()
    load_dit_weights(student, result["student"])  # strict: the official layout
    cd = CDConfig(**SEED_RECIPE)
    before = fixed_batch_loss(copy.deepcopy(teacher), teacher, data_dir, cd)
    after = fixed_batch_loss(student, teacher, data_dir, cd)
    assert after < 0.85 * before, (before, after)
    log = [json.loads(line) for line in open(result["log"])]
    assert [r["step"] for r in log] == list(range(1, 21))
    assert {"loss", "lr", "grad_norm", "samples_per_s", "peak_mem_gb", "sigma", "gap", "w"} <= set(log[0])
    for name in ("training_loss.png", "val/step_000020.png", "config.json", STUDENT_FILE):
        assert os.path.isfile(tmp_path / name), name
    assert not os.path.exists(tmp_path / GUIDANCE_FILE)


DMD_FLAGS = ["--dmd-weight", 0.5, "--dmd-start", 2, "--fake-lr", 2e-3, "--dmd-guidance", 3]


def test_fp16_skips_overflowing_steps_and_goes_on(data_dir, tmp_path, monkeypatch):
    """--precision fp16: with a loss scale so large that the fp16 gradients overflow, every update is skipped (the
    weights stay the teacher's), the scale halves each time, log.jsonl flags each skipped step, and the run goes
    on instead of stopping at the non-finite gradient norm."""
    def huge_loss_scale(precision, device):
        autocast, _ = recipes.mixed_precision(precision, device)
        return autocast, torch.amp.GradScaler(device.type, init_scale=2.0**40)

    monkeypatch.setattr(train, "mixed_precision", huge_loss_scale)
    result = run(data_dir, tmp_path, "--steps", 3, "--precision", "fp16", "--ema", 0, "--ckpt-every", 0)
    assert [r["skipped"] for r in read_jsonl(str(tmp_path / LOG_FILE))] == [1, 1, 1]
    assert load_checkpoint(tmp_path, 3)["scaler"]["scale"] == 2.0**37
    student, teacher = load_file(result["student"]), build_dit(get_preset("tiny-random")).state_dict()
    assert all(torch.equal(student[k], teacher[k]) for k in teacher)


@pytest.mark.parametrize("flags, loss_name", [(["--target-decay", 0.5], "cd_loss"),
                                              (["--target-decay", 0.5, *DMD_FLAGS], "cd_loss"),
                                              (["--recipe", "rcm", "--tangent-warmup", 4, *DMD_FLAGS], "scm_loss"),
                                              (["--target-decay", 0.5, "--precision", "fp16"], "cd_loss")],
                         ids=["cd", "cd+dmd", "rcm", "cd-fp16"])
def test_resume_after_ctrl_c_equals_uninterrupted_run(data_dir, tmp_path, monkeypatch, flags, loss_name):
    """6 steps straight == Ctrl-C during step 3 (finishes it, checkpoints, stops) + --resume auto: every tensor of
    the final checkpoint (student, EMA target, slow EMA, DMD fake, sCM's weighting, optimizer, loss generator) is
    identical."""
    common = ["--steps", 6, "--batch-size", 2, "--grad-accum", 2, "--ema", 0.9, "--ckpt-every", 4, "--lr", 1e-3,
              *flags]
    run(data_dir, tmp_path / "straight", *common)

    calls, loss_fn = [], getattr(recipes, loss_name)

    def loss_then_ctrl_c(*a, **kw):
        calls.append(1)
        if len(calls) == 5:  # first micro-step of step 3
            os.kill(os.getpid(), signal.SIGINT)
        return loss_fn(*a, **kw)

    monkeypatch.setattr(recipes, loss_name, loss_then_ctrl_c)
    stopped = run(data_dir, tmp_path / "resumed", *common)
    assert stopped["interrupted"] and stopped["step"] == 3 and stopped["checkpoint"].endswith("ckpt_000003.pt")
    assert not os.path.exists(tmp_path / "resumed" / STUDENT_FILE)
    with pytest.raises(UserError, match="already has checkpoints: pass --resume auto"):
        run(data_dir, tmp_path / "resumed", *common)
    monkeypatch.setattr(recipes, loss_name, loss_fn)
    AcceleratorState._reset_state(True)
    resumed = run(data_dir, tmp_path / "resumed", *common, "--resume", "auto")
    assert resumed["step"] == 6 and not resumed["interrupted"]

    a, b = load_checkpoint(tmp_path / "straight", 6), load_checkpoint(tmp_path / "resumed", 6)
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    assert any(k.startswith("/ema/") for k in ta)
    assert any(k.startswith("/target/") for k in ta) == ("--target-decay" in flags)  # sCM's theta^-: the student
    assert any(k.startswith("/fake/") for k in ta) == ("--dmd-weight" in flags)
    assert any(k.startswith("/weighting/") for k in ta) == (loss_name == "scm_loss")
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, differ[:5]
    assert a["scaler"] == b["scaler"] and bool(a["scaler"]) == ("fp16" in flags)  # fp16's loss scale resumes
    rng = read_rng_state(a["rng"][0])
    assert {"python", "numpy", "torch", "cuda", "loss"} <= set(rng) and rng["loss"].dtype == torch.uint8
    assert torch.equal(load_file(tmp_path / "straight" / STUDENT_FILE)["final_layer.linear.weight"],
                       load_file(tmp_path / "resumed" / STUDENT_FILE)["final_layer.linear.weight"])
    log = [json.loads(line)["step"] for line in open(tmp_path / "resumed" / LOG_FILE)]
    assert log == list(range(1, 7))
    assert [os.path.basename(p) for p in checkpoints.list_checkpoints(str(tmp_path / "resumed"))] == \
        ["ckpt_000004.pt", "ckpt_000006.pt"]  # --keep-ckpts 2


def test_grad_checkpointing_gives_the_same_weights(data_dir, tmp_path):
    plain = run(data_dir, tmp_path / "plain", "--steps", 2)
    ckpt = run(data_dir, tmp_path / "ckpt", "--steps", 2, "--grad-checkpointing")
    a, b = load_file(plain["student"]), load_file(ckpt["student"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_per_sample_w_exports_the_guidance_embedder(data_dir, tmp_path):
    # 3 steps: the zero-initialised final layer, then adaLN, then the embeddings receive gradients
    result = run(data_dir, tmp_path, "--steps", 3, "--w-min", 2, "--w-max", 6, "--lr", 1e-3)
    assert result["guidance_embedder"].endswith(GUIDANCE_FILE)
    student = build_dit(get_preset("tiny-random"))
    load_dit_weights(student, result["student"])  # strict: no guidance keys in the official file
    guidance = load_file(result["guidance_embedder"])
    assert guidance and all(k.startswith("guidance_embedder.") for k in guidance)
    student.add_guidance_embedder()
    assert student.load_state_dict(guidance, strict=False).unexpected_keys == []
    assert guidance["guidance_embedder.mlp.2.weight"].abs().sum() > 0  # trained away from its zero init


def test_images_and_captions_are_encoded_on_the_fly(data_dir, tmp_path):
    images_only = tmp_path / "images_only"
    shutil.copytree(os.path.join(data_dir, "images"), images_only / "images")
    shutil.copy(os.path.join(data_dir, "captions.json"), images_only)
    result = run(str(images_only), tmp_path / "run", "--steps", 2)
    assert result["step"] == 2 and os.path.isfile(result["student"])


def test_an_empty_data_dir_is_filled_with_teacher_data_first(tmp_path):
    (tmp_path / "prompts.json").write_text(json.dumps(PROMPTS[:4]))
    result = run(str(tmp_path / "fresh"), tmp_path / "run", "--steps", 2, "--prompts", tmp_path / "prompts.json",
                 "--gen-batch-size", 4)
    manifest = json.loads((tmp_path / "fresh" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_finished"] == 4 and manifest["settings"]["steps"] == 30
    assert manifest["settings"]["seed"] == generate_data.TEACHER_DATA_SEED and result["step"] == 2


def test_on_the_fly_inputs_equal_the_stored_ones(tmp_path):
    """The shapes world's codec is the identity, so encoding the teacher's PNGs and captions on the fly must give
    the stored latents (up to the PNG's 8 bits and the shards' float16) and the stored text embeddings."""
    (tmp_path / "prompts.json").write_text(json.dumps(shapes.captions(shapes.sample_attributes(6, 3))))
    generate_data.main(["--prompts", str(tmp_path / "prompts.json"), "--out", str(tmp_path / "data"), "--preset",
                        "tiny", "--steps", "2", "--batch-size", "6", "--device", "cpu"])
    pipe = load_pipeline("tiny")
    images, stored = ImageCaptionDataset(str(tmp_path / "data"), 32), LatentCaptionDataset(str(tmp_path / "data"))
    batch = {"image": torch.stack([images[i]["image"] for i in range(6)]), "caption": images.captions}
    x0, y = train.model_inputs(batch, pipe, torch.device("cpu"))
    latents = torch.stack([stored[i]["latents"] for i in range(6)]).float()
    embeddings = torch.stack([stored[i]["embeddings"] for i in range(6)]).float()
    assert images.captions == stored.captions and x0.shape == latents.shape and y.shape == embeddings.shape
    assert (x0 - latents.clamp(-1, 1)).abs().max() <= 1 / 255 + 2e-3  # half a PNG level in [-1, 1], plus float16
    torch.testing.assert_close(y, embeddings, atol=0.05, rtol=2e-3)  # float16 of values up to ~50


def test_nan_loss_stops_and_keeps_the_last_checkpoint(data_dir, tmp_path, monkeypatch):
    calls = []

    def nan_from_step_3(*a, **kw):
        calls.append(1)
        loss, stats = cd_loss(*a, **kw)
        return (loss * float("nan"), stats) if len(calls) >= 3 else (loss, stats)

    monkeypatch.setattr(recipes, "cd_loss", nan_from_step_3)
    with pytest.raises(UserError, match=r"non-finite loss \(nan\).* at step 3; .*last good checkpoint: .*ckpt_000002"):
        run(data_dir, tmp_path, "--steps", 6, "--ckpt-every", 2)
    assert [os.path.basename(p) for p in checkpoints.list_checkpoints(str(tmp_path))] == ["ckpt_000002.pt"]
    ckpt = load_checkpoint(tmp_path, 2)
    assert ckpt["step"] == 2 and all(v.isfinite().all() for v in ckpt["student"].values())


def test_cli_flags_cover_cd_config():
    fields = {f.name for f in dataclasses.fields(CDConfig)} - {"guidance_range"}  # that one is --w-min/--w-max
    assert fields <= set(vars(train.parse_args([])))  # a flag per field, its dest the field's name
    args = train.parse_args(["--preset", "tiny-random", "--recipe", "seed", "--num-scales", "20", "--w-min", "2",
                             "--w-max", "8", "--steps", "7", "--p-mean", "0.5", "--w", "3"])
    cd = recipes.cd_config_from_args(args)
    assert cd == CDConfig(**{**SEED_RECIPE, "num_scales": 20, "p_mean": 0.5, "guidance": 3.0,
                             "guidance_range": (2.0, 8.0)})
    assert recipes.cd_config_from_args(train.parse_args([])) == CDConfig()
    assert args.steps == 7 and args.batch_size == train_args.PRESET_DEFAULTS["tiny-random"]["batch_size"]
    assert train.parse_args([]).data_dir == train_args.PRESET_DEFAULTS["tiny"]["data_dir"]
    with pytest.raises(UserError, match="--w-min and --w-max go together"):
        recipes.cd_config_from_args(train.parse_args(["--w-min", "2"]))
    with pytest.raises(UserError, match="--steps must be >= 1"):
        train.parse_args(["--steps", "0"])
    # a recipe's training flags fill what the command line leaves unset
    one_step = train.parse_args(["--recipe", "one-step"])
    assert {k: getattr(one_step, k) for k in recipes.RECIPES["one-step"].flags} == recipes.RECIPES["one-step"].flags
    assert recipes.cd_config_from_args(one_step) == CDConfig() and one_step.fake_lr == one_step.lr
    assert train.parse_args(["--recipe", "one-step", "--dmd-weight", "0"]).dmd_weight == 0
    assert train.parse_args([]).dmd_weight == 0 and train.parse_args([]).lr_schedule == "constant"
    assert train.parse_args(["--recipe", "one-step", "--lora-rank", "8"]).dmd_weight > 0  # a fake adapter
    with pytest.raises(UserError, match="--dmd-weight does not go with --w-min"):
        train.parse_args(["--recipe", "one-step", "--w-min", "2", "--w-max", "6"])


@pytest.mark.parametrize("student", [["--lora-rank", "4"]], ids=["lora"])  # full + DMD: tests/test_fsdp.py
def test_two_processes_under_accelerate(data_dir, tmp_path, student):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # `--multi_gpu` starts torchrun workers; on a machine without CUDA train.py joins them over gloo on the CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "train.py",
           "--preset", "tiny-random", "--data-dir", data_dir, "--out-dir", str(tmp_path), "--steps", "2",
           "--batch-size", "2", "--val-every", "0", "--val-samples", "1", "--cpu", *student]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "samples/step" in result.stdout and "x 2 = " in result.stdout  # batch 2 x grad-accum x 2 processes
    assert json.loads((tmp_path / "config.json").read_text())["world_size"] == 2
    assert len(load_checkpoint(tmp_path, 2)["rng"]) == 2  # both ranks' generator states
    load_dit_weights(build_dit(get_preset("tiny-random")), str(tmp_path / STUDENT_FILE))
