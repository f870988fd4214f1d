"""distill: build the student (a given model, or the teacher minus its least useful block of
layers) and train it on the teacher's soft targets with the KD loss."""

from __future__ import annotations

import torch

from edgekd import evaluate, host_memory, models, student
from edgekd.config import DistillSettings
from edgekd.context import Context
from edgekd.data import collate, padding_id
from edgekd.evaluate import evaluate_torch
from edgekd.rundir import StageResult
from edgekd.stages.spec import SizeInputs, StageSpec
from edgekd.train import save_curve, train_kd


def _calibration(ctx: Context) -> list[dict]:
    calib = ctx.train_examples[: ctx.recipe.student.calibration_examples]
    pad = padding_id(ctx.tokenizer)
    return [collate(calib[i : i + 4], pad) for i in range(0, len(calib), 4)]


def _prune(ctx: Context) -> tuple[torch.nn.Module, dict]:
    """The student cut from the teacher; with several candidates (prune=auto) each is healed
    briefly and the lowest held-out kld wins."""
    spec, teacher = ctx.recipe.student, ctx.teacher
    candidates = student.candidates(
        teacher.config, ctx.recipe, ctx.profile, ctx.effective.gguf_quant
    )
    batches = _calibration(ctx)
    common = {"source": "pruned teacher", "prune": spec.prune}
    common["calibration_examples"] = sum(len(b["input_ids"]) for b in batches)
    if len(candidates) == 1:
        model, report = student.build(teacher, batches, candidates[0])
        row = candidates[0].row()
        return model.float(), {**common, **report, **row, "why": candidates[0].note}
    rows, best = [], None
    for c in candidates:
        model, report = student.build(teacher, batches, c)
        model = model.float()
        student.heal(model, teacher, batches, spec.heal_steps, spec.heal_lr)
        kld = evaluate_torch(model, ctx.heldout, ctx.reference).kld
        rows.append({**c.row(), "kld_after_heal": kld, "why": c.note, **report})
        if best is None or kld < best[0]:
            best = (kld, model, rows[-1])
    chosen = best[2]
    return best[1], {**common, **chosen, "heal_steps": spec.heal_steps, "candidates": rows}


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
        model = models.load_model(src, allow_pickle=spec.allow_pickle, role="student")
        return model, {"source": src.describe()}
    # The student trains in float32 whatever dtype the teacher is held in.
    return _prune(ctx)


def run(ctx: Context, settings: DistillSettings) -> StageResult:
    model, student_report = _load_student(ctx)
    model.requires_grad_(True)
    # Every process takes the reference: its first use synchronizes the processes.
    reference = ctx.reference
    quality = {}
    if ctx.is_main:
        # The reference is the teacher's own held-out log-probs: its row needs no second pass.
        quality["teacher"] = evaluate.quality(reference, reference, ctx.heldout.targets).as_dict()
        quality["student before"] = evaluate_torch(model, ctx.heldout, reference).as_dict()
    curve, train_report = train_kd(ctx, model, settings, name="distill")
    artifacts = []
    if ctx.is_main:
        quality["student after"] = evaluate_torch(model, ctx.heldout, reference).as_dict()
        artifacts = models.save_model(model, ctx.tokenizer, ctx.work_dir / "model")
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


def host_bytes(s: SizeInputs) -> int:
    """The runtime, the held-out reference and the KD step (student, gradients, AdamW, teacher)."""
    step = host_memory.train_step_bytes(
        s.student_config, s.teacher_config, s.recipe, s.recipe.distill
    )
    return int(host_memory.common_bytes(s.recipe, s.student_config) + step)


SPEC = StageSpec(
    name="distill",
    settings=DistillSettings,
    kind="train",
    folder="01-distill",
    produces="hf",
    disk_bytes=disk_bytes,
    host_bytes=host_bytes,
    run=run,
    # Its KD targets come from the logit cache: another cache folder or top_k is another output.
    keyed_with=("student", "logit_cache"),
)
