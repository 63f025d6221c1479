"""The real-size rehearsal: preset microdit-xl-512-random (MicroDiT_XL_2 at 512 px, the SDXL VAE's and the DFN5B
text tower's architectures, random weights).

Fast checks (default suite): the architectures on the meta device against the released layouts, the memory check
that refuses the full student before any work. The rehearsal itself runs the scripts at full size on the CPU
(opt-in, ~40 min on 2 cores, ~13 GiB): `python -m pytest -m xl -s` (-s prints each command's time and peak memory).
"""
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from open_clip.transformer import QuickGELU
from safetensors.torch import load_file

import microdit
import recipes
import train
from conftest import ROOT, released_xl_shapes
from dataset import LatentCaptionDataset
from pipeline import LORA_FILE, PRESETS, SDXL_VAE_CONFIG
from utils import UserError

PRESET = PRESETS["microdit-xl-512-random"]


def test_rehearsal_preset_is_the_real_one_with_random_weights():
    real = PRESETS["microdit-xl-512"]
    for field in ("dit_arch", "latent_shape", "image_size", "edm_config", "guidance_scale", "num_steps"):
        assert getattr(PRESET, field) == getattr(real, field), field
    assert PRESET.dit_kwargs == {**real.dit_kwargs, "zero_init": False}  # random weights with every path live
    assert PRESET.random_dit and PRESET.teacher is None
    with torch.device("meta"):
        dit = getattr(microdit, PRESET.dit_arch)(**PRESET.dit_kwargs)
    assert {k: tuple(v.shape) for k, v in dit.state_dict().items()} == released_xl_shapes()


def test_rehearsal_vae_is_the_sdxl_architecture():
    with torch.device("meta"):
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert sum(int(np.prod(s)) for s in shapes.values()) == 83_653_863  # the SDXL VAE's parameter count
    assert shapes["encoder.conv_in.weight"] == (128, 3, 3, 3) and shapes["quant_conv.weight"] == (8, 8, 1, 1)
    assert shapes["decoder.up_blocks.0.resnets.2.conv2.weight"] == (512, 512, 3, 3)
    assert vae.config.scaling_factor == 0.13025 and vae.config.force_upcast


def test_rehearsal_text_tower_is_dfn5b_text_architecture():
    import open_clip
    with torch.device("meta"):
        clip = open_clip.create_model(PRESETS["microdit-xl-512"].text_encoder.config, device="meta")
        encoder = PRESET.text_encoder.build(None, seed=0)
    ours = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    official = {k: tuple(v.shape) for k, v in clip.state_dict().items() if k in ours}
    assert ours == official and len(ours) == 292  # everything of the text tower but its projection
    assert (encoder.context_length, encoder.width) == (77, 1024)
    assert isinstance(encoder.transformer.resblocks[0].mlp.gelu, QuickGELU)
    # the real CLIP BPE tokenizer: SOT, "a photo of a cat", EOT, zero padding
    assert encoder.tokenize(["a photo of a cat"])[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0]


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_full_xl_student_is_refused_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setattr(recipes, "available_memory_gib", lambda device: 24.0)
    args = train.parse_args(["--preset", PRESET.name, "--data-dir", str(tmp_path / "data"), "--out-dir",
                             str(tmp_path / "run")])
    start = time.time()
    with pytest.raises(UserError, match=r"full student of microdit-xl-512-random needs 30\.\d GiB .* 24\.0 GiB free: "
                                        r"it would fit with --lora-rank 32 \(4\.\d GiB\)$"):
        train.train(args)
    assert time.time() - start < 30 and not (tmp_path / "data").exists() and not (tmp_path / "run").exists()
    lora = train.parse_args(["--preset", PRESET.name, "--lora-rank", "32"])
    recipes.check_memory(lora, recipes.cd_config_from_args(lora), torch.device("cpu"))  # 4.7 GiB: fits
    one_step = train.parse_args(["--preset", PRESET.name, "--recipe", "one-step"])  # + the DMD fake's 17.4 GiB
    with pytest.raises(UserError, match=r"needs 47\.\d GiB .* and a DMD fake denoiser\) .* it would fit with "
                                        r"--lora-rank 32 \(5\.\d GiB\)$"):
        recipes.check_memory(one_step, recipes.cd_config_from_args(one_step), torch.device("cpu"))
    # over 4 processes, sharding the trained networks fits too: 4.3 GiB of fp32 teacher + 43.2 / 4
    with pytest.raises(UserError, match=r"fit with --fsdp \(over these 4 processes\) \(15\.\d GiB\) or --lora-rank 32"):
        recipes.check_memory(one_step, recipes.cd_config_from_args(one_step), torch.device("cpu"), world=4)
    fsdp = train.parse_args(["--preset", PRESET.name, "--recipe", "one-step", "--fsdp"])
    recipes.check_memory(fsdp, recipes.cd_config_from_args(fsdp), torch.device("cpu"), world=4)  # fits


# ----------------------------------------------------------------------------------------------------------------
# The rehearsal (opt-in: pytest -m xl)

def run_script(name: str, *args: str, expect: int = 0) -> str:
    """Run `python NAME ARGS` on 2 threads; print its wall time and peak resident memory; return its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    start = time.time()
    proc = subprocess.run(["/usr/bin/time", "-f", "peak_rss_kib %M", sys.executable, os.path.join(ROOT, name), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    output = proc.stdout + proc.stderr
    peak = int(re.findall(r"peak_rss_kib (\d+)", output)[-1]) / 2**20
    print(f"\n| `{name} {' '.join(args)}` | {time.time() - start:.0f} s | {peak:.2f} GiB | exit {proc.returncode} |")
    assert proc.returncode == expect, output[-3000:]
    return output


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    root = tmp_path_factory.mktemp("xl")
    (root / "prompts.json").write_text(json.dumps(["a photograph of an astronaut riding a horse",
                                                   "a watercolor painting of a lighthouse at sunset"]))
    return root


@pytest.mark.xl
def test_xl_teacher_data(rehearsal):
    run_script("generate_data.py", "--preset", PRESET.name, "--prompts", str(rehearsal / "prompts.json"),
               "--out", str(rehearsal / "data"), "--steps", "2", "--batch-size", "2", "--device", "cpu")
    data = LatentCaptionDataset(str(rehearsal / "data"))
    item = data[1]
    assert len(data) == 2 and item["latents"].shape == (4, 64, 64) and item["embeddings"].shape == (1, 77, 1024)
    assert torch.isfinite(item["latents"]).all() and item["latents"].std() > 0.1


@pytest.mark.xl
def test_xl_full_student_error(rehearsal):
    out = run_script("train.py", "--preset", PRESET.name, "--data-dir", str(rehearsal / "data"), "--out-dir",
                     str(rehearsal / "full"), expect=2)
    assert re.search(r"error: the full student of microdit-xl-512-random needs 30\.\d GiB", out)


@pytest.mark.xl
def test_xl_lora_training_and_resume(rehearsal):
    common = ["--preset", PRESET.name, "--data-dir", str(rehearsal / "data"), "--out-dir", str(rehearsal / "lora"),
              "--lora-rank", "32", "--grad-checkpointing", "--batch-size", "1", "--val-every", "0", "--val-samples",
              "1", "--val-teacher-steps", "2", "--ckpt-every", "1"]
    run_script("train.py", *common, "--steps", "2")
    run_script("train.py", *common, "--steps", "3", "--resume", "auto")
    log = [json.loads(line) for line in (rehearsal / "lora" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
    factors = load_file(str(rehearsal / "lora" / LORA_FILE))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in factors.items())  # it trained
    assert (rehearsal / "lora" / "val" / "step_000003.png").is_file()


@pytest.mark.xl
def test_xl_benchmark_one_step(rehearsal):
    run_script("benchmark.py", "--preset", PRESET.name, "--student", str(rehearsal / "lora" / LORA_FILE),
               "--steps", "1", "--num-prompts", "2", "--batch-size", "2", "--prompts-file",
               str(rehearsal / "prompts.json"), "--out", str(rehearsal / "bench"))
    report = json.loads((rehearsal / "bench" / "report.json").read_text())
    assert [row["nfe"] for row in report["configurations"]] == [1]
    assert len(list((rehearsal / "bench").glob("*/0001.png"))) == 1


@pytest.mark.xl
def test_xl_notebook(rehearsal, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    for name, value in dict(PRESET=PRESET.name, INSTALL="0", WORK_DIR=str(rehearsal / "nb"), REPO_DIR=ROOT,
                            GEN_NUM="2", TRAIN_STEPS="2", BATCH_SIZE="1", VAL_EVERY="2", VAL_SAMPLES="1",
                            BENCH_PROMPTS="2", LORA_RANK="32", TEACHER_STEPS="2", COMPARE_TEACHER="0",
                            PARTI=str(rehearsal / "prompts.json")).items():
        monkeypatch.setenv(f"NB_{name}", value)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    nb = nbformat.read(os.path.join(ROOT, "testovoe.ipynb"), as_version=4)
    start = time.time()
    NotebookClient(nb, timeout=3600, kernel_name="python3").execute()
    print(f"\n| testovoe.ipynb (NB_PRESET={PRESET.name}, ...) | {time.time() - start:.0f} s | | |")
    assert (rehearsal / "nb" / "benchmark" / "report.md").is_file()


@pytest.mark.xl
def test_xl_gpu_script_runs_on_the_cpu(tmp_path):
    env = {**os.environ, "QUICK": "1", "DEVICE": "cpu", "OUT": str(tmp_path), "OMP_NUM_THREADS": "2"}
    start = time.time()
    subprocess.run(["bash", os.path.join(ROOT, "bench_gpu.sh")], check=True, env=env, capture_output=True)
    print(f"\n| QUICK=1 DEVICE=cpu bash bench_gpu.sh | {time.time() - start:.0f} s | | |")
    report = (tmp_path / "bench_gpu.md").read_text()
    for section in ("## forward", "## cd_step", "## teacher_data", "## train", "## sampling"):
        assert section in report
    assert "LoRA rank 32 | 17.9M | 1 |" in report


def test_gpu_script_runs_on_tiny_random(tmp_path):
    """bench_gpu.sh end to end at QUICK sizes on tiny-random (seconds): every command it runs on a GPU still works."""
    env = {**os.environ, "QUICK": "1", "DEVICE": "cpu", "PRESET": "tiny-random", "OUT": str(tmp_path),
           "OMP_NUM_THREADS": "1"}
    subprocess.run(["bash", os.path.join(ROOT, "bench_gpu.sh")], check=True, env=env, capture_output=True)
    report = (tmp_path / "bench_gpu.md").read_text()
    for section in ("## forward", "## cd_step", "## teacher_data", "## train", "## sampling"):
        assert section in report
    assert "| LoRA rank 32 |" in report and "%|" not in report
    assert json.loads((tmp_path / "sampling_report.json").read_text())["configurations"][0]["nfe"] == 1
    assert (tmp_path / "train_log.jsonl").read_text().count('"step"') == 2
