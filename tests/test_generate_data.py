"""Teacher data generation on the tiny-random preset (CPU, 2 Heun steps, a handful of prompts)."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from accelerate import PartialState
from PIL import Image

import generate_data
from dataset import IMAGES_DIR, LATENTS_DIR, LatentCaptionDataset, list_shards
from generate_data import main, rank_batches, sample_prompts, write_summary_files
from pipeline import get_preset, load_pipeline
from sampler import generate_images, load_prompts, to_uint8
from shapes import captions, sample_attributes
from utils import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [f"a photo of object number {i}, {'highly detailed ' * (i % 3)}" for i in range(5)]
STEPS, BATCH = 2, 2

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True, scope="module")
def fresh_accelerate_state():
    """main() sets up accelerate's process-wide PartialState; leave none behind for other test modules."""
    yield
    PartialState._reset_state()


def run(prompts_path, out, *extra):
    main(["--prompts", str(prompts_path), "--out", str(out), "--preset", "tiny-random", "--steps", str(STEPS),
          "--batch-size", str(BATCH), "--device", "cpu", *map(str, extra)])


def tree(folder):
    """{relative path: bytes} of every file under `folder`."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


def latents_by_index(folder):
    ds = LatentCaptionDataset(str(folder))
    return {ds[i]["index"]: (ds[i]["latents"], ds[i]["embeddings"], ds[i]["caption"]) for i in range(len(ds))}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.json"
    path.write_text(json.dumps(PROMPTS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(prompts_file, tmp_path_factory):
    """One uninterrupted single-process run."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reference") / "data"
    run(prompts_file, out)
    return out


def test_layout_and_contents(reference):
    names = [f"{i:04d}.png" for i in range(len(PROMPTS))]
    assert sorted(os.listdir(reference / IMAGES_DIR)) == names
    assert len(list_shards(str(reference))) == 3  # batches of 2, 2, 1
    assert json.loads((reference / "captions.json").read_text()) == dict(zip(names, PROMPTS))
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_finished"] == len(PROMPTS)
    assert manifest["settings"]["steps"] == STEPS and manifest["settings"]["guidance"] == 5.0
    assert manifest["settings"]["seed"] == 2024 and manifest["settings"]["preset"] == "tiny-random"
    assert manifest["shapes"] == {"latents": [4, 8, 8], "embeddings": [1, 77, 32], "image": [3, 64, 64]}
    # The files hold what generate_images makes for (prompt i, seed 2024 + i), in the same batches.
    pipe = load_pipeline("tiny-random", seed=0)
    expected = generate_images(pipe, PROMPTS[:2], [2024, 2025], num_steps=STEPS, batch_size=2)
    stored = latents_by_index(reference)
    for row, i in enumerate([0, 1]):
        latents, embeddings, caption = stored[i]
        assert caption == PROMPTS[i]
        assert torch.equal(latents, expected["latents"][row].half())
        assert torch.equal(embeddings, expected["embeddings"][row].half())
        png = np.asarray(Image.open(reference / IMAGES_DIR / names[i]))
        assert np.array_equal(png, to_uint8(expected["images"])[row])
    assert not any(name.startswith(".tmp") for name in tree(reference))


def test_resume_after_interruption_is_byte_identical(prompts_file, reference, tmp_path, monkeypatch):
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while the second batch is being generated
        return generate_images(*args, **kwargs)

    monkeypatch.setattr(generate_data, "generate_images", failing)
    with pytest.raises(KeyboardInterrupt):
        run(prompts_file, tmp_path)
    assert sorted(os.listdir(tmp_path / IMAGES_DIR)) == ["0000.png", "0001.png"]  # the finished batch is kept
    assert json.loads((tmp_path / "manifest.json").read_text())["complete"] is False
    monkeypatch.undo()
    run(prompts_file, tmp_path)
    assert tree(tmp_path) == tree(reference)

    # A batch whose PNGs were written but not its shard (killed mid-write) is redone; finished items are not.
    shard = next(p for p in list_shards(str(tmp_path)) if "shard_00002" in p)
    os.remove(shard)
    os.remove(tmp_path / IMAGES_DIR / "0003.png")
    calls.clear()
    monkeypatch.setattr(generate_data, "generate_images",
                        lambda *a, **k: calls.append(a[1]) or generate_images(*a, **k))
    run(prompts_file, tmp_path)
    assert calls == [PROMPTS[2:4]]
    assert tree(tmp_path) == tree(reference)


def test_batch_size_does_not_change_latents(prompts_file, reference, tmp_path):
    run(prompts_file, tmp_path / "b1", "--batch-size", 1)
    run(prompts_file, tmp_path / "b3", "--batch-size", 3)
    ref = latents_by_index(reference)
    for folder in ("b1", "b3"):
        got = latents_by_index(tmp_path / folder)
        assert got.keys() == ref.keys()
        for i in ref:
            assert torch.equal(got[i][0], ref[i][0]), f"latents of item {i} differ with {folder}"
            # the text tower and the VAE round differently for other batch sizes: last-bit differences only
            assert torch.allclose(got[i][1].float(), ref[i][1].float(), atol=2e-3, rtol=1e-3)
            a = np.asarray(Image.open(tmp_path / folder / IMAGES_DIR / f"{i:04d}.png"), dtype=int)
            b = np.asarray(Image.open(reference / IMAGES_DIR / f"{i:04d}.png"), dtype=int)
            assert np.abs(a - b).max() <= 1


def test_rank_batches_cover_each_item_once():
    todo = [0, 1, 2, 4, 5, 7, 8, 9, 11]
    for world in (1, 2, 3, 5):
        shards = [rank_batches(todo, 2, r, world) for r in range(world)]
        items = [i for batches in shards for b in batches for i in b]
        assert sorted(items) == todo
        assert all(len(b) <= 2 for batches in shards for b in batches)
        assert sorted(b for batches in shards for b in map(tuple, batches)) == sorted(
            map(tuple, rank_batches(todo, 2, 0, 1)))  # the same batches as one process


def test_two_ranks_in_process_equal_one_process(prompts_file, reference, tmp_path):
    pipe = load_pipeline("tiny-random", seed=0)
    todo = list(range(len(PROMPTS)))
    for rank in range(2):
        generate_data.generate_batches(pipe, PROMPTS, rank_batches(todo, BATCH, rank, 2), str(tmp_path), STEPS, 5.0,
                                       2024, show_progress=False)
    settings = json.loads((reference / "manifest.json").read_text())["settings"]
    write_summary_files(str(tmp_path), PROMPTS, settings)
    assert tree(tmp_path) == tree(reference)


def test_accelerate_two_processes_equal_one_process(prompts_file, reference, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # `--cpu` would make accelerate start one process (it expects MPI for several); `--multi_gpu` starts torchrun
    # workers, which PartialState joins over gloo, and `--device cpu` keeps them on the CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "generate_data.py",
           "--prompts", str(prompts_file), "--out", str(tmp_path / "data"), "--preset", "tiny-random",
           "--steps", str(STEPS), "--batch-size", str(BATCH), "--device", "cpu"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0/2" in result.stderr and "rank 1/2" in result.stderr
    assert tree(tmp_path / "data") == tree(reference)


def test_settings_mismatch_and_bad_input(prompts_file, reference, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(reference, data)
    with pytest.raises(UserError, match="other settings: steps=2 \\(now 3\\)"):
        main(["--prompts", str(prompts_file), "--out", str(data), "--preset", "tiny-random", "--steps", "3",
              "--device", "cpu"])
    other = tmp_path / "other.txt"
    other.write_text("a different prompt\n")
    with pytest.raises(UserError, match="num_prompts=5 \\(now 1\\)"):
        run(other, data)
    bad = data / LATENTS_DIR / "shard_00000_deadbeef.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="corrupt latent shard .*shard_00000_deadbeef"):
        run(prompts_file, data)
    with pytest.raises(UserError, match="is not a folder"):
        run(prompts_file, prompts_file)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(UserError, match="empty.json: no prompts"):
        run(empty, tmp_path / "d2")
    blank = tmp_path / "blank.json"
    blank.write_text('["ok", ""]')
    with pytest.raises(UserError, match="blank.json: item 1 is an empty prompt"):
        run(blank, tmp_path / "d3")
    with pytest.raises(UserError, match="no prompt list: pass --prompts FILE"):
        main(["--out", str(tmp_path / "d4"), "--preset", "tiny-random", "--device", "cpu"])
    assert not os.path.exists(tmp_path / "d2") and not os.path.exists(tmp_path / "d4")


def test_preset_prompt_source(tmp_path, monkeypatch):
    """A preset with prompt_source(num, seed) (the shapes world) needs no --prompts."""
    preset = get_preset("tiny-random")
    with_source = dataclasses.replace(preset, prompt_source=lambda num, seed: captions(sample_attributes(num, seed)))
    monkeypatch.setattr(generate_data, "get_preset", lambda name: with_source)
    main(["--out", str(tmp_path), "--preset", "tiny-random", "--steps", "1", "--num", "3", "--sample-seed", "5",
          "--device", "cpu"])
    expected = captions(sample_attributes(3, 5))
    assert list(json.loads((tmp_path / "captions.json").read_text()).values()) == expected


def test_sample_prompts_from_source(tmp_path, capsys):
    source = tmp_path / "annotations.jsonl"
    lines = [json.dumps({"img_path": f"{i}.jpg", "prompt": f"synthetic prompt {i}"}) for i in range(20000)]
    lines += [json.dumps({"prompt": "synthetic prompt 7"}), json.dumps({"prompt": ""})]  # a duplicate, an empty one
    source.write_text("\n".join(lines) + "\n")
    out_a, out_b, out_c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    for out, seed in ((out_a, 0), (out_b, 0), (out_c, 1)):
        main(["--sample-from", str(source), "--field", "prompt", "--num", "5000", "--sample-seed", str(seed),
              "--prompts", str(out), "--device", "cpu"])
    assert "skipped 1 empty or non-string" in capsys.readouterr().err
    a, c = load_prompts(str(out_a)), load_prompts(str(out_c))
    assert out_a.read_bytes() == out_b.read_bytes()
    assert len(a) == len(set(a)) == 5000 and a != c and set(a) != set(c)
    assert set(a) <= {f"synthetic prompt {i}" for i in range(20000)}
    assert sample_prompts(["x", "y", "x"], 2, 0) in (["x", "y"], ["y", "x"])
    with pytest.raises(UserError, match="cannot sample 3 prompts from a source with 2 distinct"):
        sample_prompts(["x", "y", "x"], 3, 0)
