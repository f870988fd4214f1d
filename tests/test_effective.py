"""Effective values: resolved once from recipe and profile, read by the planner and the stages."""

import pytest

from edgekd.config import load_profile, load_recipe
from edgekd.effective import resolve
from edgekd.errors import EdgekdError
from edgekd.plan import make_plan


def test_recipe_overrides_the_profile_and_empty_onnx_quant_stays_empty():
    profile = load_profile("phone-1gb")
    default = resolve(profile, load_recipe(None), [])
    assert (default.gguf_quant, default.onnx_quant) == (
        profile.gguf_quant,
        tuple(profile.onnx_quant),
    )
    recipe = load_recipe(None, ["export_gguf.quant=Q8_0", "export_onnx.quant=[]", "eval.threads=3"])
    chosen = resolve(profile, recipe, [])
    assert (chosen.gguf_quant, chosen.onnx_quant, chosen.eval_threads) == ("Q8_0", (), 3)


def test_chain_follows_the_profile_formats_and_the_enabled_flags():
    profile = load_profile("phone-1gb").model_copy(update={"formats": ["gguf"]})
    recipe = load_recipe(None, ["qlora.enabled=false"])
    chain = resolve(profile, recipe, []).chain
    assert [s.name for s in chain] == ["distill", "qat_kd", "export_gguf", "bench"]
    # Asked for by name, a stage runs whatever the profile or the recipe says.
    asked = [s.name for s in resolve(profile, recipe, ["qlora", "export_onnx"]).chain]
    assert asked == ["distill", "qlora", "qat_kd", "export_gguf", "export_onnx", "bench"]


def test_train_examples_is_what_the_longest_training_stage_draws():
    profile = load_profile("phone-1gb")
    sets = ["distill.max_steps=7", "distill.grad_accum=2", "qat_kd.max_steps=9"]
    recipe = load_recipe(None, sets)
    assert resolve(profile, recipe, []).train_examples == max(7 * 4 * 2, 9 * 4)
    off = load_recipe(None, ["distill.max_steps=1", "qat_kd.max_steps=30"])
    assert resolve(profile, off, []).train_examples == 30 * 4
    short = load_recipe(None, ["distill.max_steps=1", "qat_kd.enabled=false"])
    assert resolve(profile, short, ["export_gguf"]).train_examples == 4


def test_export_quant_override_is_fit_checked_at_its_size():
    # The embedded teacher's 20-layer student: ~77 MB at Q4_K_M, ~102 MB at Q8_0, + 30 MB of KV.
    profile = load_profile("phone-1gb").model_copy(update={"memory_budget_mb": 120})
    fixed = ["student.num_layers=20", "student.prune=depth"]
    q4 = make_plan(profile, load_recipe(None, fixed), ["distill"], timing=False)
    assert q4.fits and q4.effective.gguf_quant == "Q4_K_M"
    q8 = make_plan(
        profile,
        load_recipe(None, [*fixed, "export_gguf.quant=Q8_0"]),
        ["distill"],
        timing=False,
        strict=False,
    )
    assert q8.student_q_bytes > q4.student_q_bytes and not q8.fits
    assert any(line.startswith("size      Q8_0 ") for line in q8.lines(profile))
    with pytest.raises(EdgekdError, match=r"MB \(Q8_0 weights"):
        make_plan(
            profile,
            load_recipe(None, [*fixed, "export_gguf.quant=Q8_0"]),
            ["distill"],
            timing=False,
        )
    # Left to choose, the student keeps fewer layers at Q8_0: what fits at the exported size (the
    # count distill prunes to, from the same function and the same effective quant).
    chosen = make_plan(
        profile,
        load_recipe(None, ["export_gguf.quant=Q8_0", "student.prune=depth"]),
        ["distill"],
        timing=False,
    )
    assert chosen.fits
    assert chosen.student_config.num_hidden_layers < q4.student_config.num_hidden_layers
    assert "largest that fits phone-1gb's budget" in chosen.student_layers_note


def test_a_profile_format_no_export_writes_is_refused_before_work():
    profile = load_profile("phone-1gb").model_copy(update={"formats": ["gguf", "tflite"]})
    with pytest.raises(EdgekdError, match="formats lists 'tflite', which no export stage writes"):
        resolve(profile, load_recipe(), [])
