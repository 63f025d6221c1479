"""train_teacher.py: a run split across sittings (--stop-at, then --resume) ends with the same weights as one
uninterrupted run, and a resume with other settings is refused."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_teacher
from utils import UserError

TINY_RUN = ["--steps", "2", "--partial-steps", "2", "--partial-cycles", "1", "--batch-size", "4", "--warmup", "2",
            "--eval-every", "2", "--eval-captions", "4", "--eval-samples", "5", "--eval-seeds", "2", "--device", "cpu"]


def test_resumed_run_equals_uninterrupted_run(tmp_path, one_thread):
    whole, split = str(tmp_path / "whole.safetensors"), str(tmp_path / "split.safetensors")
    train_teacher.main(TINY_RUN + ["--out", whole])
    train_teacher.main(TINY_RUN + ["--out", split, "--stop-at", "3"])
    assert not (tmp_path / "split.safetensors").exists() and (tmp_path / "split_state.pt").exists()
    train_teacher.main(TINY_RUN + ["--out", split, "--resume"])
    a, b = load_file(whole), load_file(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(whole, "pt") as f, safe_open(split, "pt") as g:
        meta_a, meta_b = f.metadata(), g.metadata()
    curves = [[{k: v for k, v in point.items() if k != "train_minutes"} for point in json.loads(m["curve"])]
              for m in (meta_a, meta_b)]
    assert curves[0] == curves[1] and [point["step"] for point in curves[1]] == [2]  # same scores at step 2
    assert "--resume" in meta_b["sittings"] and meta_b["command"].endswith("--stop-at 3")
    assert {f"{form}/{m}" for form in ("full", "partial")
            for m in ("adherence", "one_object", "sharp", "shapes_fd_data", "shapes_fd_floor")} <= set(meta_b)
    assert {"partial/coverage_tv", "partial/coverage_tv_floor", "device", "train_minutes", "partial_steps"} <= set(meta_b)


def test_finished_run_continues_with_more_cycles(tmp_path, one_thread):
    """A run finished with one cycle of partial steps, resumed with two, equals a run started with two: the
    learning rate restarts at the end of each cycle whatever their number."""
    whole, grown = str(tmp_path / "whole.safetensors"), str(tmp_path / "grown.safetensors")
    train_teacher.main(TINY_RUN + ["--out", whole, "--partial-cycles", "2"])
    train_teacher.main(TINY_RUN + ["--out", grown, "--partial-cycles", "1"])
    one_cycle = load_file(grown)
    train_teacher.main(TINY_RUN + ["--out", grown, "--partial-cycles", "2", "--resume"])
    a, b = load_file(whole), load_file(grown)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], one_cycle[k]) for k in a)
    assert [train_teacher.lr_factor(s, 1, 2, 2) for s in range(6)] == [1.0, 0.5, 1.0, 0.5, 1.0, 0.5]
    with pytest.raises(UserError, match="past the 4 steps"):
        train_teacher.main(TINY_RUN + ["--out", grown, "--partial-cycles", "1", "--resume"])


def test_resume_with_other_settings_is_refused(tmp_path, one_thread):
    out = str(tmp_path / "t.safetensors")
    train_teacher.main(TINY_RUN + ["--out", out, "--stop-at", "1"])
    with pytest.raises(UserError, match="lr=0.001 .now 0.002"):
        train_teacher.main(TINY_RUN + ["--out", out, "--resume", "--lr", "2e-3"])
    with pytest.raises(UserError, match="no state file"):
        train_teacher.main(TINY_RUN + ["--out", str(tmp_path / "other.safetensors"), "--resume"])
