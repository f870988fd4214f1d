"""Each stage's host memory estimate: the parts it adds up, on Qwen's real configs (no weights)."""

from pathlib import Path

import pytest
from transformers import AutoConfig

from edgekd import host_memory, models, stages
from edgekd.config import Recipe, TeacherSettings, load_profile
from edgekd.effective import resolve
from edgekd.stages.spec import SizeInputs

CONFIGS = Path(__file__).parent / "data" / "configs"
GB = 1024**3


@pytest.fixture(scope="module")
def qwen():
    return tuple(
        AutoConfig.from_pretrained(CONFIGS / name)
        for name in ("qwen2.5-0.5b-instruct", "qwen2.5-1.5b-instruct")
    )


def _sizes(student, teacher, recipe: Recipe) -> SizeInputs:
    profile = load_profile("phone-4gb")
    effective = resolve(profile, recipe, list(stages.NAMES))
    return SizeInputs(
        student_config=student,
        params=models.param_count(student),
        gguf_bytes=models.gguf_bytes_estimate(student, effective.gguf_quant),
        recipe=recipe,
        effective=effective,
        teacher_config=teacher,
    )


def test_reference_is_the_whole_vocabulary_in_fp32_at_every_heldout_position(qwen):
    recipe = Recipe.model_validate({"data": {"max_heldout": 4, "max_seq_len": 128}})
    assert host_memory.reference_bytes(recipe, 151936) == 4 * 4 * 128 * 151936


def test_nf4_keeps_embeddings_in_fp32(qwen):
    student = qwen[0]
    embeddings = 151936 * 896  # tied: one matrix
    linear = models.param_count(student) - embeddings
    assert host_memory.nf4_bytes(student) == pytest.approx(0.56 * linear + 4 * embeddings)
    assert host_memory.nf4_bytes(student) < host_memory.fp32_bytes(student) / 2


def test_training_stages_hold_the_teacher_as_it_is_loaded(qwen):
    student, teacher = qwen
    full = Recipe()
    nf4 = Recipe.model_validate({"teacher": {"load_in": "4bit", "dtype": "bfloat16"}})
    teacher_fp32 = 4 * models.param_count(teacher)
    for name in ("distill", "qlora", "qat_kd"):
        spec = stages.get(name)
        held = spec.host_bytes(_sizes(student, teacher, full))
        served = spec.host_bytes(_sizes(student, None, full))
        assert held - served == pytest.approx(teacher_fp32, abs=1)
        assert spec.host_bytes(_sizes(student, teacher, nf4)) < held - 0.8 * teacher_fp32


def test_distill_adds_the_step_runtime_and_reference(qwen):
    student, teacher = qwen
    recipe = Recipe()
    step = host_memory.train_step_bytes(student, teacher, recipe, recipe.distill)
    # fp32 weights, gradients and AdamW's two states: 16 bytes a student parameter.
    assert step > 16 * models.param_count(student) + 4 * models.param_count(teacher)
    expected = host_memory.common_bytes(recipe, student) + step
    assert stages.get("distill").host_bytes(_sizes(student, teacher, recipe)) == int(expected)
    assert TeacherSettings().dtype == "float32"


def test_every_stage_has_an_estimate_that_grows_with_the_student(qwen):
    small, large = qwen
    recipe = Recipe()
    for spec in stages.SPECS:
        assert spec.host_bytes(_sizes(small, large, recipe)) < spec.host_bytes(
            _sizes(large, large, recipe)
        ), spec.name
