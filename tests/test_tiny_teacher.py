"""The committed tiny teacher (weights/tiny_teacher.safetensors): loads, is tied to its text tower, and its
30-step guided samples follow their captions."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import shapes
from pipeline import REPO_DIR, TEXT_FINGERPRINT_KEY, TINY, load_pipeline
from cd_utils import edm_forward
from sampler import generate_images
from utils import UserError

TEACHER = f"{REPO_DIR}/{TINY.teacher}"


FLOOR_NOT_MET = pytest.mark.xfail(strict=True, reason="the shipped teacher has learnt the colours but not the position "
                                  "or shape words (adherence 0.012): issue 7 stays open until a retrained one passes")


def test_teacher_file_records_how_it_was_made():
    with safe_open(TEACHER, "pt") as f:
        meta = f.metadata()
    assert meta["command"].startswith("train_teacher.py") and meta["seed"] == "0"
    assert {"adherence", "shapes_fd", "steps", "torch", TEXT_FINGERPRINT_KEY} <= set(meta)


@FLOOR_NOT_MET
def test_teacher_reached_the_floor_in_its_own_evaluation():
    with safe_open(TEACHER, "pt") as f:
        assert float(f.metadata()["adherence"]) >= 0.8  # train_teacher.py's evaluation: 500 held-out captions


def test_teacher_draws_the_captioned_background():
    """What the shipped teacher does learn: at sigma_max its denoiser returns the captioned background colour."""
    pipe = load_pipeline("tiny")
    real, attrs = shapes.sample(32, seed=4242)
    y = pipe.encode_prompts(shapes.captions(attrs))
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(0)) * TINY.edm_config.sigma_max
    sigma = torch.full((32,), TINY.edm_config.sigma_max)
    with torch.no_grad():
        mean = edm_forward(noise, sigma, y, pipe.dit, TINY.edm_config)
        shuffled = edm_forward(noise, sigma, y.roll(1, 0), pipe.dit, TINY.edm_config)
    error, error_shuffled = ((mean - real) ** 2).mean(), ((shuffled - real) ** 2).mean()
    assert error < 0.1 and error_shuffled > 5 * error  # measured: 0.054 vs ~1


@FLOOR_NOT_MET
def test_teacher_samples_follow_their_captions():
    pipe = load_pipeline("tiny")
    attrs = shapes.sample_attributes(32, seed=4242)  # not the training stream (seed 0)
    prompts = shapes.captions(attrs)
    images = generate_images(pipe, prompts, list(range(32)), TINY.num_steps, TINY.guidance_scale, batch_size=32)
    assert shapes.prompt_adherence(images["images"], prompts) >= 0.8


def test_teacher_refuses_another_text_tower(tmp_path):
    with safe_open(TEACHER, "pt") as f:
        meta = dict(f.metadata())
    fingerprint = json.loads(meta[TEXT_FINGERPRINT_KEY])
    meta[TEXT_FINGERPRINT_KEY] = json.dumps([v + 0.5 for v in fingerprint])
    other = str(tmp_path / "teacher.safetensors")
    save_file(load_file(TEACHER), other, metadata=meta)
    with pytest.raises(UserError, match="rebuild the teacher with `python train_teacher.py`"):
        load_pipeline("tiny", teacher=other)
