"""Model presets and the inference bundle: a frozen MicroDiT teacher, its latent codec and its text encoder.

A `Preset` names everything one teacher needs to turn prompts into images; `PRESETS` is the one registry and
`load_pipeline(name, ...)` builds a `Pipeline` from it. Pretrained parts come from a local path given by the
caller, else from the Hugging Face cache, else from one ordinary hub download (skipped when HF_HUB_OFFLINE=1);
anything missing is a one-line `UserError` naming the file to fetch.

Adding a preset: define a `Preset` below and list it in `PRESETS`. A preset's `codec` is any frozen spec object
with `build(source, dtype, seed) -> codec`, where a codec is an `nn.Module` with `encode(images) -> latents`
((B, 3, H, W) in [-1, 1] -> latents already times the scaling factor) and `decode(latents) -> images`
((B, 3, H, W) float32 in [0, 1]). Its `text_encoder` is a spec with `width` and `build(source, seed) ->
TextEncoder` (see `OpenCLIPText`, `RandomOpenCLIPText`, `RandomText`). `source` is the user's --vae /
--text-encoder path or None.
"""
import argparse
import dataclasses
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import open_clip
import torch
import torch.nn as nn
from diffusers import AutoencoderKL
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import RemoteEntryNotFoundError
from open_clip.transformer import TextTransformer
from safetensors import safe_open
from safetensors.torch import save_file

import microdit
import shapes
from cd_utils import EDM, EDMConfig
from utils import UserError, atomic_write, first_line

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

DFN5B_HUB_ID = "apple/DFN5B-CLIP-ViT-H-14-378"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # preferred first
SDXL_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# Local files

def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import time, or as set in the environment since (1, on,
    true, yes: offline; anything else: online). The one place that reads it."""
    return hf_constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "on", "true", "yes")


def hub_file(repo_id: str, filenames: Sequence[str]) -> Optional[str]:
    """Local path of the first of `filenames` found in Hugging Face repo `repo_id`, or None.

    The local cache is searched first (no network). Only when none is cached and HF_HUB_OFFLINE is unset are the
    names downloaded in order, as open_clip does: a name the repository lacks moves on to the next (huggingface_hub
    shows a progress bar and gives up on an unreachable hub after ~25 s of retries, once).
    """
    for name in filenames:
        path = try_to_load_from_cache(repo_id, name)
        if isinstance(path, str):
            return path
    if hub_offline():
        return None
    for name in filenames:
        try:
            return hf_hub_download(repo_id, name)
        except RemoteEntryNotFoundError:  # the repository is there, this file is not: try the next name
            continue
        except Exception:  # no network, no such repo, no permission: all mean "not available here"
            return None
    return None


def _no_source(source: Optional[str], option: str) -> None:
    if source is not None:
        raise UserError(f"{option} {source}: this preset builds that part from the seed and takes no weights")


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Draw module initialisations from `seed` without disturbing the caller's global CPU RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------------------------------------------
# Text encoder

class TextEncoder(nn.Module):
    """Per-token caption embeddings from an open_clip text tower, as MicroDiT consumes them (spec section 8).

    Keeps only `token_embedding`, `positional_embedding`, `transformer`, `ln_final` and the causal `attn_mask`
    of `tower` (an `open_clip.CLIP` or `open_clip.transformer.TextTransformer`); no EOT pooling, no projection.
    Always float32 (the official encoder runs under an fp32 autocast). `width` = D, `context_length` = L = 77.
    """

    def __init__(self, tower: nn.Module, tokenizer: open_clip.SimpleTokenizer):
        super().__init__()
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)  # (L, L): 0 on/below diag, -inf above
        self.tokenizer = tokenizer
        self.context_length, self.width = self.positional_embedding.shape

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, L) int64: SOT + BPE + EOT, zero-padded; a longer prompt keeps its first L tokens with EOT last."""
        return self.tokenizer(list(prompts), context_length=self.context_length)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """B prompts -> (B, 1, L, D) float32 on this module's device, padding positions included."""
        ids = self.tokenize(prompts).to(self.positional_embedding.device)
        with torch.autocast(ids.device.type, enabled=False):
            x = self.token_embedding(ids) + self.positional_embedding
            # open_clip >= 2.26 takes (B, L, D) here whatever its internal layout (the official code's permute to
            # (L, B, D) was for <= 2.24); the additive mask makes token i attend to tokens <= i only.
            x = self.transformer(x, attn_mask=self.attn_mask)
            x = self.ln_final(x)
        return x.float().unsqueeze(1)


@dataclass(frozen=True)
class OpenCLIPText:
    """A pretrained open_clip text tower: weights from `hub_id`, architecture = open_clip built-in `config`."""

    hub_id: str
    config: str
    width: int

    def weights_path(self, source: Optional[str]) -> str:
        """The weights file: `source` (a file, or a folder holding one of OPEN_CLIP_WEIGHTS), else the hub."""
        if source is None:
            path = hub_file(self.hub_id, OPEN_CLIP_WEIGHTS)
            if path is None:
                raise UserError(f"text encoder weights not found: download hf-hub:{self.hub_id} "
                                f"({OPEN_CLIP_WEIGHTS[0]}) or pass --text-encoder PATH")
            return path
        if os.path.isdir(source):
            found = [os.path.join(source, n) for n in OPEN_CLIP_WEIGHTS if os.path.isfile(os.path.join(source, n))]
            if found:
                return found[0]
        elif os.path.isfile(source):
            return source
        raise UserError(f"text encoder weights not found: {source} (expected an open_clip {self.config} weights "
                        f"file or a folder with {' or '.join(OPEN_CLIP_WEIGHTS)})")

    def build(self, source: Optional[str], seed: int) -> TextEncoder:
        path = self.weights_path(source)
        try:
            clip = open_clip.create_model(self.config, pretrained=path, require_pretrained=True)
        except (RuntimeError, OSError, ValueError, KeyError, AssertionError) as e:  # open_clip checks by assert
            raise UserError(f"text encoder weights {path} do not load into open_clip {self.config} "
                            f"({first_line(e)})") from None
        return TextEncoder(clip, open_clip.get_tokenizer(self.config))  # the vision tower goes with `clip`


@dataclass(frozen=True)
class RandomText:
    """A small open_clip `TextTransformer` (CLIP BPE vocabulary, 77 tokens) with random weights.

    seed: a fixed initialisation seed (for a preset whose committed teacher was trained on this tower);
    None draws the tower from load_pipeline's seed.
    embedding_scale: multiplies open_clip's token (std 0.02) and positional (std 0.01) embeddings. At 1 the random
    blocks wash the words out (two captions differing in one colour word give per-token cosines >= 0.8) and a
    tiny DiT learns nothing from the captions in 2000 steps; at 50 it learns them within 400 (measured).
    """

    width: int
    layers: int
    heads: int
    seed: Optional[int] = None
    embedding_scale: float = 1.0

    def build(self, source: Optional[str], seed: int) -> TextEncoder:
        _no_source(source, "--text-encoder")
        with _seeded(seed if self.seed is None else self.seed):
            tower = TextTransformer(width=self.width, heads=self.heads, layers=self.layers, output_dim=None)
        with torch.no_grad():
            tower.token_embedding.weight.mul_(self.embedding_scale)
            tower.positional_embedding.mul_(self.embedding_scale)
        return TextEncoder(tower, open_clip.SimpleTokenizer())


@dataclass(frozen=True)
class RandomOpenCLIPText:
    """The text tower of open_clip's built-in architecture `config` (built by open_clip's own text-tower builder,
    as `open_clip.create_model` builds it) and that architecture's tokenizer, with random weights from the seed:
    the real encoder's shapes, memory and cost without its weights."""

    config: str
    width: int

    def build(self, source: Optional[str], seed: int) -> TextEncoder:
        _no_source(source, "--text-encoder")
        cfg = open_clip.get_model_config(self.config)
        with _seeded(seed):
            tower = open_clip.model._build_text_tower(cfg["embed_dim"], cfg["text_cfg"], cfg.get("quick_gelu", False))
        return TextEncoder(tower, open_clip.get_tokenizer(self.config))


# ----------------------------------------------------------------------------------------------------------------
# Latent codecs

class SDXLVAECodec(nn.Module):
    """Latent codec around a diffusers `AutoencoderKL` (the SDXL VAE, or any AutoencoderKL), run in its dtype.

    The SDXL VAE overflows in float16 (NaN/black images); decode it in bf16 or fp32, or pass the
    `madebyollin/sdxl-vae-fp16-fix` weights (same latent space) as --vae FOLDER for fp16.
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)  # 0.13025 for SDXL

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> float32 latents (B, C, H/8, W/8), times the scaling factor: the
        posterior mean (deterministic)."""
        z = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist.mean
        return (z * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, C, h, w), scaled -> images (B, 3, 8h, 8w) float32 in [0, 1]; the official op order."""
        latents = 1 / self.scaling_factor * latents.float()
        images = self.vae.decode(latents.to(self.vae.device, self.vae.dtype)).sample
        return (images / 2 + 0.5).clamp(0, 1).float()


@dataclass(frozen=True)
class PretrainedVAE:
    """A diffusers AutoencoderKL from `hub_id`/`subfolder`, or from a local folder."""

    hub_id: str
    subfolder: str = "vae"

    def folder(self, source: Optional[str]) -> str:
        """A folder holding config.json and the weights: `source` (or its `subfolder`), else the HF cache/hub."""
        if source is None:
            names = [f"{self.subfolder}/{name}" for name in VAE_FILES]
            config = hub_file(self.hub_id, names[:1])
            if config is None or hub_file(self.hub_id, names[1:]) is None:  # `or`: one network wait, not two
                raise UserError(f"VAE weights not found: download {self.hub_id} ({', '.join(names)}) "
                                "or pass --vae FOLDER")
            return os.path.dirname(config)
        for folder in (source, os.path.join(source, self.subfolder)):
            if os.path.isfile(os.path.join(folder, "config.json")):
                return folder
        raise UserError(f"VAE not found: {source} (expected a diffusers AutoencoderKL folder with "
                        f"{' and '.join(VAE_FILES)})")

    def build(self, source: Optional[str], dtype: torch.dtype, seed: int) -> SDXLVAECodec:
        folder = self.folder(source)
        try:
            vae = AutoencoderKL.from_pretrained(folder, torch_dtype=dtype)
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"cannot load the VAE in {folder} ({first_line(e)})") from None
        return SDXLVAECodec(vae)


# The SDXL VAE's architecture: config.json of stabilityai/stable-diffusion-xl-base-1.0, subfolder vae (83.65M
# parameters), as AutoencoderKL constructor arguments.
SDXL_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                       layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=1024,
                       scaling_factor=0.13025, force_upcast=True)
# A tiny AutoencoderKL of the same kind: four levels, three of them downsampling by 2 (x8, like the SDXL VAE).
TINY_VAE_CONFIG = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                       block_out_channels=(8, 8, 16, 16), latent_channels=4, norm_num_groups=4, scaling_factor=0.13025)


@dataclass(frozen=True)
class RandomVAE:
    """An AutoencoderKL of the architecture `config` (its constructor arguments) with random weights from the seed."""

    config: dict

    def build(self, source: Optional[str], dtype: torch.dtype, seed: int) -> SDXLVAECodec:
        _no_source(source, "--vae")
        with _seeded(seed):
            vae = AutoencoderKL(**self.config)
        return SDXLVAECodec(vae if dtype == torch.float32 else vae.to(dtype))  # .to() warns even for fp32


class IdentityCodec(nn.Module):
    """Pixels as latents (the shapes world): latents are images in [-1, 1]; `decode` maps them to [0, 1]."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents.float() + 1) / 2).clamp(0, 1)


@dataclass(frozen=True)
class PixelCodec:
    def build(self, source: Optional[str], dtype: torch.dtype, seed: int) -> IdentityCodec:
        _no_source(source, "--vae")
        return IdentityCodec()


# ----------------------------------------------------------------------------------------------------------------
# Presets

@dataclass(frozen=True)
class Preset:
    """Everything one teacher needs. dit_arch names a builder in microdit (`MicroDiT_XL_2`, `DiT`, ...) called
    with dit_kwargs. latent_shape = (C, h, w) of the DiT input; image_size = decoded side in pixels.
    teacher: default checkpoint, relative to the repo; random_dit: with no teacher, draw the DiT from the seed.
    run_dir: where train.py writes by default, and so where benchmark.py looks for the student."""

    name: str
    run_dir: str
    dit_arch: str
    dit_kwargs: dict
    latent_shape: tuple
    image_size: int
    text_encoder: Union[OpenCLIPText, RandomOpenCLIPText, RandomText]
    codec: Union[PretrainedVAE, RandomVAE, PixelCodec]
    teacher_hint: str
    edm_config: EDMConfig = EDM
    guidance_scale: float = 5.0
    num_steps: int = 30
    teacher: Optional[str] = None
    random_dit: bool = False
    prompt_source: Optional[Callable[[int, int], list]] = None  # (num, seed) -> prompts, for a preset's own world
    shapes_world: bool = False  # images of shapes.py: its classifier scores them (adherence, shapes-FD)


MICRODIT_XL_512 = Preset(
    name="microdit-xl-512",
    run_dir="runs/microdit-xl-512",
    dit_arch="MicroDiT_XL_2",
    dit_kwargs=dict(input_size=64, pos_interp_scale=2.0, in_channels=4, caption_channels=1024),
    latent_shape=(4, 64, 64),
    image_size=512,
    text_encoder=OpenCLIPText(hub_id=DFN5B_HUB_ID, config="ViT-H-14-378-quickgelu", width=1024),
    codec=PretrainedVAE(hub_id=SDXL_HUB_ID, subfolder="vae"),
    # Sampling constants as EDM; the 512 px training configs draw ln(sigma) ~ N(0, 0.6^2) (res_512_*.yaml).
    edm_config=EDMConfig(P_mean=0.0, P_std=0.6),
    teacher_hint="download ckpts/dit_4_channel_0.5B_synthetic_data.pt from https://huggingface.co/VSehwag24/MicroDiT "
                 "(the SonyResearch/micro_diffusion release)",
)

# The dress rehearsal of the real model: the same architectures (DiT, SDXL VAE, DFN5B text tower and tokenizer) and
# code paths as microdit-xl-512, every weight drawn from the seed, nothing downloaded. zero_init=False: no
# zero-initialised layer, so that every parameter gets a gradient as in a trained teacher.
MICRODIT_XL_512_RANDOM = dataclasses.replace(
    MICRODIT_XL_512,
    name="microdit-xl-512-random",
    run_dir="runs/microdit-xl-512-random",
    dit_kwargs={**MICRODIT_XL_512.dit_kwargs, "zero_init": False},
    text_encoder=RandomOpenCLIPText(config=MICRODIT_XL_512.text_encoder.config, width=1024),
    codec=RandomVAE(SDXL_VAE_CONFIG),
    teacher_hint="none needed: the DiT, VAE and text tower are random from --seed (or pass --teacher)",
    random_dit=True,
)

_TINY_RANDOM_TEXT = RandomText(width=32, layers=2, heads=2)
TINY_RANDOM = Preset(
    name="tiny-random",
    run_dir="runs/cd-tiny-random",
    dit_arch="DiT",
    # Small, but with every code path of the XL model: patch mixer, expert-choice MoE, per-block multipliers.
    dit_kwargs=dict(input_size=8, patch_size=2, in_channels=4, dim=64, depth=4, head_dim=16, multiple_of=32,
                    caption_channels=_TINY_RANDOM_TEXT.width, pos_interp_scale=1.0,
                    qkv_multipliers=np.linspace(0.5, 1.0, 4).tolist(),
                    ffn_multipliers=np.linspace(0.5, 4.0, 4).tolist(),
                    use_patch_mixer=True, patch_mixer_depth=2, patch_mixer_dim=48, patch_mixer_qkv_ratio=1.0,
                    patch_mixer_mlp_ratio=4.0, use_bias=False, num_experts=4, expert_capacity=2.0, experts_every_n=2),
    latent_shape=(4, 8, 8),
    image_size=64,
    text_encoder=_TINY_RANDOM_TEXT,
    codec=RandomVAE(TINY_VAE_CONFIG),
    teacher_hint="none needed: the DiT, VAE and text tower are random from --seed",
    random_dit=True,
)

# The embedded default: the shapes world (shapes.py) at 32x32 pixels, a 64-token MicroDiT with a patch mixer and
# MoE blocks, trained by `python train_teacher.py`. sigma_data = the pixel std of the shapes world. Training noise
# ln sigma ~ N(0.5, 1.5^2): 23% of the samples above sigma 5, where only the caption can place the object
# (EDM's CIFAR-10 N(-1.2, 1.2^2) puts 1% there). init_std: the official init scaled to this width. Without either
# the caption -> layout path plateaus for thousands of steps (BENCHMARKS.md).
_TINY_TEXT = RandomText(width=64, layers=2, heads=4, seed=0, embedding_scale=50.0)
TINY = Preset(
    name="tiny",
    run_dir="runs/cd-tiny",
    dit_arch="DiT",
    dit_kwargs=dict(input_size=32, patch_size=4, in_channels=3, dim=96, depth=6, head_dim=16, multiple_of=32,
                    caption_channels=_TINY_TEXT.width, pos_interp_scale=1.0,
                    qkv_multipliers=np.linspace(0.5, 1.0, 6).tolist(), ffn_multipliers=np.linspace(0.5, 4.0, 6).tolist(),
                    use_patch_mixer=True, patch_mixer_depth=2, patch_mixer_dim=64, patch_mixer_qkv_ratio=1.0,
                    patch_mixer_mlp_ratio=4.0, use_bias=False, num_experts=4, expert_capacity=2.0, experts_every_n=2,
                    init_std=0.02 * math.sqrt(1024 / 96)),  # the official init's width scaled to dim 96 (muP)
    latent_shape=(3, 32, 32),
    image_size=32,
    text_encoder=_TINY_TEXT,
    codec=PixelCodec(),
    teacher_hint="weights/tiny_teacher.safetensors ships with the project; `python train_teacher.py` rebuilds it",
    edm_config=EDMConfig(sigma_data=shapes.PIXEL_STD, P_mean=0.5, P_std=1.5),
    teacher="weights/tiny_teacher.safetensors",
    prompt_source=shapes.stream_captions,
    shapes_world=True,
)

PRESETS: dict[str, Preset] = {p.name: p for p in (TINY, MICRODIT_XL_512, MICRODIT_XL_512_RANDOM, TINY_RANDOM)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


# ----------------------------------------------------------------------------------------------------------------
# Pipeline

def teacher_path(preset: Preset, teacher: Optional[str] = None) -> Optional[str]:
    """`teacher`, else the preset's shipped teacher (resolved in the repository), else None."""
    if teacher is None and preset.teacher is not None:
        return os.path.join(REPO_DIR, preset.teacher)
    return teacher


def text_fingerprint(encoder: TextEncoder) -> list[float]:
    """Six numbers of one caption's embedding. A teacher trained on a seeded text tower stores them in its
    metadata (TEXT_FINGERPRINT_KEY) and load_pipeline compares: another torch that drew another tower from the
    same seed would otherwise detune the teacher silently."""
    embedding = encoder.encode(["a small red circle at the top left on a blue background"])[0, 0]  # (77, D)
    return [round(v, 3) for v in embedding[:16].sum(0)[:6].tolist()]


TEXT_FINGERPRINT_KEY = "text_fingerprint"


def safetensors_metadata(path: str) -> dict[str, str]:
    """The metadata of a .safetensors file ({} for any other file); a UserError if it cannot be read."""
    if not path.endswith(".safetensors"):
        return {}
    try:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises several types for a corrupt or truncated file
        raise UserError(f"cannot read {path} as safetensors ({first_line(e)})") from None


def _check_text_fingerprint(path: Optional[str], encoder: TextEncoder) -> None:
    stored = safetensors_metadata(path).get(TEXT_FINGERPRINT_KEY) if path is not None else None
    if stored is not None and not np.allclose(json.loads(stored), text_fingerprint(encoder), atol=2e-3):
        raise UserError(f"{path} was trained on a text tower that this torch ({torch.__version__}) does not draw "
                        f"from the same seed (fingerprint {stored} vs {text_fingerprint(encoder)}); rebuild the "
                        "teacher with `python train_teacher.py`")


def build_dit(preset: Preset, teacher: Optional[str] = None, seed: int = 0) -> nn.Module:
    """The preset's DiT, float32 on the CPU, trainable: `teacher` weights (default: the preset's own), else
    (random_dit presets only) a fresh initialisation drawn from `seed`."""
    builder = getattr(microdit, preset.dit_arch)
    teacher = teacher_path(preset, teacher)
    if teacher is None:
        if not preset.random_dit:
            raise UserError(f"preset {preset.name} needs --teacher PATH: {preset.teacher_hint}")
        with _seeded(seed):
            return builder(**preset.dit_kwargs)
    if not os.path.isfile(teacher):
        raise UserError(f"teacher checkpoint not found: {teacher}; {preset.teacher_hint}")
    with torch.device("meta"):  # skip the random initialisation that the checkpoint overwrites
        dit = builder(**preset.dit_kwargs)
    dit.to_empty(device="cpu")  # every parameter and buffer is in the strict state dict, so all get loaded
    microdit.load_dit_weights(dit, teacher)
    return dit


# A distilled student: student_final.safetensors in the official DiT layout (loads into the teacher's
# architecture) and, for a w-conditioned student, its guidance embedder beside it (GUIDANCE_PREFIX keys). A LoRA
# student (train.py --lora-rank) also writes LORA_FILE: its adapter alone ("<layer>.lora_A.weight" (rank, in),
# "<layer>.lora_B.weight" (out, rank)), with lora_rank, lora_alpha and lora_targets in the metadata.
STUDENT_FILE, GUIDANCE_FILE, LORA_FILE = "student_final.safetensors", "guidance_embedder.safetensors", \
    "student_lora.safetensors"
GUIDANCE_PREFIX = "guidance_embedder."  # the embedder's keys in the student's state dict


def save_student(out_dir: str, dit: nn.Module, metadata: dict[str, str]) -> tuple[str, Optional[str]]:
    """Write OUT_DIR/STUDENT_FILE (fp32) and, if the DiT has a guidance embedder, OUT_DIR/GUIDANCE_FILE; returns
    their paths (None for a plain student)."""
    state = {k: v.detach().float().cpu().contiguous() for k, v in dit.state_dict().items()}
    official = {k: v for k, v in state.items() if not k.startswith(GUIDANCE_PREFIX)}
    guidance = {k: v for k, v in state.items() if k.startswith(GUIDANCE_PREFIX)}
    student_path = os.path.join(out_dir, STUDENT_FILE)
    atomic_write(student_path, lambda tmp: save_file(official, tmp, metadata=metadata))
    if not guidance:
        return student_path, None
    guidance_path = os.path.join(out_dir, GUIDANCE_FILE)
    atomic_write(guidance_path, lambda tmp: save_file(guidance, tmp, metadata=metadata))
    return student_path, guidance_path


def save_lora(out_dir: str, lora: dict[str, torch.Tensor], rank: int, alpha: float, targets: str,
              metadata: dict[str, str]) -> str:
    """Write OUT_DIR/LORA_FILE (fp32) from the factors of `lora.Adapter.lora_state`; returns its path."""
    path = os.path.join(out_dir, LORA_FILE)
    state = {k: v.float().cpu().contiguous() for k, v in lora.items()}
    meta = {**metadata, "lora_rank": str(rank), "lora_alpha": str(alpha), "lora_targets": targets}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
    return path


def merge_lora(dit: nn.Module, lora: dict[str, torch.Tensor], alpha: float) -> nn.Module:
    """Add each adapted layer's update (alpha / rank) B A (Hu et al. 2021, eq. 3) to `dit`'s weight in place, in
    float32; a factor that names no Linear layer of `dit` or does not fit it raises a UserError naming it."""
    params = dict(dit.named_parameters())
    layers = sorted({k.rsplit(".lora_", 1)[0] for k in lora})
    with torch.no_grad():
        for layer in layers:
            found = {"A": lora.get(f"{layer}.lora_A.weight"), "B": lora.get(f"{layer}.lora_B.weight"),
                     "weight": params.get(f"{layer}.weight")}
            a, b, weight = found.values()
            if any(t is None for t in found.values()) or weight.ndim != 2 or \
                    (b.shape[0], b.shape[1], a.shape[1]) != (weight.shape[0], a.shape[0], weight.shape[1]):
                shapes = ", ".join(f"{n} {tuple(t.shape)}" if t is not None else f"no {n}" for n, t in found.items())
                raise UserError(f"LoRA factors of {layer} do not fit the DiT ({shapes}); check --preset")
            delta = (alpha / a.shape[0]) * (b.float() @ a.float())  # (out, rank) @ (rank, in)
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    return dit


def load_student(preset: Preset, path: str, device: torch.device, dtype: torch.dtype,
                 teacher: Optional[str] = None) -> tuple[nn.Module, bool]:
    """A student saved by `save_student` (or a LORA_FILE, merged into the `teacher` weights, default the preset's
    own), frozen for sampling on `device` in `dtype`, and whether it is w-conditioned (it has a sibling
    GUIDANCE_FILE, loaded into a guidance embedder)."""
    meta = safetensors_metadata(path)
    if "lora_rank" in meta:  # a LORA_FILE
        lora = microdit.read_state_dict(path)
        return _frozen(merge_lora(build_dit(preset, teacher), lora, float(meta["lora_alpha"])), device, dtype), False
    dit = build_dit(preset, path)
    embedder = os.path.join(os.path.dirname(path), GUIDANCE_FILE)
    if not os.path.isfile(embedder):
        return _frozen(dit, device, dtype), False
    dit.add_guidance_embedder()
    state = {k.removeprefix(GUIDANCE_PREFIX): v for k, v in microdit.read_state_dict(embedder).items()}
    try:
        dit.guidance_embedder.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{embedder} does not fit the student's guidance embedder ({first_line(e)})") from None
    return _frozen(dit, device, dtype), True


def _frozen(module: nn.Module, device: torch.device, dtype: Optional[torch.dtype] = None) -> nn.Module:
    return module.requires_grad_(False).eval().to(device=device, dtype=dtype)


class Pipeline:
    """A frozen teacher DiT (in `dtype`), its codec (VAE, in `vae_dtype`) and text encoder (float32), on `device`.

    Sampling in a dtype other than float32 runs under `torch.autocast(device.type, dtype)` (as
    `sampler.generate_images` does): the samplers feed the DiT float32 inputs.
    """

    def __init__(self, preset: Preset, dit: nn.Module, text_encoder: TextEncoder, codec: nn.Module,
                 device: torch.device, dtype: torch.dtype):
        self.name, self.preset = preset.name, preset
        self.dit, self.text_encoder, self.codec = dit, text_encoder, codec
        self.edm_config = preset.edm_config
        self.latent_shape, self.image_size = tuple(preset.latent_shape), preset.image_size
        self.device, self.dtype = torch.device(device), dtype

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """B prompts -> caption embeddings (B, 1, 77, D) float32 on `device`."""
        return self.text_encoder.encode(prompts)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, *latent_shape) -> images (B, 3, image_size, image_size) float32 in [0, 1] on `device`."""
        return self.codec.decode(latents.to(self.device))


def load_text_encoder(preset: Preset, source: Optional[str] = None, device: str | torch.device = "cpu",
                      seed: int = 0) -> TextEncoder:
    """The preset's text encoder alone, frozen, float32 on `device`: from `source` (--text-encoder), else the HF
    cache/hub; a random tower is drawn from `seed` (as load_pipeline draws it)."""
    return _frozen(preset.text_encoder.build(source, seed), torch.device(device), torch.float32)


def default_vae_dtype(dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype when none is asked for: the DiT's, but float32 for float16 (the SDXL VAE's activations overflow
    float16, hence madebyollin/sdxl-vae-fp16-fix; the DiT does not on the tiny teacher, BENCHMARKS.md)."""
    return torch.float32 if dtype == torch.float16 else dtype


def load_pipeline(
    preset: str,
    teacher: Optional[str] = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    vae: Optional[str] = None,
    text_encoder: Optional[str] = None,
    vae_dtype: Optional[torch.dtype] = None,
) -> Pipeline:
    """Build preset `preset` (a name in PRESETS): DiT from `teacher` (or random from `seed` for tiny-random),
    VAE from the `vae` folder and text tower from the `text_encoder` path (else the HF cache/hub), all frozen.
    The DiT runs in `dtype`, the VAE in `vae_dtype` (default: `default_vae_dtype`), the text encoder in float32."""
    p = get_preset(preset)
    device = torch.device(device)
    dit = _frozen(build_dit(p, teacher, seed), device, dtype)
    encoder = load_text_encoder(p, text_encoder, device, seed)
    _check_text_fingerprint(teacher_path(p, teacher), encoder)
    if encoder.width != dit.caption_channels:
        raise UserError(f"text encoder width {encoder.width} does not match the DiT's caption_channels "
                        f"{dit.caption_channels} (preset {p.name})")
    codec = _frozen(p.codec.build(vae, vae_dtype or default_vae_dtype(dtype), seed), device)
    return Pipeline(p, dit, encoder, codec, device, dtype)


def add_pipeline_args(parser: argparse.ArgumentParser) -> None:
    """The command-line options every script that loads a pipeline shares; see `pipeline_from_args`."""
    parser.add_argument("--preset", default=MICRODIT_XL_512.name, help=f"one of: {', '.join(PRESETS)}")
    parser.add_argument("--teacher", help="teacher DiT checkpoint (.pt/.safetensors)")
    parser.add_argument("--vae", help="local diffusers AutoencoderKL folder instead of the preset's hub VAE "
                                      "(e.g. madebyollin/sdxl-vae-fp16-fix for fp16)")
    parser.add_argument("--text-encoder", help="local open_clip weights file or folder instead of the hub's")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="DiT dtype")
    parser.add_argument("--vae-dtype", choices=list(DTYPES), help="VAE dtype (default: --dtype, but fp32 for fp16: "
                        "the SDXL VAE overflows in fp16)")


def pipeline_from_args(args: argparse.Namespace, device: str | torch.device = "cpu", seed: int = 0) -> Pipeline:
    """`load_pipeline` from the options of `add_pipeline_args`; `seed` draws the random parts of tiny-random."""
    return load_pipeline(args.preset, teacher=args.teacher, device=device, dtype=DTYPES[args.dtype], seed=seed,
                         vae=args.vae, text_encoder=args.text_encoder,
                         vae_dtype=DTYPES[args.vae_dtype] if args.vae_dtype else None)
