"""distill: build the student (a given model, or the teacher minus its least useful block of
layers) and train it on the teacher's soft targets with the KD loss."""

from __future__ import annotations

import torch

from edgekd import evaluate, models
from edgekd.config import DistillSettings
from edgekd.context import Context
from edgekd.data import collate, padding_id
from edgekd.evaluate import evaluate_torch
from edgekd.rundir import StageResult
from edgekd.stages.spec import SizeInputs, StageSpec
from edgekd.student import layer_count
from edgekd.train import save_curve, train_kd


def _choose_layers(ctx: Context, teacher) -> tuple[list[int], dict]:
    """Keep the layers whose contiguous complement changes the teacher's output least (kld)."""
    total = teacher.config.num_hidden_layers
    n_keep, why = layer_count(teacher.config, ctx.recipe, ctx.profile, ctx.effective.gguf_quant)
    n_drop = total - n_keep
    calib = ctx.train_examples[: ctx.recipe.student.calibration_examples]
    pad = padding_id(ctx.tokenizer)
    batches = [collate(calib[i : i + 4], pad) for i in range(0, len(calib), 4)]
    scores = models.block_drop_scores(teacher, batches, n_drop)
    start, kld = min(scores, key=lambda s: s[1])
    keep = [i for i in range(total) if not start <= i < start + n_drop]
    report = {
        "teacher_layers": total,
        "kept_layers": keep,
        "dropped_block": [start, start + n_drop - 1] if n_drop else None,
        "dropped_block_kld": kld,
        "why": why,
        "candidates": [{"first": s, "last": s + n_drop - 1, "kld": k} for s, k in scores],
        "calibration_examples": len(calib),
    }
    return keep, report


def _load_student(ctx: Context) -> tuple[torch.nn.Module, dict]:
    spec = ctx.recipe.student
    if spec.source is not None:
        src = models.resolve_source(spec.source, role="student")
        models.check_same_tokenizer(
            ctx.tokenizer,
            models.load_tokenizer(src),
            teacher_name=ctx.teacher_source.describe(),
            student_name=src.describe(),
        )
        student = models.load_model(src, allow_pickle=spec.allow_pickle, role="student")
        return student, {"source": src.describe()}
    keep, report = _choose_layers(ctx, ctx.teacher)
    # The student trains in float32 whatever dtype the teacher is held in.
    student = models.prune_layers(ctx.teacher, keep).float()
    return student, {"source": "pruned teacher", **report}


def run(ctx: Context, settings: DistillSettings) -> StageResult:
    student, student_report = _load_student(ctx)
    student.requires_grad_(True)
    # Every process takes the reference: its first use synchronizes the processes.
    reference = ctx.reference
    quality = {}
    if ctx.is_main:
        # The reference is the teacher's own held-out log-probs: its row needs no second pass.
        quality["teacher"] = evaluate.quality(reference, reference, ctx.heldout.targets).as_dict()
        quality["student before"] = evaluate_torch(student, ctx.heldout, reference).as_dict()
    curve, train_report = train_kd(ctx, student, settings, name="distill")
    artifacts = []
    if ctx.is_main:
        quality["student after"] = evaluate_torch(student, ctx.heldout, reference).as_dict()
        artifacts = models.save_model(student, ctx.tokenizer, ctx.work_dir / "model")
        artifacts = [f"model/{a}" for a in artifacts]
        artifacts.append(save_curve(ctx.work_dir, curve))
    return StageResult(
        artifacts=artifacts,
        report={
            "teacher": ctx.teacher_key,
            "reference": ctx.reference_source,
            "student": student_report,
            "training": train_report,
        },
        quality=quality,
    )


def disk_bytes(s: SizeInputs) -> int:
    """The student and its checkpoint; the teacher's held-out log-probs (fp16, whole vocabulary)."""
    scored = s.recipe.data.max_heldout * s.recipe.data.max_seq_len
    return 16 * s.params + 2 * s.student_config.vocab_size * scored


SPEC = StageSpec(
    name="distill",
    settings=DistillSettings,
    kind="train",
    folder="01-distill",
    produces="hf",
    disk_bytes=disk_bytes,
    run=run,
    # Its KD targets come from the logit cache: another cache folder or top_k is another output.
    keyed_with=("student", "logit_cache"),
)
