"""The shapes lab's claims, in short runs on the shipped tiny teacher: distillation brings the 4-step student several
times closer to the teacher's 30-step images, keeps the teacher's prompt adherence and beats the teacher's own 4
steps; the one-step recipe's distribution matching brings the 1-step student closer still."""
import json
import shutil

import pytest
import torch
from PIL import Image

import shapes
import train
from dataset import CAPTIONS_JSON, IMAGES_DIR, image_name
from pipeline import load_pipeline
from sampler import generate_images, to_uint8
from utils import read_jsonl
from validation import VAL_LOG_FILE, validation_prompts

STEPS, VAL_SAMPLES, VAL_SEED = 60, 64, 1000


def write_real_images(folder, num: int, seed: int) -> None:
    """Real shapes images with their captions: CD needs only clean samples and captions (the teacher makes the
    targets), and these cost nothing to render, unlike 30-step teacher data."""
    images, attrs = shapes.sample(num, seed)
    (folder / IMAGES_DIR).mkdir(parents=True)
    for i, image in enumerate(to_uint8((images + 1) / 2)):
        Image.fromarray(image).save(folder / IMAGES_DIR / image_name(i, num))
    captions = {image_name(i, num): c for i, c in enumerate(shapes.captions(attrs))}
    (folder / CAPTIONS_JSON).write_text(json.dumps(captions))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A folder of real shapes data and `run(name, *flags)`: a STEPS-step train.py run on it (both cores), its
    (step-0, final) validation metrics on VAL_SAMPLES held-out captions; runs are made once per module."""
    from accelerate.state import AcceleratorState, PartialState
    root, done = tmp_path_factory.mktemp("lab"), {}
    write_real_images(root / "data", 512, seed=77)

    def run(name: str, *flags: str) -> tuple[dict, dict]:
        if name not in done:
            threads = torch.get_num_threads()
            torch.set_num_threads(2)  # the suite's longest tests: both cores
            for other in done:  # the teacher's validation images depend on the captions and seeds only
                (root / name / "val").mkdir(parents=True, exist_ok=True)
                shutil.copy(root / other / "val" / "teacher.pt", root / name / "val" / "teacher.pt")
            try:
                result = train.train(train.parse_args([
                    "--data-dir", str(root / "data"), "--out-dir", str(root / name), "--steps", str(STEPS),
                    "--val-every", str(STEPS), "--ckpt-every", "0", "--val-samples", str(VAL_SAMPLES), "--val-seed",
                    str(VAL_SEED), *flags]))
            finally:
                torch.set_num_threads(threads)
                AcceleratorState._reset_state(True)
                PartialState._reset_state()
            done[name] = read_jsonl(str(root / name / VAL_LOG_FILE))[0], result["val"]  # step 0: student = teacher
        return done[name]

    run.root = root
    return run


def test_short_distillation_keeps_adherence_and_beats_the_teachers_own_4_steps(lab):
    start, val = lab("default")
    # the teacher's own 4-step sampling (Heun, guidance 5) of the same prompts and seeds
    pipe = load_pipeline("tiny")
    prompts, _ = validation_prompts(pipe, VAL_SAMPLES, VAL_SEED, None)
    seeds = [VAL_SEED + i for i in range(VAL_SAMPLES)]
    teacher_30 = torch.load(lab.root / "default" / "val" / "teacher.pt", weights_only=True)["images"]
    teacher_4 = generate_images(pipe, prompts, seeds, 4, pipe.preset.guidance_scale, VAL_SAMPLES)["images"]
    teacher_4 = shapes.score(teacher_4, prompts, {"teacher": shapes.shapes_features(teacher_30)})

    # the distillation: the 4-step student is drawn towards the teacher's own samples (measured: 222 -> 72; a
    # broken recipe stays further: the online target (--target-decay 0) 106, --skip 4 260)...
    assert val["shapes_fd_teacher/4"] < 0.4 * start["shapes_fd_teacher/4"], (start, val)
    # ...without losing what the teacher draws right (a blurry early student can score above the teacher: the
    # classifier reads the mean of the captioned distribution well, hence one-sided)
    assert val["adherence/4"] >= val["adherence/teacher"] - 0.10, val  # measured: 0.938 vs 0.938
    # and the teacher's own sampler at the same cost does far worse on both (measured: 0.00, 3291)
    assert val["adherence/4"] > teacher_4["adherence"] and val["shapes_fd_teacher/4"] < teacher_4["shapes_fd_teacher"]


def test_distribution_matching_sharpens_the_one_step_student(lab):
    """The one-step recipe's ingredient, DMD (cd_utils.dmd_losses, --dmd-weight), brings the 1-step student far
    closer to the teacher's images than CD alone in the same steps, and costs the 4-step student little. Turned off
    (--recipe one-step --dmd-weight 0: CD with the cosine schedule) the 1-step distance is the default's (measured:
    301 against 298) and the first assertion fails. (A fake denoiser frozen at the teacher still gets the gain at 60
    steps, 141, and loses it by 300: BENCHMARKS.md, "One step as good as four".)"""
    _, default = lab("default")
    _, dmd = lab("one-step", "--recipe", "one-step")
    print(f"\nafter {STEPS} steps, shapes-FD to the teacher at 1 / 4 steps: CD {default['shapes_fd_teacher/1']:.0f} / "
          f"{default['shapes_fd_teacher/4']:.0f}, one-step recipe {dmd['shapes_fd_teacher/1']:.0f} / "
          f"{dmd['shapes_fd_teacher/4']:.0f}")
    # measured: 137 against 298 at 1 step, 80 against 72 at 4 steps
    assert dmd["shapes_fd_teacher/1"] < 0.6 * default["shapes_fd_teacher/1"], (dmd, default)
    assert dmd["shapes_fd_teacher/4"] < 1.3 * default["shapes_fd_teacher/4"], (dmd, default)
    assert dmd["adherence/1"] >= dmd["adherence/teacher"] - 0.10, dmd  # measured: 0.922 vs 0.938
