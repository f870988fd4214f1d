"""Stage order, resume and the manifest.

Each stage runs in `<run>/.<NN-name>.partial/`, which is renamed to `<run>/<NN-name>/` when the
stage succeeds; its `.done` marker is written last and holds the key (a hash of the stage's settings
and of everything upstream) and the hashes of its artifacts. A stage whose marker matches is
skipped; any other is re-run, and every stage after it too, because their keys chain.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgekd import atomic, data, models
from edgekd.config import Profile, Recipe, settings_hash
from edgekd.context import Context
from edgekd.errors import EdgekdError
from edgekd.train import CHECKPOINT

STAGES = ("distill", "qlora", "qat_kd", "export_gguf", "export_onnx", "bench")
IMPLEMENTED = ("distill", "qlora", "qat_kd", "export_gguf", "export_onnx", "bench")
TRAINING = ("distill", "qlora", "qat_kd")
BUILD_FILE = "build.json"
console = Console()


@dataclass
class StageResult:
    """What a stage hands back: its artifacts (paths inside its folder) and its report."""

    artifacts: list[str]
    report: dict = field(default_factory=dict)
    quality: dict[str, dict] = field(default_factory=dict)  # row name -> ppl/kld/top1/tokens


def stage_dirname(stage: str) -> str:
    return f"{STAGES.index(stage) + 1:02d}-{stage.replace('_', '-')}"


def stage_settings(recipe: Recipe, stage: str) -> dict:
    """The settings that make a stage's output (distill also depends on the student's shape)."""
    own = getattr(recipe, stage).model_dump(mode="json")
    if stage == "distill":
        return {"distill": own, "student": recipe.student.model_dump(mode="json")}
    if stage.startswith("export"):
        return {stage: own, "eval": recipe.eval.model_dump(mode="json")}
    return own


def read_done(stage_dir: Path) -> dict | None:
    try:
        return json.loads((stage_dir / ".done").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def select_stages(requested: list[str] | None, profile: Profile, recipe: Recipe) -> list[str]:
    """The stages to run now: those asked for, or the whole chain."""
    if not requested:
        return build_chain(profile, recipe, [])
    unknown = [s for s in requested if s not in STAGES]
    if unknown:
        raise EdgekdError(f"unknown stage '{unknown[0]}'; stages are: {', '.join(STAGES)}")
    missing = [s for s in requested if s not in IMPLEMENTED]
    if missing:
        raise EdgekdError(
            f"stage '{missing[0]}' is not available in this version of edgekd; "
            f"available: {', '.join(IMPLEMENTED)}"
        )
    return [s for s in STAGES if s in requested]


def build_chain(profile: Profile, recipe: Recipe, requested: list[str]) -> list[str]:
    """Every stage of this build: the implemented ones, less training stages the recipe turns off
    and exports the profile does not want (unless asked for by name)."""
    wanted = {"export_gguf": "gguf", "export_onnx": "onnx"}

    def included(stage: str) -> bool:
        if stage in requested:
            return True
        if stage in wanted:
            return wanted[stage] in profile.formats
        return getattr(getattr(recipe, stage), "enabled", True)

    return [s for s in IMPLEMENTED if included(s)]


def inputs_of(stage: str, chain: list[str]) -> list[str]:
    """The stages whose output this one reads: the last training stage before it (bench: all)."""
    before = [s for s in chain if STAGES.index(s) < STAGES.index(stage)]
    if stage == "bench":
        return before
    trained = [s for s in before if s in TRAINING]
    return trained[-1:]


def check_run_dir(run_dir: Path, identity: dict, force: bool, is_main: bool) -> None:
    """Refuse a folder that holds a different build, unless --force."""
    path = run_dir / BUILD_FILE
    if path.exists():
        held = json.loads(path.read_text())
        if held != identity:
            if not force:
                diff = ", ".join(
                    f"{k}: {held.get(k)!r} there, {v!r} now"
                    for k, v in identity.items()
                    if held.get(k) != v
                )
                raise EdgekdError(
                    f"{run_dir} holds a different build ({diff}); pass --out for a new folder "
                    "or --force to replace it"
                )
            if is_main:
                for child in run_dir.iterdir():
                    if child.name != "cache":
                        atomic.remove(child)
    elif run_dir.exists() and any(p.name != "cache" for p in run_dir.iterdir()) and not force:
        raise EdgekdError(
            f"{run_dir} is not empty and holds no edgekd build; pass --out for a new folder "
            "or --force to use it"
        )
    if is_main:
        atomic.write_json(path, identity)


def write_manifest(run_dir: Path) -> None:
    stages = {}
    for stage in STAGES:
        done = read_done(run_dir / stage_dirname(stage))
        if done is not None:
            stages[stage] = {
                "key": done["key"],
                "artifacts": {
                    f"{stage_dirname(stage)}/{name}": meta
                    for name, meta in done["artifacts"].items()
                },
            }
    atomic.write_json(run_dir / "manifest.json", {"stages": stages})


def _finish_stage(ctx: Context, stage: str, key: str, result: StageResult, seconds: float) -> None:
    work, final = ctx.work_dir, ctx.run_dir / stage_dirname(stage)
    report = {
        "stage": stage,
        "key": key,
        "seconds": round(seconds, 1),
        "settings": stage_settings(ctx.recipe, stage),
        "quality": result.quality,
        **result.report,
    }
    atomic.write_json(work / "report.json", report)
    artifacts = {}
    for name in [*result.artifacts, "report.json"]:
        path = work / name
        if not path.is_file():
            raise RuntimeError(f"stage {stage} reported artifact {name} that it did not write")
        artifacts[name] = {"bytes": path.stat().st_size, "sha256": atomic.sha256_file(path)}
    (work / ".key").unlink(missing_ok=True)
    atomic.remove(final)
    atomic.fsync_path(work)
    work.rename(final)
    atomic.write_json(final / ".done", {"key": key, "artifacts": artifacts})
    write_manifest(ctx.run_dir)


def quality_table(title: str, quality: dict[str, dict]) -> Table:
    table = Table(title=title)
    for col in ("model", "ppl", "kld", "top1", "tokens"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, q in quality.items():
        table.add_row(
            name, f"{q['ppl']:.3f}", f"{q['kld']:.4f}", f"{q['top1']:.3f}", str(q["tokens"])
        )
    return table


def build_identity(profile: Profile, recipe: Recipe) -> dict:
    """What build.json holds: a run folder serves one profile and teacher."""
    return {"profile": profile.model_dump(mode="json"), "teacher": recipe.teacher.source}


def stage_keys(
    profile: Profile, recipe: Recipe, chain: list[str], teacher: models.ModelSource
) -> dict[str, str]:
    """Each stage's key: a hash of its settings, the build, the data, the teacher and its inputs'
    keys."""
    teacher_key = models.teacher_key(recipe.teacher, teacher)
    base = settings_hash(
        build_identity(profile, recipe), recipe.data, data.HELDOUT_RULE, teacher_key
    )
    keys: dict[str, str] = {}
    for stage in chain:
        upstream = [keys[s] for s in inputs_of(stage, chain)]
        keys[stage] = settings_hash(stage, stage_settings(recipe, stage), base, *upstream)
    return keys


def pending_stages(
    profile: Profile, recipe: Recipe, run_dir: Path, stages: list[str], teacher
) -> list[str]:
    """The stages of `stages` a build would run now: those with no finished folder of their key."""
    keys = stage_keys(profile, recipe, build_chain(profile, recipe, stages), teacher)
    return [
        s
        for s in stages
        if (done := read_done(run_dir / stage_dirname(s))) is None or done["key"] != keys[s]
    ]


def _prepare_work_dir(ctx: Context, stage: str, key: str) -> None:
    """Reuse the training checkpoint a killed run of the same stage and key left; start clean
    otherwise. Anything else in a partial folder may have been cut short, so it goes."""
    ctx.work_dir = ctx.run_dir / f".{stage_dirname(stage)}.partial"
    if ctx.is_main:
        held_key = ctx.work_dir / ".key"
        if ctx.work_dir.exists() and (not held_key.exists() or held_key.read_text() != key):
            atomic.remove(ctx.work_dir)
        elif ctx.work_dir.exists():
            for child in ctx.work_dir.iterdir():
                if child.name not in (".key", CHECKPOINT):
                    atomic.remove(child)
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(held_key, key)
    ctx.barrier()


def build(
    profile: Profile,
    recipe: Recipe,
    run_dir: Path,
    stages: list[str],
    *,
    force: bool = False,
) -> dict[str, str]:
    """Run `stages` in order, after checking that the stages they read from are built;
    returns each stage's outcome ('ran' or 'up to date')."""
    ctx = Context(run_dir=run_dir, profile=profile, recipe=recipe)
    # The other processes look only once the main one has written build.json (atomically, through
    # a temporary file they would otherwise take for a foreign one).
    with ctx.state.main_process_first():
        check_run_dir(run_dir, build_identity(profile, recipe), force, ctx.is_main)
        if ctx.is_main:
            for folder in (run_dir, run_dir / "cache"):
                atomic.remove_temporaries(folder)
    chain = build_chain(profile, recipe, stages)
    needed = {dep for s in stages for dep in inputs_of(s, chain)}
    keys = stage_keys(profile, recipe, chain, ctx.teacher_source)
    for stage in chain:  # before any stage runs: a missing input must not cost a stage's work
        done = read_done(run_dir / stage_dirname(stage))
        if stage in needed and stage not in stages and (done is None or done["key"] != keys[stage]):
            raise EdgekdError(
                f"stage '{stage}' must be built first with these settings, before "
                f"{', '.join(s for s in stages if stage in inputs_of(s, chain))}; "
                f"add it to --stages"
            )
    outcome: dict[str, str] = {}
    for stage in chain:
        key = keys[stage]
        final = run_dir / stage_dirname(stage)
        done = read_done(final)
        if stage not in stages:
            if done is not None:
                ctx.stage_dirs[stage] = final
            continue
        if done is not None and done["key"] == key:
            console.print(f"[green]{stage}[/]: up to date ({final}), skipped")
            ctx.stage_dirs[stage] = final
            outcome[stage] = "up to date"
            continue
        _prepare_work_dir(ctx, stage, key)
        ctx.stage_dirs[stage] = ctx.work_dir
        console.print(f"[bold]{stage}[/]: running in {ctx.work_dir}")
        module = importlib.import_module(f"edgekd.stages.{stage}")
        start = time.perf_counter()
        result: StageResult = module.run(ctx, getattr(recipe, stage))
        if ctx.is_main:
            _finish_stage(ctx, stage, key, result, time.perf_counter() - start)
            console.print(quality_table(f"{stage}: held-out quality", result.quality))
        ctx.barrier()
        ctx.stage_dirs[stage] = final
        outcome[stage] = "ran"
    if all(v == "up to date" for v in outcome.values()):
        console.print("Nothing to do: every requested stage is up to date.")
    if ctx.is_main:
        write_manifest(run_dir)  # a kill between a .done and the manifest left it behind
        from edgekd.report import summary  # imports this module

        report, html_path = summary.write(run_dir)
        summary.print_summary(report, console, html_path)
    return outcome
