"""Checks that run before any expensive work, each failing with one clear line.

`make_plan` has already resolved the teacher and checked that the student fits the profile; this
adds what needs more than a config: weights present, usable data, a shared tokenizer.
"""

from __future__ import annotations

from edgekd import data, models, teacher_data
from edgekd.config import Profile, Recipe
from edgekd.errors import EdgekdError
from edgekd.formats import gguf, onnx
from edgekd.plan import Plan
from edgekd.quant.gguf_k import q4_k_m_types


def check_data(recipe: Recipe) -> None:
    """The user's corpus is readable, non-empty and big enough for a held-out slice and a batch."""
    if recipe.data.source is None:
        return
    rows = data.load_corpus(recipe.data.source)
    if recipe.data.cot and not recipe.data.regenerate:
        raise EdgekdError(
            f"data.cot=true with data.source {recipe.data.source}: the teacher must write the "
            "answers; set data.regenerate=true too"
        )
    if recipe.data.regenerate:
        teacher_data.prompt_rows(rows, recipe.data.source)
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


def preflight(profile: Profile, recipe: Recipe, plan: Plan) -> None:
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
