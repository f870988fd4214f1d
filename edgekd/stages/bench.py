"""bench: measure every artifact of the build in its own runtime, with the profile's threads and
context length: size, peak memory, speed, held-out quality and exact-match answers, and whether
the device artifacts fit the profile's memory budget; with `bench.tasks`, each artifact's
lm-evaluation-harness task scores and its share of the teacher's."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from edgekd import benchmark, data, device, host_memory, models, speculative
from edgekd.benchmark import Artifact
from edgekd.config import BenchSettings
from edgekd.console import console
from edgekd.context import Context
from edgekd.errors import EdgekdError
from edgekd.formats.hf_torch import SCORE_TOKENS
from edgekd.rundir import StageResult, read_done
from edgekd.stages.spec import SizeInputs, StageSpec


def _shown(path: Path, run_dir: Path) -> str:
    """Paths inside the run folder relative to it; others (the teacher) as they are."""
    return str(path.relative_to(run_dir)) if path.is_relative_to(run_dir) else str(path)


def artifacts(ctx: Context) -> list[Artifact]:
    """The teacher (unless served: it is not on this machine), the full-precision student and
    the exports (those that ship, or all with bench.artifacts=all), in build order."""
    exports = [s for s in ctx.effective.chain if s.kind == "export" and s.name in ctx.stage_dirs]
    every = ctx.recipe.bench.artifacts == "all"
    return [
        *([] if ctx.is_served else [benchmark.teacher_artifact(ctx.teacher_source)]),
        Artifact("student", "torch", ctx.latest_model(), role="student"),
        *[a for a in benchmark.export_artifacts(exports, ctx.stage_dirs) if every or a.shipped],
    ]


def _questions(ctx: Context, n: int) -> tuple[list[dict], dict]:
    """Shipped checkable questions that no training stage saw."""
    s = ctx.recipe.data
    train, _ = data.split_heldout(ctx.rows, s.heldout_fraction, s.max_heldout)
    trained = {
        m["content"] for row in train for m in row.get("messages", []) if m["role"] == "user"
    }
    checkable = [r for r in data.default_prompts() if r.get("answer") is not None]
    picked = benchmark.pick_questions(checkable, n, exclude=trained)
    left_out = sum(r["prompt"] in trained for r in checkable)
    note = benchmark.questions_note(
        len(picked), len(checkable), left_out, ctx.recipe.bench.answer_max_tokens
    )
    return picked, note


def _speculative(ctx: Context, settings: BenchSettings, threads: int) -> dict:
    """Greedy speculative decoding of held-out prompts, the student drafting for the teacher."""
    console.print(
        f"  bench: speculative decoding, student drafts {settings.speculative.draft_len} tokens "
        f"(torch, {threads} threads)"
    )
    student = models.load_model(models.resolve_source(str(ctx.latest_model()), role="student"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        measured = speculative.greedy_acceptance(
            student,
            ctx.teacher,
            speculative.heldout_prompts(ctx.heldout, settings.speculative.prompts),
            draft_len=settings.speculative.draft_len,
            max_new_tokens=settings.speculative.max_tokens,
        )
    finally:
        torch.set_num_threads(before)
    note = "both models in torch"
    if ctx.teacher_source.kind == "gguf":
        note += ", the GGUF teacher dequantized"
    return {**measured, "note": note}


def _score_tasks(
    ctx: Context, settings: BenchSettings, found: list[Artifact], rows: list[dict], threads: int
) -> None:
    """Every artifact's lm-evaluation-harness task scores (and time per task), with its share
    of the teacher's, added to its bench row."""
    from edgekd import harness

    student_params = models.params_at(ctx.latest_model())
    # A served teacher is not among the artifacts: its parameters are never asked for.
    teacher_params = (
        None if ctx.is_served else models.param_count(models.load_config(ctx.teacher_source))
    )
    scored = harness.score_artifacts(
        [(a, teacher_params if a.role == "teacher" else student_params) for a in found],
        settings.tasks,
        limit=settings.task_limit,
        fewshot=settings.task_fewshot,
        threads=threads,
        say=console.print,
    )
    for row, s in zip(rows, scored, strict=True):
        row["params"], row["tasks"] = s["params"], s["tasks"]


def run(ctx: Context, settings: BenchSettings) -> StageResult:
    profile = ctx.profile
    if settings.prompt_tokens + settings.decode_tokens >= profile.context_length:
        raise EdgekdError(
            f"bench.prompt_tokens ({settings.prompt_tokens}) + bench.decode_tokens "
            f"({settings.decode_tokens}) must stay below the profile's context_length "
            f"({profile.context_length}); lower them with --set bench.prompt_tokens=..."
        )
    threads = ctx.effective.bench_threads
    found = artifacts(ctx)
    questions, questions_note = _questions(ctx, settings.questions)
    prompt = benchmark.prompt_ids(ctx.heldout.sequences, settings.prompt_tokens)
    bandwidth = benchmark.host_bandwidth(settings.bandwidth_mib, threads)
    host = benchmark.host_info(threads, bandwidth, settings.bandwidth_mib)
    rows = []
    with tempfile.TemporaryDirectory(dir=ctx.work_dir, prefix="scratch-") as scratch:
        heldout_file = Path(scratch) / "heldout.safetensors"
        benchmark.save_heldout(heldout_file, ctx.heldout, ctx.reference)
        for artifact in found:
            console.print(f"  bench: {artifact.name} ({artifact.runtime}, {threads} threads)")
            row = benchmark.benchmark_artifact(
                artifact,
                profile=profile,
                settings=settings,
                threads=threads,
                host_bandwidth_bps=bandwidth,
                prompt=prompt,
                questions=questions,
                heldout_file=heldout_file,
                scratch=Path(scratch) / "job",
            )
            rows.append({**row, "path": _shown(Path(artifact.path), ctx.run_dir)})
        on_device = None
        if profile.device is not None:
            console.print(f"  bench: on device {profile.device.label} over SSH")
            on_device = device.bench_on_device(
                profile.device,
                found,
                profile=profile,
                settings=settings,
                prompt=prompt,
                questions=questions,
                heldout_file=heldout_file,
            )
    report = benchmark.bench_report(profile, settings, host, rows, questions_note)
    if on_device is not None:
        for row in on_device["rows"]:
            row["path"] = _shown(Path(row["path"]), ctx.run_dir)
        report["device"] = on_device
    # The keys of the stages measured, so a report can tell when they were rebuilt since.
    report["inputs"] = {
        stage: read_done(folder)["key"]
        for stage, folder in ctx.stage_dirs.items()
        if folder != ctx.work_dir and read_done(folder)
    }
    # Speculative decoding needs the teacher's logits in this process.
    if settings.speculative.prompts and not ctx.is_served:
        report["speculative"] = _speculative(ctx, settings, threads)
    # The task scores load each artifact here, the teacher among them.
    ctx.release_teacher()
    if settings.tasks:
        _score_tasks(ctx, settings, found, rows, threads)
    quality = {f"{r['name']} ({r['runtime']})": r["quality"] for r in rows}
    return StageResult(artifacts=[], report=report, quality=quality)


def disk_bytes(s: SizeInputs) -> int:
    """Nothing that stays: its scratch copy of the held-out slice goes when it ends."""
    return 0


def host_bytes(s: SizeInputs) -> int:
    """The larger of the speculative check (the teacher and the fp32 student in this process)
    and the task scores after it (one artifact at a time in this process, the teacher the
    largest, with a batch's logits and their fp32 copy); the artifacts' own measures run in a
    child, one at a time."""
    teacher = host_memory.teacher_bytes(s.teacher_config, s.recipe)
    speculative = teacher + host_memory.fp32_bytes(s.student_config)
    logits = 2 * 4 * SCORE_TOKENS * s.student_config.vocab_size
    tasks = teacher + logits if s.recipe.bench.tasks else 0
    return int(host_memory.common_bytes(s.recipe, s.student_config) + max(speculative, tasks))


SPEC = StageSpec(
    name="bench",
    settings=BenchSettings,
    kind="bench",
    folder="06-bench",
    produces=None,
    disk_bytes=disk_bytes,
    host_bytes=host_bytes,
    run=run,
    main_only=True,
)
