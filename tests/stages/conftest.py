"""A distilled tiny student, built once, that each stage test copies and builds on."""

import shutil

import pytest

from edgekd import pipeline
from edgekd.config import load_profile, load_recipe
from edgekd.testing import write_chat_jsonl

FAST = [
    "student.num_layers=2",
    "student.calibration_examples=4",
    "data.max_seq_len=64",
    "distill.max_steps=4",
    "distill.batch_size=2",
    "qlora.max_steps=3",
    "qlora.batch_size=2",
    "qlora.rank=4",
    "qat_kd.max_steps=4",
    "qat_kd.batch_size=2",
    "qat_kd.eval_every=2",
    "eval.sample_max_tokens=8",
]


def fast_recipe(teacher, data, extra=()):
    return load_recipe(None, [*FAST, *extra], teacher=str(teacher), data=str(data))


@pytest.fixture(scope="session")
def distilled_run(tmp_path_factory, tiny_teacher_dir):
    root = tmp_path_factory.mktemp("distilled")
    data = write_chat_jsonl(root / "chat.jsonl")
    run = root / "run"
    recipe = fast_recipe(tiny_teacher_dir, data)
    pipeline.build(load_profile("phone-1gb"), recipe, run, ["distill"])
    return run, data


@pytest.fixture
def run_copy(distilled_run, tmp_path):
    """A private copy of the distilled run, and the recipe that made it."""
    run, data = distilled_run
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", data
