"""pipeline.py: presets, the tiny-random bundle, text encoder, VAE codec, offline error paths (CPU, no network)."""
import os
import time

import huggingface_hub
import open_clip
import pytest
import torch
from safetensors.torch import save_file

import pipeline
from pipeline import PRESETS, TINY_RANDOM, TINY_VAE_CONFIG, PretrainedVAE, RandomVAE, TextEncoder, load_pipeline
from sampler import edm_sample
from utils import UserError

SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny-random", seed=0)


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache and offline mode, however huggingface_hub read its environment at import."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path / "hf" / "hub"


def state(module: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_consistent(name):
    p = PRESETS[name]
    kw = p.dit_kwargs
    assert p.name == name
    assert kw["caption_channels"] == p.text_encoder.width
    assert p.latent_shape[1] == p.latent_shape[2] == kw["input_size"]
    assert p.latent_shape[0] == kw.get("in_channels", 4)
    assert p.teacher_hint


def test_tiny_random_is_deterministic_in_the_seed(pipe):
    again, other = load_pipeline("tiny-random", seed=0), load_pipeline("tiny-random", seed=1)
    for part in ("dit", "text_encoder", "codec"):
        assert same_state(state(getattr(pipe, part)), state(getattr(again, part))), part
        assert not same_state(state(getattr(pipe, part)), state(getattr(other, part))), part
    assert pipe.name == "tiny-random" and pipe.preset is TINY_RANDOM
    assert pipe.latent_shape == (4, 8, 8) and pipe.image_size == 64 and pipe.dtype == torch.float32
    for part in (pipe.dit, pipe.text_encoder, pipe.codec):
        assert not part.training and not any(p.requires_grad for p in part.parameters())


def test_build_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_pipeline("tiny-random", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_encode_prompts(pipe):
    prompts = ["a red circle", "a blue square on a green background", ""]
    y = pipe.encode_prompts(prompts)
    assert y.shape == (3, 1, 77, pipe.text_encoder.width) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert torch.equal(y, pipe.encode_prompts(prompts))
    assert torch.allclose(y[1:2], pipe.encode_prompts(prompts[1:2]), atol=1e-5)  # independent of the batch
    assert not torch.allclose(y[0], y[1])
    # padding positions are kept (ln_final output, not zeros)
    assert y[0, 0, -1].abs().sum() > 0


def test_encode_is_causal_and_ignores_autocast(pipe):
    y = pipe.encode_prompts(["a red circle", "a red square"])
    # tokens SOT, a, red are shared: a causal tower gives identical embeddings there, different after
    assert torch.allclose(y[0, 0, :3], y[1, 0, :3], atol=1e-6)
    assert not torch.allclose(y[0, 0, 3], y[1, 0, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_autocast = pipe.encode_prompts(["a red circle", "a red square"])
    assert y_autocast.dtype == torch.float32 and torch.equal(y_autocast, y)


def test_tokens_padding_and_truncation(pipe):
    ids = pipe.text_encoder.tokenize(["a red circle", "word " * 100])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    short = ids[0].tolist()
    assert short[0] == SOT and short[4] == EOT and short[5:] == [0] * 72
    long = ids[1].tolist()
    assert long[0] == SOT and long[-1] == EOT and 0 not in long and long.count(EOT) == 1
    y = pipe.encode_prompts(["word " * 100, "word " * 200])
    assert torch.allclose(y[0], y[1], atol=1e-6)  # both cut to the same 77 tokens


def test_text_encoder_matches_open_clip_encode_text():
    """Our per-token output at EOT, projected, is open_clip's own pooled text feature: same layout and mask."""
    torch.manual_seed(0)
    clip = open_clip.CLIP(embed_dim=16, vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
                          text_cfg=dict(width=32, heads=2, layers=2)).eval()
    encoder = TextEncoder(clip, open_clip.SimpleTokenizer())
    prompts = ["a red circle", "two small blue squares at the top"]
    y = encoder.encode(prompts)[:, 0]
    ids = encoder.tokenize(prompts)
    pooled = y[torch.arange(len(prompts)), ids.argmax(dim=-1)] @ clip.text_projection
    with torch.no_grad():
        assert torch.allclose(pooled, clip.encode_text(ids), atol=1e-5)
    assert encoder.width == 32 and encoder.context_length == 77
    assert not hasattr(encoder, "visual")


def test_decode_and_round_trip(pipe):
    latents = torch.randn(2, *pipe.latent_shape, generator=torch.Generator().manual_seed(0))
    images = pipe.decode(latents)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    z = pipe.codec.encode(images * 2 - 1)
    assert z.shape == (2, *pipe.latent_shape) and z.dtype == torch.float32
    assert torch.equal(z, pipe.codec.encode(images * 2 - 1))  # posterior mean: deterministic
    assert pipe.decode(z).shape == images.shape


def test_vae_dtype(pipe):
    p = load_pipeline("tiny-random", vae_dtype=torch.bfloat16)
    assert p.codec.vae.dtype == torch.bfloat16 and next(p.dit.parameters()).dtype == torch.float32
    images = p.decode(torch.zeros(1, *p.latent_shape))
    assert images.dtype == torch.float32 and images.shape == (1, 3, 64, 64)
    # the VAE follows the DiT's dtype, but not into fp16 (the SDXL VAE overflows there) unless asked
    assert load_pipeline("tiny-random", dtype=torch.bfloat16).codec.vae.dtype == torch.bfloat16
    assert load_pipeline("tiny-random", dtype=torch.float16).codec.vae.dtype == torch.float32
    assert load_pipeline("tiny-random", dtype=torch.float16, vae_dtype=torch.float16).codec.vae.dtype == torch.float16


def test_sample_end_to_end(pipe):
    y = pipe.encode_prompts(["a red circle", "a blue square"])
    noise = torch.randn(2, *pipe.latent_shape, generator=torch.Generator().manual_seed(0))
    latents = edm_sample(pipe.dit, noise, y, num_steps=3, guidance_scale=5.0, edm_config=pipe.edm_config)
    assert latents.shape == (2, *pipe.latent_shape) and torch.isfinite(latents).all()
    images = pipe.decode(latents)
    assert images.shape == (2, 3, pipe.image_size, pipe.image_size)
    assert images.min() >= 0 and images.max() <= 1


def test_teacher_checkpoint_loads_through_the_meta_device(pipe, tmp_path):
    path = str(tmp_path / "teacher.safetensors")
    save_file({k: v.contiguous() for k, v in pipe.dit.state_dict().items()}, path)
    loaded = load_pipeline("tiny-random", teacher=path, seed=1)  # the checkpoint wins over the seed
    assert same_state(state(loaded.dit), state(pipe.dit))
    assert all(t.device.type == "cpu" for t in loaded.dit.state_dict().values())


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown preset 'nope'.*microdit-xl-512.*tiny-random"):
        load_pipeline("nope")


def test_xl_teacher_missing(tmp_path):
    start = time.time()
    with pytest.raises(UserError, match="missing.pt.*dit_4_channel_0.5B_synthetic_data.pt"):
        load_pipeline("microdit-xl-512", teacher=str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match="needs --teacher PATH.*VSehwag24/MicroDiT"):
        load_pipeline("microdit-xl-512")
    assert time.time() - start < 5


def test_xl_text_encoder_and_vae_without_cache(no_hub, tmp_path):
    xl = PRESETS["microdit-xl-512"]
    start = time.time()
    with pytest.raises(UserError, match="DFN5B-CLIP-ViT-H-14-378.*--text-encoder"):
        xl.text_encoder.build(None, seed=0)
    with pytest.raises(UserError, match="text encoder weights not found: .*nowhere"):
        xl.text_encoder.build(str(tmp_path / "nowhere"), seed=0)
    with pytest.raises(UserError, match="VAE weights not found.*stabilityai/stable-diffusion-xl-base-1.0.*--vae"):
        xl.codec.build(None, torch.float32, seed=0)
    with pytest.raises(UserError, match="VAE not found: .*nowhere"):
        xl.codec.build(str(tmp_path / "nowhere"), torch.float32, seed=0)
    assert time.time() - start < 5


def test_hub_file_downloads_the_names_in_order(tmp_path, monkeypatch):
    """Online with an empty cache: a name the repository lacks (404) moves on to the next, as open_clip falls back
    from open_clip_model.safetensors to open_clip_pytorch_model.bin; any other failure gives up at once (None)."""
    from huggingface_hub.errors import RemoteEntryNotFoundError
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(pipeline, "try_to_load_from_cache", lambda repo_id, name: None)
    asked = []

    def stand_in_hub(repo_id, name):
        asked.append(name)
        if name == pipeline.OPEN_CLIP_WEIGHTS[0]:
            raise RemoteEntryNotFoundError.__new__(RemoteEntryNotFoundError)  # 404: not in this repository
        return str(tmp_path / name)

    monkeypatch.setattr(pipeline, "hf_hub_download", stand_in_hub)
    assert pipeline.hub_file(pipeline.DFN5B_HUB_ID, pipeline.OPEN_CLIP_WEIGHTS) == \
        str(tmp_path / pipeline.OPEN_CLIP_WEIGHTS[1])
    assert asked == list(pipeline.OPEN_CLIP_WEIGHTS)

    def unreachable(repo_id, name):
        asked.append(name)
        raise OSError("no network")

    asked.clear()
    monkeypatch.setattr(pipeline, "hf_hub_download", unreachable)
    assert pipeline.hub_file(pipeline.DFN5B_HUB_ID, pipeline.OPEN_CLIP_WEIGHTS) is None
    assert asked == [pipeline.OPEN_CLIP_WEIGHTS[0]]  # one network wait, not one per name


def test_pretrained_vae_from_folder_and_cache(no_hub, pipe, tmp_path):
    """A diffusers folder given as --vae, and the same files found in the HF cache layout with no network."""
    folder = tmp_path / "vae"
    pipe.codec.vae.save_pretrained(str(folder))
    spec = PretrainedVAE(hub_id="someone/tiny-vae", subfolder="vae")
    for source in (str(folder), str(tmp_path)):  # the folder itself, or a repo folder with a vae/ subfolder
        assert same_state(state(spec.build(source, torch.float32, seed=0)), state(pipe.codec))

    repo = no_hub / "models--someone--tiny-vae"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    os.makedirs(snapshot)
    os.symlink(folder, snapshot / "vae")
    assert same_state(state(spec.build(None, torch.float32, seed=0)), state(pipe.codec))


def test_random_parts_take_no_weights(tmp_path):
    with pytest.raises(UserError, match="--vae .*takes no weights"):
        load_pipeline("tiny-random", vae=str(tmp_path))
    with pytest.raises(UserError, match="--text-encoder .*takes no weights"):
        load_pipeline("tiny-random", text_encoder=str(tmp_path))


def test_random_vae_downsamples_by_8():
    codec = RandomVAE(TINY_VAE_CONFIG).build(None, torch.float32, seed=0)
    assert codec.encode(torch.zeros(1, 3, 32, 48)).shape == (1, 4, 4, 6)


def test_cli_args():
    import argparse
    parser = argparse.ArgumentParser()
    pipeline.add_pipeline_args(parser)
    args = parser.parse_args(["--preset", "tiny-random", "--vae-dtype", "bf16"])
    p = pipeline.pipeline_from_args(args)
    assert p.name == "tiny-random" and p.dtype == torch.float32 and p.codec.vae.dtype == torch.bfloat16
