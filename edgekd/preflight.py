"""Checks that run before any expensive work, each failing with one clear line.

`make_plan` has already resolved the teacher and checked that the student fits the profile; this
adds what needs more than a config: weights present and whole, room on disk for the stages still
to run, exportable architecture and tokenizer, usable data, a shared tokenizer, a chat template that
renders.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from edgekd import data, models, pipeline, teacher_data
from edgekd.config import Profile, Recipe
from edgekd.errors import EdgekdError
from edgekd.formats import gguf, onnx
from edgekd.plan import GB, Plan
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


def check_scale(recipe: Recipe, plan: Plan) -> None:
    """Mixed precision the host supports, one per build; a teacher quantization it can use."""
    precisions = {
        stage: getattr(recipe, stage).mixed_precision
        for stage in plan.stages
        if hasattr(getattr(recipe, stage), "mixed_precision")
    }
    for stage, precision in precisions.items():
        if precision == "fp16" and not torch.cuda.is_available():
            raise EdgekdError(
                f"{stage}.mixed_precision=fp16 needs a CUDA GPU and none is visible; "
                "set it to bf16 or no"
            )
    if len(set(precisions.values())) > 1:
        # accelerate fixes the precision once per process.
        given = ", ".join(f"{stage}.mixed_precision={p}" for stage, p in precisions.items())
        raise EdgekdError(f"{given}: set the same value for every training stage of a build")
    load_in = recipe.teacher.load_in
    if load_in == "full":
        return
    if plan.teacher.kind == "gguf":
        raise EdgekdError(
            f"teacher.load_in={load_in} needs a Hugging Face model folder or hub id, but the "
            f"teacher is {plan.teacher.describe()}; set teacher.load_in=full"
        )
    if "distill" in plan.stages and plan.student_source is None:
        raise EdgekdError(
            f"teacher.load_in={load_in}: a student pruned from a quantized teacher would be "
            "quantized too; set student.source to a model, or teacher.load_in=full"
        )


def check_disk(run_dir: Path, need_bytes: int, stages: list[str]) -> None:
    """The file system that will hold `run_dir` has room for the estimated size of the run."""
    where = Path(run_dir).absolute()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if need_bytes > free:
        raise EdgekdError(
            f"disk: stages {', '.join(stages)} need about {need_bytes / GB:.1f} GB (estimate) in "
            f"{run_dir} but only {free / GB:.1f} GB is free on the file system of {where}; "
            "free some space or pass --out on a larger disk"
        )


def check_chat_template(tokenizer, recipe: Recipe) -> None:
    """A chat corpus (the shipped prompts, or the user's chat rows) renders in the template."""
    if recipe.data.source is not None and not any(
        "messages" in row for row in data.load_corpus(recipe.data.source)
    ):
        return
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    data.render_chat(tokenizer, probe, add_generation_prompt=False)


def preflight(profile: Profile, recipe: Recipe, plan: Plan, run_dir: Path) -> None:
    """Every check that can fail before the build starts, in the order they cost."""
    check_scale(recipe, plan)
    models.check_weights(plan.teacher, allow_pickle=recipe.teacher.allow_pickle, role="teacher")
    pending = pipeline.pending_stages(profile, recipe, run_dir, plan.stages, plan.teacher)
    check_disk(run_dir, sum(plan.disk_bytes.get(s, 0) for s in pending), pending)
    tokenizer = models.load_tokenizer(plan.teacher)
    if plan.student_source is not None:
        models.check_weights(
            plan.student_source, allow_pickle=recipe.student.allow_pickle, role="student"
        )
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
    check_chat_template(tokenizer, recipe)
