import warnings

import pytest

from edgekd.config import KDSettings, load_profile, load_recipe
from edgekd.errors import EdgekdError, EdgekdWarning
from edgekd.plan import make_plan
from edgekd.preflight import check_layer_maps, check_logit_cache, guidance, preflight


def _plan(teacher, overrides):
    profile = load_profile("phone-1gb")
    recipe = load_recipe(None, ["student.num_layers=2", *overrides], teacher=str(teacher))
    return recipe, make_plan(profile, recipe, ["distill"], timing=False)


def test_no_guidance_for_the_defaults(tiny_teacher_dir):
    recipe, plan = _plan(tiny_teacher_dir, [])
    assert guidance(recipe, plan) == []


@pytest.mark.parametrize(("t", "word"), [(0.5, "below 1"), (25, "above 20")])
def test_temperature_outside_1_to_20_warns(tiny_teacher_dir, t, word):
    recipe, plan = _plan(tiny_teacher_dir, [f"distill.kd.temperature={t}"])
    (msg,) = guidance(recipe, plan)
    assert msg.startswith(f"distill.kd.temperature={t}") and word in msg and "Hinton" in msg
    # With alpha=0 there are no soft targets to soften.
    recipe, plan = _plan(tiny_teacher_dir, [f"distill.kd.temperature={t}", "distill.kd.alpha=0"])
    assert guidance(recipe, plan) == []


def test_alpha_warns_only_when_not_chosen(tiny_teacher_dir):
    recipe, plan = _plan(tiny_teacher_dir, ["distill.kd.alpha=0.3"])
    assert guidance(recipe, plan) == []  # the user chose it
    # A default outside the range (none ships today): fields_set says nobody chose it.
    recipe.distill.kd = KDSettings.model_construct(_fields_set=set(), alpha=0.3)
    (msg,) = guidance(recipe, plan)
    assert msg.startswith("distill.kd.alpha=0.3") and "0.5-1" in msg


def test_feature_kd_warns_outside_0_1_to_0_3_of_the_teacher(tiny_teacher_dir):
    # The pruned student keeps 2 of 4 layers and the embeddings: far above 0.3x.
    recipe, plan = _plan(tiny_teacher_dir, ["distill.feature.weight=1"])
    (msg,) = guidance(recipe, plan)
    assert msg.startswith("distill.feature.weight=1.0") and "0.1x-0.3x" in msg


def test_preflight_emits_the_warnings_and_checks_layer_maps(tiny_teacher_dir, tmp_path):
    recipe, plan = _plan(tiny_teacher_dir, ["distill.kd.temperature=30"])
    with pytest.warns(EdgekdWarning, match="distill.kd.temperature=30"):
        preflight(load_profile("phone-1gb"), recipe, plan, tmp_path / "run")
    recipe, plan = _plan(
        tiny_teacher_dir, ["distill.attention.value_weight=1", "distill.attention.layers={3: 4}"]
    )
    with pytest.raises(EdgekdError, match=r"distill.attention.layers: layers map 3: 4"):
        check_layer_maps(recipe, plan)
    recipe, plan = _plan(tiny_teacher_dir, ["distill.attention.layers={3: 4}"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_layer_maps(recipe, plan)  # attention is off: its map is not used


def test_logit_cache_cannot_score_samples(tiny_teacher_dir):
    for extra in ("distill.on_policy.fraction=0.5", "distill.self_distill.enabled=true"):
        recipe, plan = _plan(tiny_teacher_dir, ["distill.teacher_logits=cache", extra])
        with pytest.raises(EdgekdError, match="distill.teacher_logits=cache: the cache scores"):
            check_logit_cache(recipe, plan)
    recipe, plan = _plan(tiny_teacher_dir, ["distill.teacher_logits=cache"])
    check_logit_cache(recipe, plan)
