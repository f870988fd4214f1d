"""The student's shape from configs alone: the size target, each method's shape, the budget with
its margin, and the settings refused before any work."""

import pytest

from edgekd import models
from edgekd.config import load_profile, load_recipe
from edgekd.errors import EdgekdError
from edgekd.student import MB, candidates, quantum, row_fallbacks, shape_for
from tests.test_cli import CONFIGS
from tests.test_models import smollm2_config

# SmolLM2-135M's shape, the embedded teacher's.
SMOLLM2 = smollm2_config()


def _shape(method, *sets, profile="phone-1gb", teacher=SMOLLM2):
    recipe = load_recipe(None, list(sets))
    return shape_for(teacher, recipe, load_profile(profile), "Q4_K_M", method)


def test_depth_student_keeps_the_layer_fraction():
    c = _shape("depth")
    assert c.shape.layers == 20 and c.shape.hidden == 576
    assert c.params == models.param_count(models.with_layers(SMOLLM2, 20))


@pytest.mark.parametrize("method", ["width", "depth_width"])
def test_width_students_meet_the_depth_students_size(method):
    depth, c = _shape("depth"), _shape(method)
    assert 0.9 * depth.params < c.params <= depth.params
    assert c.shape.hidden % 32 == 0 and c.shape.hidden < 576
    assert c.shape.intermediate % 256 == 0 and c.shape.intermediate < 1536
    assert c.shape.heads % 3 == 0


def test_quantum_follows_the_k_quant_block():
    assert quantum(1536, "Q4_K_M") == 256  # rows of 1536 take Q4_K: stay on its blocks
    assert quantum(576, "Q4_K_M") == 32  # rows of 576 already fall back to a 32-block type
    assert quantum(1536, "Q8_0") == 32


def test_row_fallbacks_name_the_type_written():
    assert row_fallbacks(SMOLLM2, "Q4_K_M")["attn_q"] == "Q5_0"
    narrowed = _shape("width", "student.hidden_size=512", "student.num_attention_heads=6")
    assert "attn_q" not in row_fallbacks(narrowed.config, "Q4_K_M")


def _7b():
    return models.load_config(
        models.resolve_source(str(CONFIGS / "qwen2.5-7b-instruct"), role="teacher")
    )


@pytest.mark.parametrize("profile", ["phone-1gb", "phone-4gb"])
def test_a_7b_teacher_is_cut_to_the_profile_with_its_margin(profile):
    teacher, budget = _7b(), load_profile(profile).memory_budget_mb * MB
    found = candidates(
        teacher, load_recipe(None, ["student.prune=auto"]), load_profile(profile), "Q4_K_M"
    )
    assert {c.method for c in found} >= {"width", "depth_width"}
    for c in found:
        assert c.gguf_bytes + c.kv_bytes <= 0.95 * budget
        assert c.gguf_bytes + c.kv_bytes > 0.7 * budget  # the largest that fits, not any
        assert c.shape.heads % 4 == 0 and c.shape.hidden % 256 == 0


def test_depth_alone_cannot_bring_a_7b_teacher_to_a_1gb_phone():
    with pytest.raises(EdgekdError, match=r"memory_budget_mb of at least \d+ at Q4_K_M"):
        _shape("depth", teacher=_7b())


def test_target_below_the_smallest_student_names_the_smallest():
    with pytest.raises(EdgekdError, match=r"student.target_params=1000: .*at least \d+"):
        _shape("width", "student.target_params=1000")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("student.hidden_size=500", "not a multiple of 32"),
        ("student.intermediate_size=100", "not a multiple of 32"),
        ("student.num_attention_heads=8", "does not divide over the teacher's 3 key/value heads"),
        ("student.hidden_size=1024", "exceeds the teacher's 576"),
    ],
)
def test_shapes_breaking_constraints_are_refused(setting, message):
    with pytest.raises(EdgekdError, match=message):
        _shape("width", setting)


def test_given_widths_are_kept():
    c = _shape("width", "student.hidden_size=512", "student.num_attention_heads=6")
    assert (c.shape.hidden, c.shape.heads) == (512, 6)


def test_source_with_pruning_settings_is_refused():
    with pytest.raises(EdgekdError, match="student.source is given, so nothing is pruned"):
        load_recipe(None, ["student.source=some/model", "student.prune=width"])
    load_recipe(None, ["student.source=some/model", "student.num_layers=2"])  # unchanged


def test_auto_heals_every_candidate_and_keeps_the_lowest_kld(
    tiny_teacher_dir, chat_jsonl, tmp_path
):
    import json

    from transformers import AutoConfig

    from edgekd import pipeline
    from edgekd.testing import FAST_BUILD

    fast = [s for s in FAST_BUILD if not s.startswith("student.num_layers")]
    sets = [*fast, "distill.max_steps=1", "student.prune=auto", "student.heal_steps=2"]
    recipe = load_recipe(None, sets, teacher=str(tiny_teacher_dir), data=str(chat_jsonl))
    pipeline.build(load_profile("phone-1gb"), recipe, tmp_path / "run", ["distill"])
    stage = tmp_path / "run" / "01-distill"
    student = json.loads((stage / "report.json").read_text())["student"]
    rows = student["candidates"]
    assert [r["method"] for r in rows] == ["depth", "width", "depth_width"]
    assert rows[0]["shape"]["layers"] < 4 and rows[1]["shape"]["intermediate"] < 128
    best = min(rows, key=lambda r: r["kld_after_heal"])
    assert student["method"] == best["method"] and student["heal_steps"] == 2
    config = AutoConfig.from_pretrained(stage / "model")
    assert (config.num_hidden_layers, config.hidden_size) == (
        best["shape"]["layers"],
        best["shape"]["hidden"],
    )


def test_the_default_is_what_the_bench_measured_best():
    c = candidates(SMOLLM2, load_recipe(), load_profile("phone-1gb"), "Q4_K_M")
    assert [x.method for x in c] == ["depth"]
    assert (c[0].shape.layers, c[0].shape.hidden, c[0].shape.intermediate) == (20, 576, 1536)
