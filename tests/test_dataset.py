"""Prompt files, initial noise, the data folder format, the datasets and the infinite sampler (no pipeline)."""
import json
import os

import pytest
import torch
from PIL import Image

import dataset
from dataset import (CAPTIONS_CSV, CAPTIONS_JSON, IMAGES_DIR, LATENTS_DIR, ImageCaptionDataset, InfiniteSampler,
                     LatentCaptionDataset, get_dataloader, image_name, save_shard, shard_name)
from sampler import initial_noise, load_prompts
from utils import UserError, run_cli


def write(path, text, encoding="utf-8"):
    with open(path, "w", encoding=encoding, newline="") as f:
        f.write(text)
    return str(path)


# ----------------------------------------------------------------------------------------------------------
# Prompt files


def test_load_prompts_formats(tmp_path):
    expected = ["a red cat", 'a sign that says "hi", twice', "ünïcode prompt"]
    assert load_prompts(write(tmp_path / "p.json", json.dumps(expected))) == expected
    assert load_prompts(write(tmp_path / "p.txt", "a red cat\n\n" + expected[1] + "\r\nünïcode prompt")) == expected
    tsv = "Prompt\tCategory\n" + "".join(f"{p}\tx\n" for p in expected)
    assert load_prompts(write(tmp_path / "p.tsv", tsv)) == expected
    csv_text = 'id,Prompt\n0,a red cat\n1,"a sign that says ""hi"", twice"\n2,ünïcode prompt\n'
    assert load_prompts(write(tmp_path / "p.csv", csv_text)) == expected
    jsonl = "".join(json.dumps({"img_path": f"{i}.jpg", "prompt": p}) + "\n" for i, p in enumerate(expected))
    path = write(tmp_path / "p.jsonl", jsonl)
    assert load_prompts(path, "prompt") == expected
    assert load_prompts(path) == expected  # "Prompt" matches "prompt" case-insensitively
    objects = [{"Prompt": p} for p in expected]
    assert load_prompts(write(tmp_path / "o.json", json.dumps(objects))) == expected


def test_tsv_keeps_literal_quotes(tmp_path):
    path = write(tmp_path / "p.tsv", 'Prompt\tNote\n"G I G G L E" painted on a wall\tquoted\n')
    assert load_prompts(path) == ['"G I G G L E" painted on a wall']


@pytest.mark.parametrize("name, content, message", [
    ("missing.json", None, "not found"),
    ("p.json", "", "not valid JSON"),
    ("p.json", "[]", "no prompts"),
    ("p.txt", "\n\n", "no prompts"),
    ("p.json", '{"a": 1}', "JSON list"),
    ("p.json", '["ok", ""]', "item 1 is an empty prompt"),
    ("p.json", '["ok", "   "]', "item 1 is an empty prompt"),
    ("p.json", '["ok", 3]', "item 1 is a non-string prompt"),
    ("p.json", '["ok", null]', "non-string"),
    ("p.jsonl", '{"prompt": "ok"}\n{"prompt": ""}\n', "line 2 is an empty prompt"),
    ("p.jsonl", '{"prompt": "ok"}\nnot json\n', "line 2 is not valid JSON"),
    ("p.jsonl", '{"caption": "ok"}\n', "no field 'Prompt'"),
    ("p.tsv", "Text\tx\nhello\tx\n", "no column 'Prompt'"),
    ("p.csv", "Prompt,x\n,1\n", "line 2 is an empty prompt"),
    ("p.csv", "", "no prompts"),
    ("p.yaml", "- a\n", "unknown prompt file type"),
])
def test_load_prompts_bad_input(tmp_path, name, content, message):
    path = str(tmp_path / name) if content is None else write(tmp_path / name, content)
    with pytest.raises(UserError, match=message) as e:
        load_prompts(path)
    assert name in str(e.value)


def test_load_prompts_not_utf8(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_prompts(str(path))


def test_load_prompts_skip_invalid_counts(tmp_path, capsys):
    path = write(tmp_path / "p.jsonl", "".join(json.dumps({"prompt": p}) + "\n" for p in ["a", "", None, "b"]))
    assert load_prompts(path, "prompt", skip_invalid=True) == ["a", "b"]
    assert "skipped 2" in capsys.readouterr().err


def test_initial_noise_per_seed():
    both = initial_noise([5, 7], (2, 3, 3))
    assert both.shape == (2, 2, 3, 3) and both.dtype == torch.float32
    assert torch.equal(both[1:], initial_noise([7], (2, 3, 3)))
    assert torch.equal(both[0], torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(both[0], both[1])


# ----------------------------------------------------------------------------------------------------------
# Data folders


def make_image_folder(root, n=3, size=(12, 8)):
    """images/NNNNN.png of size (w, h) with distinct colours and captions.json; returns the captions."""
    os.makedirs(root / IMAGES_DIR)
    captions = {}
    for i in range(n):
        Image.new("RGB", size, (40 * i, 255 - 40 * i, 7)).save(root / IMAGES_DIR / image_name(i, n))
        captions[image_name(i, n)] = f"caption {i}"
    write(root / CAPTIONS_JSON, json.dumps(captions))
    return captions


def make_latent_folder(root, batches=((0, 1), (2,)), shape=(4, 2, 2), emb_dim=8):
    """latents/ shards whose values encode the prompt index; returns {index: caption}."""
    captions = {}
    for batch in batches:
        latents = torch.stack([torch.full(shape, float(i)) for i in batch])
        embeddings = torch.stack([torch.full((1, 77, emb_dim), -float(i)) for i in batch])
        prompts = [f"prompt {i}" for i in batch]
        captions.update(zip(batch, prompts))
        save_shard(str(root / LATENTS_DIR / shard_name(batch)), latents, embeddings, batch, prompts)
    return captions


def test_image_name_width():
    assert image_name(7, 5000) == "0007.png"
    assert image_name(7, 100001) == "000007.png"


def test_image_caption_dataset(tmp_path):
    captions = make_image_folder(tmp_path)
    ds = ImageCaptionDataset(str(tmp_path), resolution=4)
    assert len(ds) == 3
    item = ds[1]
    assert item["image"].shape == (3, 4, 4) and item["image"].dtype == torch.float32
    assert item["caption"] == captions["0001.png"] and item["index"] == 1
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    expected = torch.tensor([40, 215, 7]) / 127.5 - 1  # a flat colour survives resize and crop
    assert torch.allclose(item["image"][:, 2, 2], expected, atol=1e-6)


def test_image_caption_dataset_csv(tmp_path):
    make_image_folder(tmp_path)
    os.remove(tmp_path / CAPTIONS_JSON)
    write(tmp_path / CAPTIONS_CSV, 'file_name,caption\n0000.png,"a, b"\n0002.png,c\n')
    ds = ImageCaptionDataset(str(tmp_path), 4)
    assert [ds[i]["caption"] for i in range(len(ds))] == ["a, b", "c"]


def test_image_dataset_bad_input(tmp_path, capsys):
    with pytest.raises(UserError, match="not found"):
        ImageCaptionDataset(str(tmp_path / "nowhere"), 4)
    make_image_folder(tmp_path)
    os.remove(tmp_path / CAPTIONS_JSON)
    with pytest.raises(UserError, match="no captions.json or captions.csv"):
        ImageCaptionDataset(str(tmp_path), 4)
    # a caption for a missing image: skipped and counted
    write(tmp_path / CAPTIONS_JSON, json.dumps({"0000.png": "a", "00009.png": "gone", "0001.png": "b"}))
    ds = ImageCaptionDataset(str(tmp_path), 4)
    assert len(ds) == 2 and ds.missing == 1 and "00009.png" in capsys.readouterr().err
    # duplicate file names
    write(tmp_path / CAPTIONS_JSON, '{"00000.png": "a", "00000.png": "b"}')
    with pytest.raises(UserError, match="'00000.png' appears more than once"):
        ImageCaptionDataset(str(tmp_path), 4)
    os.remove(tmp_path / CAPTIONS_JSON)
    write(tmp_path / CAPTIONS_CSV, "file_name,caption\n00000.png,a\n00000.png,b\n")
    with pytest.raises(UserError, match="captions.csv: file name '00000.png' appears more than once"):
        ImageCaptionDataset(str(tmp_path), 4)
    write(tmp_path / CAPTIONS_CSV, "name,text\n00000.png,a\n")
    with pytest.raises(UserError, match="columns file_name and caption"):
        ImageCaptionDataset(str(tmp_path), 4)
    os.remove(tmp_path / CAPTIONS_CSV)
    # empty and non-string captions
    for bad in ('{"00000.png": ""}', '{"00000.png": 5}'):
        write(tmp_path / CAPTIONS_JSON, bad)
        with pytest.raises(UserError, match="caption of '00000.png' is empty or not a string"):
            ImageCaptionDataset(str(tmp_path), 4)
    # a corrupt PNG: UserError naming it when it is read
    write(tmp_path / CAPTIONS_JSON, json.dumps({"00000.png": "a"}))
    (tmp_path / IMAGES_DIR / "00000.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(UserError, match="00000.png"):
        ImageCaptionDataset(str(tmp_path), 4)[0]


def test_latent_caption_dataset(tmp_path):
    make_latent_folder(tmp_path, batches=((2, 0), (1,)))
    ds = LatentCaptionDataset(str(tmp_path))
    assert len(ds) == 3 and ds.indices == [0, 1, 2]
    assert ds.shapes() == {"latents": (4, 2, 2), "embeddings": (1, 77, 8)}
    item = ds[2]
    assert item["latents"].dtype == torch.float16 and item["latents"].shape == (4, 2, 2)
    assert item["embeddings"].shape == (1, 77, 8)
    assert item["index"] == 2 and item["caption"] == "prompt 2"
    assert torch.all(item["latents"] == 2) and torch.all(item["embeddings"] == -2)


def test_latent_dataset_bad_input(tmp_path):
    with pytest.raises(UserError, match="not found"):
        LatentCaptionDataset(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="no latent shards"):
        LatentCaptionDataset(str(tmp_path))
    make_latent_folder(tmp_path)
    bad = tmp_path / LATENTS_DIR / "shard_00009_00000000.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(UserError, match="corrupt latent shard .*shard_00009_00000000.safetensors"):
        LatentCaptionDataset(str(tmp_path))


def test_get_dataloader_prefers_latents(tmp_path):
    make_image_folder(tmp_path)
    loader = get_dataloader(str(tmp_path), batch_size=2, num_workers=0, resolution=4)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 4, 4) and len(batch["caption"]) == 2
    with pytest.raises(UserError, match="needs a resolution"):
        get_dataloader(str(tmp_path), batch_size=2, num_workers=0)
    make_latent_folder(tmp_path)
    batch = next(iter(get_dataloader(str(tmp_path), batch_size=3, num_workers=0, seed=1)))
    assert batch["latents"].shape == (3, 4, 2, 2) and batch["embeddings"].shape == (3, 1, 77, 8)
    assert sorted(batch["index"].tolist()) == [0, 1, 2]
    for i, caption in zip(batch["index"].tolist(), batch["caption"]):
        assert caption == f"prompt {i}"


def test_summary_cli(tmp_path, capsys):
    make_image_folder(tmp_path)
    make_latent_folder(tmp_path)
    (tmp_path / IMAGES_DIR / image_name(2, 3)).write_bytes(b"broken")
    dataset.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "latents: 3 items in 2 shards; latents (4, 2, 2), embeddings (1, 77, 8), float16" in out
    assert "images: 2 readable of 3 captioned" in out
    assert "problems: 1" in out and "corrupt image" in out and image_name(2, 3) in out
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: dataset.main([str(tmp_path / "nowhere")]))
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: data folder not found")


# ----------------------------------------------------------------------------------------------------------
# InfiniteSampler


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_infinite_sampler_passes():
    data = range(5)
    stream = take(InfiniteSampler(data, seed=3), 15)
    for p in range(3):  # every pass is a permutation, reshuffled per pass
        assert sorted(stream[5 * p:5 * p + 5]) == list(range(5))
    assert stream[:5] != stream[5:10] or stream[5:10] != stream[10:]
    assert stream == take(InfiniteSampler(data, seed=3), 15)  # deterministic
    assert stream != take(InfiniteSampler(data, seed=4), 15)


def test_infinite_sampler_ranks_and_resume():
    data = range(7)
    stream = take(InfiniteSampler(data, seed=0), 24)
    ranks = [take(InfiniteSampler(data, seed=0, rank=r, world_size=3), 8) for r in range(3)]
    assert [x for step in zip(*ranks) for x in step] == stream  # ranks interleave into the global stream
    for r in range(3):  # resuming mid-stream continues exactly, across pass boundaries
        assert take(InfiniteSampler(data, seed=0, rank=r, world_size=3, start_index=5), 3) == ranks[r][5:8]
    with pytest.raises(UserError, match="empty dataset"):
        InfiniteSampler([], seed=0)
