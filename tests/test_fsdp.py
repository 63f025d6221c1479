"""train.py --fsdp on two CPU processes (gloo) on tiny-random: the sharded run (student, EMA target, slow EMA and DMD
fake denoiser all sharded, gradient checkpointing and accumulation, a sharded checkpoint resumed half-way) gives the
losses and the exported student of the replicated (DDP) run within float tolerance."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
from microdit import load_dit_weights
from pipeline import STUDENT_FILE, build_dit, get_preset
from test_train import REPO, data_dir  # noqa: F401 (data_dir: the fixture)
from utils import UserError, read_jsonl
from validation import LOG_FILE

FLAGS = ["--preset", "tiny-random", "--batch-size", "2", "--grad-accum", "2", "--target-decay", "0.5", "--ema", "0.9",
         "--dmd-weight", "0.5", "--fake-lr", "1e-3", "--lr", "1e-3", "--grad-checkpointing", "--val-every", "0",
         "--val-samples", "1", "--ckpt-every", "2", "--cpu"]


def launch(data_dir, out_dir, *extra):
    """train.py under `accelerate launch` with two processes joined over gloo (OMP_NUM_THREADS=1 each)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "train.py", *FLAGS,
           "--data-dir", data_dir, "--out-dir", str(out_dir), *extra]
    result = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_fsdp_equals_ddp_and_resumes_from_sharded_checkpoints(data_dir, tmp_path):
    ddp_run = launch(data_dir, tmp_path / "ddp", "--steps", "4")
    assert "x 2 = 8 samples/step" in ddp_run.stdout  # batch 2 x grad-accum 2 x 2 processes
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["world_size"] == 2
    assert len(torch.load(checkpoints.checkpoint_path(str(tmp_path / "ddp"), 4), weights_only=True)["rng"]) == 2
    load_dit_weights(build_dit(get_preset("tiny-random")), str(tmp_path / "ddp" / STUDENT_FILE))  # strictly
    launch(data_dir, tmp_path / "fsdp", "--steps", "2", "--fsdp")
    folder = checkpoints.checkpoint_path(str(tmp_path / "fsdp"), 2, sharded=True)
    sizes = [os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".distcp")]
    assert len(sizes) == 2 and min(sizes) > 0.4 * max(sizes)  # each process wrote its half of the state
    launch(data_dir, tmp_path / "fsdp", "--steps", "4", "--fsdp", "--resume", "auto")
    ddp, fsdp = (read_jsonl(str(tmp_path / run / LOG_FILE)) for run in ("ddp", "fsdp"))
    assert [r["step"] for r in fsdp] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "dmd", "fake"):
        assert [r[key] for r in fsdp] == pytest.approx([r[key] for r in ddp], rel=1e-4, abs=1e-7), key
    a, b = load_file(tmp_path / "ddp" / STUDENT_FILE), load_file(tmp_path / "fsdp" / STUDENT_FILE)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
    assert not torch.equal(a["final_layer.linear.weight"], torch.zeros_like(a["final_layer.linear.weight"]))


def test_fsdp_needs_several_processes_and_says_what_it_does_not_go_with():
    import train
    with pytest.raises(UserError, match="--fsdp does not go with --lora-rank"):
        train.parse_args(["--preset", "tiny-random", "--fsdp", "--lora-rank", "4"])
    with pytest.raises(UserError, match="--fsdp does not go with --precision fp16"):
        train.parse_args(["--preset", "tiny-random", "--fsdp", "--precision", "fp16"])
    with pytest.raises(UserError, match="launch train.py with accelerate launch"):
        train.train(train.parse_args(["--preset", "tiny-random", "--fsdp", "--cpu"]))
