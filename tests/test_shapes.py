"""The shapes world: deterministic generator, invertible captions, shipped classifier and its metrics."""
import itertools
import os

import pytest
import torch
import torch.nn.functional as F

import shapes
from utils import UserError


def test_generator_is_deterministic_per_item():
    images, attrs = shapes.sample(40, seed=3)
    again, attrs_again = shapes.sample(40, seed=3)
    assert torch.equal(images, again) and torch.equal(attrs, attrs_again)
    # item i of a stream does not depend on the batch it is drawn in
    part, part_attrs = shapes.sample(7, seed=3, start=11)
    assert torch.equal(part, images[11:18]) and torch.equal(part_attrs, attrs[11:18])
    assert torch.equal(shapes.render(attrs[11:18], shapes.sample_jitter(7, 3, 11), chunk=3), part)
    other, _ = shapes.sample(40, seed=4)
    assert not torch.equal(images, other)


def test_render_range_and_attribute_distribution():
    images, attrs = shapes.sample(1000, seed=0)
    assert images.shape == (1000, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    color, bg = shapes.ATTRIBUTES.index("color"), shapes.ATTRIBUTES.index("background")
    assert (attrs[:, color] != attrs[:, bg]).all()
    for k, n in enumerate(shapes.NUM_CLASSES):
        assert set(attrs[:, k].tolist()) == set(range(n))


def test_pixel_std_constant_matches_measurement():
    assert shapes.pixel_std(2000, seed=7) == pytest.approx(shapes.PIXEL_STD, abs=0.01)


def test_captions_parse_back_for_all_combinations():
    combos = [c for c in itertools.product(*(range(n) for n in shapes.NUM_CLASSES)) if c[1] != c[4]]
    for row in combos:
        assert shapes.parse_caption(shapes.caption(row)).tolist() == list(row)
    assert shapes.caption((0, 0, 0, 0, 2)) == "a small red circle at the top left on a blue background"
    assert shapes.parse_caption("  A Large white CROSS at the center  on a black background.").tolist() == [4, 6, 1, 4, 7]


@pytest.mark.parametrize("bad", ["a cat", "", "a small red circle at the top left on a red background",
                                 "a small red circle at the middle on a blue background",
                                 "a small red circle at the top left on a blue background please"])
def test_parse_caption_rejects_other_text(bad):
    with pytest.raises(UserError, match="not a shapes-world caption"):
        shapes.parse_caption(bad)


def test_missing_classifier_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="train-classifier"):
        shapes.load_classifier(str(tmp_path / "none.safetensors"))


@pytest.fixture(scope="module")
def held_out():
    """Fresh images (a seed the classifier never saw) in [0, 1] with their captions."""
    images, attrs = shapes.sample(600, seed=12345)
    return (images + 1) / 2, shapes.captions(attrs)


def test_shipped_classifier_accuracy(held_out):
    images, prompts = held_out
    acc = shapes.attribute_accuracy(images[:300], prompts[:300])
    assert all(acc[a] >= 0.98 for a in shapes.ATTRIBUTES), acc
    assert acc["all"] >= 0.97, acc


def test_prompt_adherence_true_vs_shuffled_captions(held_out):
    images, prompts = held_out
    assert shapes.prompt_adherence(images[:300], prompts[:300]) >= 0.97
    shuffled = prompts[1:300] + prompts[:1]
    assert shapes.prompt_adherence(images[:300], shuffled) < 0.05
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        shapes.prompt_adherence(images[:10] * 2 - 1, prompts[:10])


def test_count_objects_real_fragmented_and_empty(held_out):
    images, _ = held_out
    assert (shapes.count_objects(images) == 1).all()  # every real image: one object, whatever its size or shape
    background = images[:20].flatten(2).median(2).values[:, :, None, None].expand(-1, -1, 32, 32)
    assert (shapes.count_objects(background) == 0).all()
    fragments = background.clone()
    for y, x in ((2, 2), (2, 20), (20, 10)):  # three 3x3 blocks of another colour
        fragments[:, :, y:y + 3, x:x + 3] = 1 - background[:, :, y:y + 3, x:x + 3]
    assert (shapes.count_objects(fragments) == 3).all()


def test_score_names_every_metric(held_out):
    images, prompts = held_out
    references = {"data": shapes.shapes_features(images[100:200]), "other": shapes.shapes_features(images[200:300])}
    scores = shapes.score(images[:100], prompts[:100], references)
    assert set(scores) == {"adherence", "one_object", "shapes_fd_data", "shapes_fd_other",
                           *(f"acc_{a}" for a in shapes.ATTRIBUTES)}
    assert scores["adherence"] >= 0.97 and scores["one_object"] == 1.0
    assert scores["shapes_fd_data"] == pytest.approx(shapes.shapes_fd(images[:100], images[100:200]))
    assert scores["shapes_fd_other"] == pytest.approx(shapes.shapes_fd(images[:100], images[200:300]))
    assert "shapes_fd_data" not in shapes.score(images[:10], prompts[:10])


def test_shapes_fd_floor_vs_corruptions(held_out):
    images, _ = held_out
    a, b = images[:300], images[300:]
    floor = shapes.shapes_fd(a, b)
    blurred = F.avg_pool2d(F.pad(b, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    gray = b.mean(1, keepdim=True).expand_as(b)  # (channel permutations map the palette onto itself)
    attrs = shapes.sample_attributes(300, seed=12345, start=300)
    attrs[:, shapes.ATTRIBUTES.index("shape")] = 0  # mode collapse: every object a circle
    circles = (shapes.render(attrs, shapes.sample_jitter(300, 12345, 300)) + 1) / 2
    assert 0 <= floor
    assert shapes.shapes_fd(a, blurred) > 2.5 * floor  # about 3.7x with the shipped classifier
    for corrupted in (gray, circles):
        assert shapes.shapes_fd(a, corrupted) > 5 * floor
    assert shapes.shapes_fd(a, a) == pytest.approx(0, abs=1e-6 * floor + 1e-6)


def test_cli_preview_and_prompts(tmp_path):
    shapes.main(["preview", "--out", str(tmp_path / "p.png"), "--n", "4"])
    assert os.path.getsize(tmp_path / "p.png") > 0
    shapes.main(["prompts", "--out", str(tmp_path / "p.txt"), "--n", "5", "--seed", "2"])
    lines = (tmp_path / "p.txt").read_text().splitlines()
    assert lines == shapes.captions(shapes.sample_attributes(5, 2))
