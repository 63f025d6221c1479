"""Latents people already have (latents/*.pt + prompts/*.txt) become latent shards: dataset.import_latent_files
through `python dataset.py --import` and `train.py --data-dir`, on tiny-random shapes (latents (4, 8, 8))."""
import json
import os
import pickle

import pytest
import torch

import dataset
import train
from dataset import LATENTS_DIR, MANIFEST_JSON, PROMPTS_DIR, LatentCaptionDataset, list_shards
from pipeline import get_preset, load_text_encoder
from utils import UserError

PRESET = get_preset("tiny-random")
SCALING = 0.13025  # the tiny-random VAE's config, as SDXL's
CAPTIONS = ["a red circle", "a blue square on green", "a photo of a cat", "two dogs", "a house", "the sea"]


def make_folder(root, scale=1 / SCALING, shape=PRESET.latent_shape, n=len(CAPTIONS)):
    """root/latents/img_K.pt (randn * scale) and root/prompts/img_K.txt; returns the latents in stem order."""
    os.makedirs(root / LATENTS_DIR), os.makedirs(root / PROMPTS_DIR)
    latents = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0)) * scale
    for k in range(n):
        torch.save(latents[k].clone(), root / LATENTS_DIR / f"img_{k}.pt")
        (root / PROMPTS_DIR / f"img_{k}.txt").write_text(CAPTIONS[k] + "\n")
    return latents


def imported(data_dir):
    ds = LatentCaptionDataset(str(data_dir))
    return ds, torch.stack([ds[i]["latents"] for i in range(len(ds))]).float()


@pytest.mark.parametrize("scale, flag, multiplier", [(1 / SCALING, "auto", SCALING), (1.0, "auto", 1.0),
                                                     (1.0, "no", SCALING), (1 / SCALING, "yes", 1.0)])
def test_import_scales_by_std_or_flag(tmp_path, capsys, scale, flag, multiplier):
    latents = make_folder(tmp_path / "src", scale)
    dataset.main(["--import", str(tmp_path / "src"), str(tmp_path / "out"), "--preset", "tiny-random",
                  "--latents-scaled", flag])
    out = capsys.readouterr().out
    ds, stored = imported(tmp_path / "out")
    torch.testing.assert_close(stored, latents * multiplier, rtol=1e-3, atol=1e-3)  # float16 shards
    assert ds.captions == CAPTIONS and ds.indices == list(range(len(CAPTIONS)))
    manifest = json.loads((tmp_path / "out" / MANIFEST_JSON).read_text())
    assert manifest["multiplier"] == multiplier and manifest["complete"]
    assert ("multiplied by it" if multiplier != 1 else "used as they are") in out
    assert f"latents: {len(CAPTIONS)} items" in out and "problems: 0" in out


def test_import_encodes_captions_with_the_presets_text_encoder(tmp_path):
    make_folder(tmp_path)
    dataset.main(["--import", str(tmp_path), "--preset", "tiny-random"])  # in place: shards beside the .pt files
    ds = LatentCaptionDataset(str(tmp_path))
    embeddings = torch.cat([ds[i]["embeddings"] for i in range(len(ds))]).float()
    expected = load_text_encoder(PRESET).encode(CAPTIONS)[:, 0]
    torch.testing.assert_close(embeddings, expected, rtol=2e-3, atol=2e-3)


def corrupt(root, kind):
    if kind == "missing caption":
        os.remove(root / PROMPTS_DIR / "img_3.txt")
        return "img_3.txt"
    if kind == "empty caption":
        (root / PROMPTS_DIR / "img_3.txt").write_text("  \n")
        return "img_3.txt"
    path = root / LATENTS_DIR / "img_3.pt"
    if kind == "wrong shape":
        torch.save(torch.zeros(1, 4, 8, 8), path)
    elif kind == "pickled object":
        with open(path, "wb") as f:
            pickle.dump({"latents": object()}, f)
    elif kind == "not a tensor":
        torch.save({"latents": torch.zeros(4, 8, 8)}, path)
    elif kind == "non-finite":
        torch.save(torch.full((4, 8, 8), float("nan")), path)
    return "img_3.pt"


@pytest.mark.parametrize("kind, message", [("missing caption", "is missing"), ("empty caption", "empty caption"),
                                           ("wrong shape", "(1, 4, 8, 8)"), ("pickled object", "tensors-only"),
                                           ("not a tensor", "found dict"), ("non-finite", "non-finite")])
def test_import_bad_files_fail_naming_the_file_before_encoding(tmp_path, kind, message):
    make_folder(tmp_path)
    name = corrupt(tmp_path, kind)
    with pytest.raises(UserError) as e:
        dataset.main(["--import", str(tmp_path), "--preset", "tiny-random"])
    assert name in str(e.value) and message in str(e.value) and "\n" not in str(e.value)
    assert not list_shards(str(tmp_path))  # nothing written before the files were all read


def test_train_on_a_latent_file_folder_imports_once_and_resumes(tmp_path, capsys):
    make_folder(tmp_path / "src")

    def run(steps, out="run", *extra):
        return train.train(train.parse_args([
            "--preset", "tiny-random", "--data-dir", str(tmp_path / "src"), "--out-dir", str(tmp_path / out),
            "--batch-size", "2", "--steps", str(steps), "--val-every", "0", "--val-samples", "1", "--cpu", *extra]))

    result = run(2)
    assert result["step"] == 2 and os.path.isfile(result["student"])
    assert "multiplied by it" in capsys.readouterr().out
    shards = list_shards(str(tmp_path / "src"))
    assert len(shards) == 1
    mtime = os.path.getmtime(shards[0])
    assert run(3, "run", "--resume", "auto")["step"] == 3
    assert "imported before" in capsys.readouterr().out and os.path.getmtime(shards[0]) == mtime
    # the same folder with other settings is refused, not mixed
    with pytest.raises(UserError, match="imported with other settings: scaled=None \\(now True\\)"):
        run(1, "run2", "--latents-scaled", "yes")
