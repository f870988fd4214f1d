"""Feature, attention and relation KD and the teacher logit cache, each through distill."""

import json

import pytest
from safetensors import safe_open

from edgekd import pipeline
from edgekd.config import load_profile
from edgekd.testing import save_tiny_llama, write_chat_jsonl
from tests.stages.conftest import fast_recipe


def _distill(tmp_path, teacher, extra):
    data = write_chat_jsonl(tmp_path / "chat.jsonl")
    recipe = fast_recipe(teacher, data, extra)
    run = tmp_path / "run"
    assert pipeline.build(load_profile("phone-1gb"), recipe, run, ["distill"]) == {"distill": "ran"}
    stage = run / "01-distill"
    curve = [json.loads(line) for line in (stage / "loss_curve.jsonl").read_text().splitlines()]
    return run, stage, curve


@pytest.mark.slow
def test_feature_kd_trains_a_narrower_student_through_projections(
    tmp_path, tiny_teacher_dir, tokenizer
):
    student = save_tiny_llama(tmp_path / "student", tokenizer, num_layers=2, hidden=32)
    _, stage, curve = _distill(
        tmp_path,
        tiny_teacher_dir,
        [f"student.source={student}", "distill.feature.weight=1.0", "distill.feature.loss=mse"],
    )
    assert curve[-1]["feature"] > 0
    assert curve[-1]["loss"] > curve[-1]["feature"]  # the KD loss is still there
    # The projections (32 -> 64) trained with the student but are not saved with it.
    with safe_open(str(stage / "model" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    with safe_open(str(student / "model.safetensors"), "pt") as f:
        assert keys == set(f.keys())


@pytest.mark.slow
def test_attention_transfer_through_distill(tmp_path, tiny_teacher_dir):
    _, _, curve = _distill(
        tmp_path,
        tiny_teacher_dir,
        ["distill.attention.weight=1.0", "distill.attention.value_weight=1.0"],
    )
    assert curve[-1]["attention"] >= 0 and curve[-1]["value"] >= 0
    assert curve[-1]["attention"] + curve[-1]["value"] > 0


@pytest.mark.slow
def test_relation_kd_through_distill(tmp_path, tiny_teacher_dir):
    _, _, curve = _distill(tmp_path, tiny_teacher_dir, ["distill.relation.weight=10.0"])
    assert curve[-1]["relation"] > 0


@pytest.mark.slow
def test_logit_cache_replaces_the_teacher_in_distill(tmp_path, tiny_teacher_dir):
    run, _, curve = _distill(
        tmp_path, tiny_teacher_dir, ["distill.teacher_logits=cache", "logit_cache.top_k=16"]
    )
    (cache,) = (run / "cache").glob("logits-*")
    with safe_open(str(cache / "shard-00000.safetensors"), "pt") as f:
        assert f.get_slice("ids").get_shape()[1] == 16
        assert str(f.get_slice("ids").get_dtype()) == "I32"
        assert str(f.get_slice("logprobs").get_dtype()) == "F16"
    assert curve[-1]["kd"] > 0 and "feature" not in curve[-1]
    # qlora trains from the same file: same corpus, tokenization and top_k.
    recipe = fast_recipe(
        tiny_teacher_dir,
        tmp_path / "chat.jsonl",
        ["distill.teacher_logits=cache", "qlora.teacher_logits=cache", "logit_cache.top_k=16"],
    )
    assert pipeline.build(load_profile("phone-1gb"), recipe, run, ["qlora"]) == {"qlora": "ran"}
    assert list((run / "cache").glob("logits-*")) == [cache]
