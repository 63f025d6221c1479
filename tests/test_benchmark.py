"""benchmark.py on the tiny-random preset: a random DiT saved as the "student", a 5-prompt file, the CPU."""
import io
import json
import os
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import benchmark
import shapes
from benchmark import (DATA, PARTI_URL, clip_scores, get_prompts, main, parse_args, partial_caption_grid, real_renders,
                       run_benchmark, shapes_metrics)
from pipeline import GUIDANCE_FILE, STUDENT_FILE, build_dit, get_preset
from sampler import to_uint8
from utils import UserError, run_cli

PROMPTS = ["a red cube on a table", "a dog\twith a hat", '"quoted" at the start', "an oil painting of a fox",
           "the number five"]

pytestmark = pytest.mark.usefixtures("one_thread")


def save_student(folder, seed=1, w_conditioned=False):
    """A random tiny-random DiT as a student file (and, w-conditioned, a random non-zero guidance embedder). The
    zero-initialised adaLN layers get random weights too, else the conditioning (and w) would change nothing."""
    dit = build_dit(get_preset("tiny-random"), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    os.makedirs(folder, exist_ok=True)
    save_file(dit.state_dict(), os.path.join(folder, STUDENT_FILE))
    if w_conditioned:
        dit.add_guidance_embedder()
        torch.nn.init.normal_(dit.guidance_embedder.mlp[2].weight, std=0.5, generator=gen)
        save_file({f"guidance_embedder.{k}": v for k, v in dit.guidance_embedder.state_dict().items()},
                  os.path.join(folder, GUIDANCE_FILE))
    return os.path.join(folder, STUDENT_FILE)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    (root / "prompts.tsv").write_text("Prompt\tCategory\n" + "".join(f"{p.replace(chr(9), ' ')}\tc\n" for p in PROMPTS),
                                      encoding="utf-8")
    (root / "prompts.json").write_text(json.dumps(PROMPTS), encoding="utf-8")
    return dict(root=root, tsv=str(root / "prompts.tsv"), json=str(root / "prompts.json"),
                student=save_student(str(root / "run_a")))


def bench(files, out, *extra, prompts="json"):
    torch.set_num_threads(1)
    return run_benchmark(parse_args(["--preset", "tiny-random", "--device", "cpu", "--student", files["student"],
                                     "--prompts-file", files[prompts], "--out", str(out), "--clip-model", "none",
                                     *map(str, extra)]))


def png(folder, i):
    return np.asarray(Image.open(os.path.join(folder, f"{i:04d}.png")))


@pytest.fixture(scope="module")
def full_run(files, tmp_path_factory):
    """Students at 1 and 2 steps, the teacher at 30 and 2 steps; batches of 3 (a full one and a partial one)."""
    out = tmp_path_factory.mktemp("full")
    return out, bench(files, out, "--steps", "1", "2", "--teacher-steps", "2", "--batch-size", "3")


def test_layout_and_report(full_run):
    out, report = full_run
    folders = ["teacher_30steps", "parti_prompts_1steps", "parti_prompts_2steps", "teacher_2steps"]
    assert sorted(os.listdir(out)) == sorted(folders + ["grid.png", "report.json", "report.md"])
    for folder in folders:
        names = sorted(os.listdir(out / folder))
        assert names == [f"{i:04d}.png" for i in range(5)] + ["prompts.txt"]
        lines = (out / folder / "prompts.txt").read_text(encoding="utf-8").splitlines()
        assert lines == [f"{i:04d}.png\t{p.replace(chr(9), ' ')}" for i, p in enumerate(PROMPTS)]
        assert png(out / folder, 0).shape == (64, 64, 3)
    rows = {row["folder"]: row for row in report["configurations"]}
    assert [rows[f]["nfe"] for f in folders] == [118, 1, 2, 6]  # Heun with cfg: 2 (2N - 1); student: N
    assert [rows[f]["kind"] for f in folders] == ["teacher", "student", "student", "teacher"]
    assert rows["teacher_30steps"]["speedup"] == 1.0 and rows["parti_prompts_1steps"]["nfe_speedup"] == 118.0
    for row in rows.values():
        assert row["timed_batches"] == 2 and row["batch_latency_s"] > 0 and row["speedup"] > 0
        assert row["images_per_s"] == pytest.approx(5 / row["total_s"])
        assert row["latency_per_image_s"] == pytest.approx(row["total_s"] / 5)
    assert report["settings"]["students"] == [dict(label="run_a", path=report["settings"]["students"][0]["path"],
                                                   w_conditioned=False, guidance=None)]
    assert any("CLIP score: skipped" in n for n in report["notes"])
    assert any("Inception FD" in n for n in report["notes"])
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    md = (out / "report.md").read_text()
    assert "| teacher 30 steps | teacher_30steps | 30 | 118 |" in md and "| run_a 1 step | parti_prompts_1steps |" in md
    with Image.open(out / "grid.png") as grid:  # a caption column, 4 columns of 96 px cells (+2 px lines) under
        assert grid.size == (200 + 4 * 98, 50 + 5 * 98)  # three-line titles (label, steps, NFE), 5 prompt rows


def test_reproducible_seeds_and_batch_size(files, full_run, tmp_path):
    """Same seed -> same PNGs; another seed -> other images; the batch size changes at most the rounding."""
    ref = full_run[0] / "parti_prompts_2steps"  # seed 0, batches of 3
    bench(files, tmp_path / "again", "--steps", "2", "--batch-size", "3")
    bench(files, tmp_path / "one", "--steps", "2", "--batch-size", "1")
    bench(files, tmp_path / "seed", "--steps", "2", "--batch-size", "3", "--seed", "1")
    for i in range(5):
        assert np.array_equal(png(ref, i), png(tmp_path / "again" / "parti_prompts_2steps", i))
        one = png(tmp_path / "one" / "parti_prompts_2steps", i).astype(int)
        assert np.abs(one - png(ref, i)).max() <= 1
        assert np.abs(png(tmp_path / "seed" / "parti_prompts_2steps", i).astype(int) - png(ref, i)).mean() > 10


def test_several_students_and_guidance(files, tmp_path):
    plain = save_student(str(tmp_path / "plain"), seed=2)
    wcond = save_student(str(tmp_path / "wcond"), seed=3, w_conditioned=True)
    args = ["--student", plain, wcond, "--steps", "1", "--num-prompts", "2"]
    report = bench(files, tmp_path / "a", *args)
    assert sorted(os.listdir(tmp_path / "a")) == ["grid.png", "plain_1steps", "report.json", "report.md",
                                                  "wcond_1steps"]
    assert [(s["label"], s["w_conditioned"], s["guidance"]) for s in report["settings"]["students"]] == \
        [("plain", False, None), ("wcond", True, 5.0)]
    report = bench(files, tmp_path / "b", *args, "--student-guidance", "2", "--labels", "p", "w")
    assert [row["folder"] for row in report["configurations"]] == ["p_1steps", "w_1steps"]
    assert report["configurations"][1]["guidance"] == 2.0
    assert np.array_equal(png(tmp_path / "a" / "plain_1steps", 0), png(tmp_path / "b" / "p_1steps", 0))
    assert not np.array_equal(png(tmp_path / "a" / "wcond_1steps", 0), png(tmp_path / "b" / "w_1steps", 0))
    with pytest.raises(UserError, match="share a label"):
        bench(files, tmp_path / "c", "--student", plain, plain)
    with pytest.raises(UserError, match="--labels names 1 students but --student gives 2"):
        bench(files, tmp_path / "c", "--student", plain, wcond, "--labels", "x")


def test_missing_student(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="runs/cd-tiny-random/student_final.safetensors.*train.py --preset tiny-random"):
        run_benchmark(parse_args(["--preset", "tiny-random", "--prompts-file", files["json"]]))


def test_prompt_files(files, tmp_path):
    texts = ["first prompt", "second, with a comma", "third"]
    (tmp_path / "p.txt").write_text("\n".join(texts) + "\n\n", encoding="utf-8")
    (tmp_path / "p.csv").write_text("id,prompt\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(texts)))
    (tmp_path / "p.json").write_text(json.dumps([{"Prompt": t} for t in texts]))
    preset = get_preset("tiny-random")
    for name in ("p.txt", "p.csv", "p.json"):
        args = parse_args(["--prompts-file", str(tmp_path / name), "--num-prompts", "2"])
        assert get_prompts(args, preset) == (texts[:2], str(tmp_path / name))
    tsv = parse_args(["--prompts-file", files["tsv"]])
    assert get_prompts(tsv, preset)[0] == [p.replace("\t", " ") for p in PROMPTS]
    tiny = parse_args(["--num-prompts", "3", "--seed", "7", "--partial-captions", "2", "--seeds-per-caption", "3"])
    assert get_prompts(tiny, get_preset("tiny")) == (shapes.lab_prompts(3, 2, 3, 7), "the shapes lab's captions "
                                                     "of stream 7: 3 full, 2 partial x 3 seeds")
    assert parse_args(["--num-prompts", "1000"]).partial_captions == 100

    (tmp_path / "bad.tsv").write_text("Text\tCategory\nx\ty\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    for name, message in (("bad.tsv", "no column 'Prompt'"), ("empty.txt", "no prompts"), ("latin1.txt", "not UTF-8")):
        with pytest.raises(UserError, match=f"{name}: {message}"):
            bench(files, tmp_path / "out", "--prompts-file", str(tmp_path / name))  # the last --prompts-file wins
    assert not os.path.exists(tmp_path / "out")


def test_partiprompts_from_working_directory_cache_or_one_download(files, tmp_path, monkeypatch, capsys):
    """No prompt file: PartiPrompts.tsv from the working directory, else the cache, else one download into the cache
    (here a stand-in for urlopen: tests use no network). Offline, a one-line error naming where to get it; a bad
    download is not cached; a preset with its own prompts (tiny) uses those."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(benchmark, "PARTI_CACHE", str(tmp_path / "cache" / "PartiPrompts.tsv"))
    downloads = []

    def urlopen(body):
        def fake(url, timeout):
            downloads.append(url)
            if body is None:
                raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
            return io.BytesIO(body)
        return fake

    argv = ["--preset", "tiny-random", "--student", files["student"], "--out", str(tmp_path / "out")]
    monkeypatch.setattr(urllib.request, "urlopen", urlopen(None))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and err.startswith("error: no prompt file, and the download failed (URLError")
    assert PARTI_URL in err and "--prompts-file PATH" in err and not os.path.exists(tmp_path / "out")
    monkeypatch.setattr(urllib.request, "urlopen", urlopen(b"<html>rate limited</html>"))
    with pytest.raises(UserError, match="no column 'Prompt'"):
        benchmark.parti_prompts_file()
    assert not os.path.exists(benchmark.PARTI_CACHE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        benchmark.parti_prompts_file()
    assert len(downloads) == 2

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(urllib.request, "urlopen", urlopen(b"Prompt\tCategory\ncached one\ta\ncached two\tb\n"))
    args = parse_args(["--preset", "tiny-random", "--num-prompts", "2"])
    for _ in range(2):  # downloaded once, then read from the cache
        assert get_prompts(args, get_preset("tiny-random")) == (["cached one", "cached two"], benchmark.PARTI_CACHE)
    assert len(downloads) == 3
    (tmp_path / "PartiPrompts.tsv").write_text("Prompt\tCategory\nlocal one\ta\nlocal two\tb\nlocal three\tc\n")
    assert get_prompts(args, get_preset("tiny-random")) == (["local one", "local two"], "PartiPrompts.tsv")
    prompts, source = get_prompts(parse_args(["--preset", "tiny", "--num-prompts", "3", "--seed", "5"]),
                                  get_preset("tiny"))
    assert prompts == shapes.captions(shapes.sample_attributes(3, 5)) and "shapes lab" in source and len(downloads) == 3


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # a dozen images in 130-d features
def test_shapes_metrics_and_partial_grid(monkeypatch, tmp_path):
    torch.manual_seed(0)
    monkeypatch.setattr(shapes, "load_classifier", lambda: shapes.ShapesClassifier().eval())
    prompts = shapes.lab_prompts(6, 2, 4, seed=4)  # 6 full captions, then 2 partial ones x 4 seeds
    data = real_renders(prompts, 4)
    assert np.array_equal(data[:6], to_uint8((shapes.sample(6, 4)[0] + 1) / 2))
    teacher, student = data.copy(), to_uint8(torch.rand(len(prompts), 3, 32, 32))
    metrics, note = shapes_metrics({"teacher 30 steps": teacher, "s 1 step": student}, prompts, data,
                                   "teacher 30 steps")
    assert note is None and set(metrics) == {DATA, "teacher 30 steps", "s 1 step"}
    assert metrics["teacher 30 steps"]["full/shapes_fd_data"] == pytest.approx(0, abs=1e-6)  # the data itself
    assert metrics["teacher 30 steps"]["partial/coverage_tv_data"] == 0
    for form in ("full", "partial"):
        assert {f"{form}/adherence", f"{form}/sharp", f"{form}/precision_data", f"{form}/recall_teacher",
                f"{form}/shapes_fd_teacher"} <= set(metrics["s 1 step"])
        assert f"{form}/shapes_fd_data" not in metrics[DATA] and f"{form}/shapes_fd_teacher" in metrics[DATA]
    assert {"partial/coverage_tv", "partial/coverage_tv_teacher"} <= set(metrics["s 1 step"])
    assert "full/coverage_tv" not in metrics["s 1 step"] and metrics["s 1 step"]["full/shapes_fd_data"] > 1e-3
    assert real_renders(PROMPTS[:6], 4) is None
    metrics, note = shapes_metrics({"s 1 step": student[:6]}, PROMPTS[:6], None, "teacher 30 steps")
    assert metrics == {} and note == "shapes metrics: skipped, the prompts are not shapes-world captions"

    columns = {"real data": data, "s 1 step": student}
    assert partial_caption_grid(str(tmp_path / "g.png"), columns, prompts, seeds=3)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape[0] > 4 * 96 and grid.shape[1] > 3 * 96  # 2 captions x 2 rows, 3 seeds: 96 px cells
    assert not partial_caption_grid(str(tmp_path / "none.png"), columns, prompts[:6])


def test_clip_model_unavailable(monkeypatch):
    def unavailable(*args, **kwargs):
        raise RuntimeError("Failed to download file\nsecond line")
    monkeypatch.setattr(benchmark.open_clip, "create_model_and_transforms", unavailable)
    images = {"x": np.zeros((1, 8, 8, 3), np.uint8)}
    scores, note = clip_scores(images, ["p"], "hf-hub:org/model", torch.device("cpu"), 1)
    assert scores is None
    assert "hf-hub:org/model" in note and "RuntimeError: Failed to download file" in note and "\n" not in note
    with pytest.raises(UserError, match="--clip-model ViT-B-32: use hf-hub"):
        parse_args(["--clip-model", "ViT-B-32"])


class StandInCLIP(torch.nn.Module):
    """A CLIP with open_clip's interface whose towers are readable: a prompt's text feature is (its length, its
    number of 'a's, 1); an image's feature is its mean RGB (the stand-in preprocess)."""

    def encode_text(self, tokens):
        return tokens.float()

    def encode_image(self, pixels):
        return pixels


def stand_in_tokenizer(prompts):
    return torch.tensor([[len(p), p.count("a"), 1] for p in prompts])


def stand_in_preprocess(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).mean((0, 1))


def test_clip_score_with_a_stand_in_model(monkeypatch):
    monkeypatch.setattr(benchmark.open_clip, "create_model_and_transforms",
                        lambda arch, pretrained, device: (StandInCLIP(), None, stand_in_preprocess))
    monkeypatch.setattr(benchmark.open_clip, "get_tokenizer", lambda arch: stand_in_tokenizer)
    rng = np.random.default_rng(0)
    images = {name: rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8) for name in ("a", "b")}
    prompts = ["a cat", "banana", "x", "a long caption", "aaa"]
    scores, note = clip_scores(images, prompts, "ViT-B-32:weights.bin", torch.device("cpu"), batch_size=2)
    assert note is None and set(scores) == {"a", "b"}
    text = np.array([[len(p), p.count("a"), 1] for p in prompts], dtype=np.float64)
    for name, imgs in images.items():
        feats = imgs.astype(np.float64).mean((1, 2))
        cos = (feats * text).sum(1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(text, axis=1)
        assert scores[name] == pytest.approx(100 * np.clip(cos, 0, None).mean(), rel=1e-5)


class StandInFID:
    """torchmetrics' FrechetInceptionDistance interface (update(uint8 NCHW, real=), reset() keeping the real
    statistics, compute()) over a readable feature: the mean RGB of each image."""

    def __init__(self, feature, reset_real_features):
        assert feature == 2048 and not reset_real_features
        self.real, self.fake = [], []

    def to(self, device):
        return self

    def update(self, images, real):
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        (self.real if real else self.fake).append(images.double().mean((2, 3)))

    def reset(self):
        self.fake = []

    def compute(self):
        return torch.tensor(shapes.frechet_distance(torch.cat(self.fake), torch.cat(self.real)))


def test_inception_fd_with_a_stand_in_model(monkeypatch):
    module = type(sys)("torchmetrics.image.fid")
    module.FrechetInceptionDistance = StandInFID
    monkeypatch.setitem(sys.modules, "torchmetrics", type(sys)("torchmetrics"))
    monkeypatch.setitem(sys.modules, "torchmetrics.image", type(sys)("torchmetrics.image"))
    monkeypatch.setitem(sys.modules, "torchmetrics.image.fid", module)
    rng = np.random.default_rng(1)
    images = {"teacher 30 steps": rng.integers(0, 256, (70, 4, 4, 3), dtype=np.uint8),  # 70: two chunks of <= 50
              "s 1 step": rng.integers(0, 128, (70, 4, 4, 3), dtype=np.uint8),
              "s 2 steps": rng.integers(64, 256, (70, 4, 4, 3), dtype=np.uint8)}
    fds, note = benchmark.inception_fds(images, "teacher 30 steps", {}, torch.device("cpu"))
    assert note is None and set(fds) == {"s 1 step", "s 2 steps"}
    features = {name: torch.from_numpy(x.astype(np.float64).mean((1, 2))) for name, x in images.items()}
    for name in fds:
        assert fds[name] == pytest.approx(shapes.frechet_distance(features[name], features["teacher 30 steps"]))
    assert fds["s 1 step"] > 100 and fds["s 2 steps"] > 100  # darker and lighter sets are far from the reference
    fds, note = benchmark.inception_fds({"s 1 step": images["s 1 step"]}, "teacher 30 steps", {}, torch.device("cpu"))
    assert fds is None and "--compare-teacher" in note
