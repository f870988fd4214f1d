"""Checks that run before any expensive work, each failing with one clear line.

`make_plan` has already resolved the teacher and checked that the student fits the profile; this
adds what needs more than a config: weights present, usable data, a shared tokenizer.
"""

from __future__ import annotations

import warnings

from edgekd import data, models
from edgekd.config import Profile, Recipe
from edgekd.errors import EdgekdError, EdgekdWarning
from edgekd.feature_kd import layer_pairs
from edgekd.formats import gguf, onnx
from edgekd.plan import Plan
from edgekd.quant.gguf_k import q4_k_m_types


def check_data(recipe: Recipe) -> None:
    """The user's corpus is readable, non-empty and big enough for a held-out slice and a batch."""
    if recipe.data.source is None:
        return
    rows = data.load_corpus(recipe.data.source)
    train, heldout = data.split_heldout(rows, recipe.data.heldout_fraction, recipe.data.max_heldout)
    if not heldout:
        raise EdgekdError(
            f"data {recipe.data.source}: {len(rows)} examples leave none for the held-out slice "
            f"at data.heldout_fraction={recipe.data.heldout_fraction}; add examples or raise it"
        )
    if len(train) < recipe.distill.batch_size:
        raise EdgekdError(
            f"data {recipe.data.source}: {len(train)} training examples cannot fill one batch of "
            f"distill.batch_size={recipe.distill.batch_size}; add examples or lower it"
        )


TRAINING_STAGES = ("distill", "qlora", "qat_kd")


def check_layer_maps(recipe: Recipe, plan: Plan) -> None:
    """Every feature/attention layer map fits the student's and the teacher's layer counts."""
    n_s = plan.student_config.num_hidden_layers
    n_t = plan.teacher_config.num_hidden_layers
    for stage in (s for s in plan.stages if s in TRAINING_STAGES):
        settings = getattr(recipe, stage)
        for name, group, on in (
            ("feature", settings.feature, settings.feature.weight),
            ("attention", settings.attention, settings.attention.weight
             or settings.attention.value_weight),
        ):  # fmt: skip
            if not on:
                continue
            try:
                layer_pairs(n_s, n_t, group.layers, group.last_k)
            except ValueError as e:
                raise EdgekdError(
                    f"{stage}.{name}.layers: {e}; fix {stage}.{name}.layers or .last_k"
                ) from None


def guidance(recipe: Recipe, plan: Plan) -> list[str]:
    """Warnings for training settings outside the ranges the literature found to work."""
    out = []
    ratio = models.param_count(plan.student_config) / models.param_count(plan.teacher_config)
    for stage in (s for s in plan.stages if s in TRAINING_STAGES):
        s = getattr(recipe, stage)
        if s.alpha > 0 and not 1 <= s.temperature <= 20:
            why = (
                "below 1 it sharpens the teacher toward its top token and hides the small "
                "probabilities that carry its 'dark knowledge'"
                if s.temperature < 1
                else "above 20 the teacher's distribution is nearly uniform and carries no signal"
            )
            out.append(
                f"{stage}.temperature={s.temperature}: {why}; Hinton et al. 2015 (Distilling the "
                "Knowledge in a Neural Network) and LLM practice use 1-20, 2-5 to start"
            )
        if "alpha" not in s.model_fields_set and not 0.5 <= s.alpha <= 0.9:
            out.append(
                f"{stage}.alpha={s.alpha} (a default, not your choice) is outside 0.5-0.9, the "
                "usual weight of the soft targets against the hard labels (Hinton et al. 2015; "
                "DistilBERT, Sanh et al. 2019); set it explicitly to silence this"
            )
        if s.feature.weight > 0 and not 0.1 <= ratio <= 0.3:
            out.append(
                f"{stage}.feature.weight={s.feature.weight} with a student of {ratio:.2f}x the "
                "teacher's parameters: feature KD is reported to work best at 0.1x-0.3x (TinyBERT, "
                "Jiao et al. 2020, at 0.13x; a larger gap hurts, Mirzadeh et al. 2020); a "
                "student close to the teacher's size gains little from it over logit KD"
            )
    return out


def preflight(profile: Profile, recipe: Recipe, plan: Plan) -> None:
    for message in guidance(recipe, plan):
        warnings.warn(message, EdgekdWarning, stacklevel=2)
    check_layer_maps(recipe, plan)
    models.check_weights(plan.teacher, allow_pickle=recipe.teacher.allow_pickle, role="teacher")
    tokenizer = models.load_tokenizer(plan.teacher)
    if plan.student_source is not None:
        models.check_weights(plan.student_source, allow_pickle=False, role="student")
        models.check_same_tokenizer(
            tokenizer,
            models.load_tokenizer(plan.student_source),
            teacher_name=plan.teacher.describe(),
            student_name=plan.student_source.describe(),
        )
    if "qat_kd" in plan.stages:
        quant = recipe.export_gguf.quant or profile.gguf_quant
        if quant != "Q4_K_M":
            raise EdgekdError(
                f"qat_kd imitates llama.cpp's Q4_K_M, but this build exports {quant}; "
                "set qat_kd.enabled=false or export Q4_K_M"
            )
        q4_k_m_types(plan.student_config)
    if "export_gguf" in plan.stages:
        gguf.check_exportable(plan.student_config, tokenizer)
    if "export_onnx" in plan.stages:
        onnx.check_exportable(plan.student_config)
    check_data(recipe)
