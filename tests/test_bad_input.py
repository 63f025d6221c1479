"""Bad input to the three scripts: exit status 2, one line on stderr naming the file or key, no traceback, nothing
left in the output folder, and the expensive work (loading weights, rendering) never started."""
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import benchmark
import generate_data
import train
import validation
from dataset import save_shard
from pipeline import build_dit, get_preset
from utils import run_cli

PROMPTS = ["a red circle", "a blue square"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """One folder of bad (and a few good) input files."""
    root = tmp_path_factory.mktemp("bad")
    (root / "prompts.json").write_text(json.dumps(PROMPTS), encoding="utf-8")
    (root / "empty.json").write_text("[]", encoding="utf-8")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (root / "broken.json").write_text('["a red circle", ', encoding="utf-8")
    (root / "garbage.pt").write_bytes(os.urandom(1000))
    with open(root / "pickled.pt", "wb") as f:
        pickle.dump({"weights": object()}, f)
    (root / "corrupt.safetensors").write_bytes(b"\xff" * 64)
    save_file({k: v.contiguous() for k, v in build_dit(get_preset("tiny")).state_dict().items()},
              str(root / "other_arch.safetensors"))
    # a data folder with a corrupt PNG, one with a truncated shard, one whose shards belong to another preset
    for name in ("png_data", "shard_data", "shape_data", "good_data", "no_images"):
        (root / name / "images").mkdir(parents=True)
    (root / "png_data" / "captions.json").write_text(json.dumps({"00000.png": "a red circle"}), encoding="utf-8")
    (root / "png_data" / "images" / "00000.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (root / "no_images" / "captions.json").write_text(json.dumps({"00007.png": "a red circle"}), encoding="utf-8")
    (root / "shard_data" / "latents").mkdir()
    (root / "shard_data" / "latents" / "shard_00000_00000000.safetensors").write_bytes(b"\x08\x00" + b"\x00" * 6)
    save_shard(str(root / "shape_data" / "latents" / "shard_00000_00000001.safetensors"), torch.zeros(2, 3, 32, 32),
               torch.zeros(2, 1, 77, 64), [0, 1], PROMPTS)
    save_shard(str(root / "good_data" / "latents" / "shard_00000_00000002.safetensors"), torch.zeros(2, 4, 8, 8),
               torch.zeros(2, 1, 77, 32), [0, 1], PROMPTS)
    return root


def gen(root, *extra):
    return (generate_data.main, ["--preset", "tiny-random", "--out", str(root / "out"), "--steps", "2",
                                 "--device", "cpu", *extra])


def trn(root, *extra):
    return (lambda argv: train.train(train.parse_args(argv)),
            ["--preset", "tiny-random", "--out-dir", str(root / "out"), "--steps", "2", "--cpu", *extra])


def bench(root, *extra):
    return (benchmark.main, ["--preset", "tiny-random", "--device", "cpu", "--out", str(root / "out"),
                             "--clip-model", "none", *extra])


CASES = {  # name: (script and argv from the input folder, fragment the one line must hold)
    "missing prompt file": (lambda r: gen(r, "--prompts", str(r / "nope.json")), "nope.json"),
    "empty prompt file": (lambda r: gen(r, "--prompts", str(r / "empty.json")), "empty.json"),
    "non-UTF-8 prompt file": (lambda r: gen(r, "--prompts", str(r / "latin1.txt")), "latin1.txt"),
    "malformed prompt file": (lambda r: gen(r, "--prompts", str(r / "broken.json")), "broken.json"),
    "unknown preset": (lambda r: gen(r, "--prompts", str(r / "prompts.json"), "--preset", "huge"), "huge"),
    "garbage teacher": (lambda r: gen(r, "--prompts", str(r / "prompts.json"), "--teacher", str(r / "garbage.pt")),
                        "garbage.pt"),
    "pickled teacher": (lambda r: gen(r, "--prompts", str(r / "prompts.json"), "--teacher", str(r / "pickled.pt")),
                        "pickled.pt"),
    "wrong-architecture teacher": (lambda r: gen(r, "--prompts", str(r / "prompts.json"), "--teacher",
                                                 str(r / "other_arch.safetensors")), "pos_embed (1, 64, 96)"),
    "missing teacher": (lambda r: gen(r, "--prompts", str(r / "prompts.json"), "--teacher", str(r / "none.pt")),
                        "none.pt"),
    "teacher weights missing offline": (lambda r: gen(r, "--prompts", str(r / "prompts.json"), "--preset",
                                                      "microdit-xl-512"), "--teacher"),
    "bad number": (lambda r: gen(r, "--prompts", str(r / "prompts.json"), "--batch-size", "0"), "--batch-size"),
    "corrupt student": (lambda r: bench(r, "--student", str(r / "corrupt.safetensors"), "--prompts-file",
                                        str(r / "prompts.json")), "corrupt.safetensors"),
    "missing student": (lambda r: bench(r, "--student", str(r / "none.safetensors"), "--prompts-file",
                                        str(r / "prompts.json")), "none.safetensors"),
    "benchmark prompt file": (lambda r: bench(r, "--student", str(r / "other_arch.safetensors"), "--prompts-file",
                                              str(r / "broken.json")), "broken.json"),
    "corrupt PNG": (lambda r: trn(r, "--data-dir", str(r / "png_data")), "00000.png"),
    "captions for missing images": (lambda r: trn(r, "--data-dir", str(r / "no_images")), "no captioned images"),
    "truncated latent shard": (lambda r: trn(r, "--data-dir", str(r / "shard_data")), "shard_00000_00000000"),
    "shards of another preset": (lambda r: trn(r, "--data-dir", str(r / "shape_data")), "shard_00000_00000001"),
    "corrupt checkpoint to resume": (lambda r: trn(r, "--data-dir", str(r / "good_data"), "--resume",
                                                   str(r / "garbage.pt")), "garbage.pt"),
    "bad training number": (lambda r: trn(r, "--data-dir", str(r / "png_data"), "--steps", "0"), "--steps"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_leaves_nothing(case, inputs, capsys, monkeypatch):
    make, fragment = CASES[case]
    script, argv = make(inputs)
    # The expensive work must not start: rendering fails the test (weights loading is allowed, it is the check).
    monkeypatch.setattr(validation, "Validator", lambda *a, **k: pytest.fail("validation images rendered"))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: script(argv))
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert exit_info.value.code == 2 and len(errors) == 1 and "Traceback" not in "".join(err), err
    assert fragment in errors[0] and len(errors[0].replace(str(inputs), "")) < 250, errors[0]
    out = inputs / "out"
    assert not out.exists() or not [f for _, _, files in os.walk(out) for f in files], list(os.walk(out))


def test_corrected_rerun_after_a_bad_teacher_needs_no_clean_up(inputs, tmp_path):
    out = tmp_path / "data"
    argv = ["--preset", "tiny-random", "--out", str(out), "--steps", "2", "--device", "cpu", "--prompts",
            str(inputs / "prompts.json")]
    with pytest.raises(SystemExit):
        run_cli(lambda: generate_data.main(argv + ["--teacher", str(inputs / "garbage.pt")]))
    assert not out.exists()
    # a folder whose manifest names other settings but holds no finished item does not lock the folder either
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"settings": {"teacher": "garbage.pt"}}), encoding="utf-8")
    generate_data.main(argv)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["complete"] and manifest["settings"]["teacher"] is None
