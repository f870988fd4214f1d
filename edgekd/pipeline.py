"""Stage order, resume and the manifest.

Each stage runs in `<run>/.<NN-name>.partial/`, which is renamed to `<run>/<NN-name>/` when the
stage succeeds; its `.done` marker is written last and holds the key (a hash of the stage's settings
and of everything upstream) and the hashes of its artifacts. A stage whose marker matches is
skipped; any other is re-run, and every stage after it too, because their keys chain.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from accelerate import PartialState
from rich.table import Table

from edgekd import data, models, rundir, stages
from edgekd.config import Profile, Recipe, settings_hash
from edgekd.console import console, library_output
from edgekd.context import Context, on_gpu
from edgekd.effective import build_chain, resolve
from edgekd.errors import EdgekdError
from edgekd.report import summary
from edgekd.stages.spec import StageSpec


def stage_settings(recipe: Recipe, spec: StageSpec) -> dict:
    """The settings that make a stage's output: its own, and the sections it is keyed with."""
    own = getattr(recipe, spec.name).model_dump(mode="json")
    if not spec.keyed_with:
        return own
    others = {name: getattr(recipe, name).model_dump(mode="json") for name in spec.keyed_with}
    return {spec.name: own, **others}


def select_stages(requested: list[str] | None, profile: Profile, recipe: Recipe) -> list[str]:
    """The stages to run now: those asked for, or the whole chain."""
    if not requested:
        return [s.name for s in build_chain(profile, recipe, [])]
    unknown = [s for s in requested if s not in stages.NAMES]
    if unknown:
        raise EdgekdError(f"unknown stage '{unknown[0]}'; stages are: {', '.join(stages.NAMES)}")
    return [s for s in stages.NAMES if s in requested]


def inputs_of(spec: StageSpec, chain: tuple[StageSpec, ...]) -> list[StageSpec]:
    """The stages whose output this one reads: the last training stage before it (bench: all)."""
    before = list(chain[: chain.index(spec)])
    if spec.kind == "bench":
        return before
    return [s for s in before if s.kind == "train"][-1:]


def _finish_stage(
    ctx: Context, spec: StageSpec, key: str, result: rundir.StageResult, seconds: float
) -> None:
    report = {
        "stage": spec.name,
        "key": key,
        "seconds": round(seconds, 1),
        "settings": stage_settings(ctx.recipe, spec),
        "quality": result.quality,
        **result.report,
    }
    rundir.finish(ctx.work_dir, ctx.run_dir / spec.folder, key, result.artifacts, report)
    rundir.write_manifest(ctx.run_dir, stages.folders())


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
    """What build.json holds: a run folder serves one profile and teacher (a served teacher's URL
    without credentials)."""
    teacher = recipe.teacher.source
    if teacher.startswith(("http://", "https://")):
        teacher = models.public_url(teacher)
    # The device measures the build; it does not change what is built.
    profile_fields = profile.model_dump(mode="json", exclude={"device"})
    return {"profile": profile_fields, "teacher": teacher}


def stage_keys(
    profile: Profile, recipe: Recipe, chain: tuple[StageSpec, ...], teacher: models.ModelSource
) -> dict[str, str]:
    """Each stage's key: a hash of its settings, the build, the data, the teacher and its inputs'
    keys."""
    teacher_key = models.teacher_key(recipe.teacher, teacher)
    base = settings_hash(
        build_identity(profile, recipe), recipe.data, data.HELDOUT_RULE, teacher_key
    )
    keys: dict[str, str] = {}
    for spec in chain:
        upstream = [keys[s.name] for s in inputs_of(spec, chain)]
        # A bench on a device is keyed with it (left out when none, so older keys hold).
        device = [profile.device] if spec.kind == "bench" and profile.device else []
        keys[spec.name] = settings_hash(
            spec.name, stage_settings(recipe, spec), base, *upstream, *device
        )
    return keys


def pending_stages(
    profile: Profile, recipe: Recipe, run_dir: Path, names: list[str], teacher
) -> list[str]:
    """The stages of `names` a build would run now: those with no finished folder of their key."""
    keys = stage_keys(profile, recipe, build_chain(profile, recipe, names), teacher)
    return [
        s
        for s in names
        if (done := rundir.read_done(run_dir / stages.get(s).folder)) is None
        or done["key"] != keys[s]
    ]


@contextlib.contextmanager
def claim(run_dir: Path) -> Iterator[None]:
    """Hold the run folder for this build: the main process takes its lock (`rundir.lock`)."""
    if PartialState(cpu=not on_gpu()).is_main_process:
        with rundir.lock(run_dir):
            yield
    else:
        yield


@contextlib.contextmanager
def library_log(log: Path, header: str, verbose: bool) -> Iterator[None]:
    """The libraries' messages into `log` (the main process's; with --verbose, on the terminal)."""
    if verbose or not PartialState(cpu=not on_gpu()).is_main_process:
        yield
        return
    if log.is_symlink():
        raise EdgekdError(rundir.link_message(log))
    with library_output(log, header):
        yield


def _prepare_work_dir(ctx: Context, spec: StageSpec, key: str) -> None:
    ctx.work_dir, ctx.stage_key = rundir.partial_dir(ctx.run_dir, spec.folder), key
    if ctx.is_main:
        rundir.prepare_partial(ctx.work_dir, key)
    ctx.barrier()


def build(
    profile: Profile,
    recipe: Recipe,
    run_dir: Path,
    names: list[str],
    *,
    force: bool = False,
    verbose: bool = False,
) -> dict[str, str]:
    """Run the stages `names` in order, after checking that the stages they read from are built;
    returns each stage's outcome ('ran' or 'up to date'). The libraries' messages go to each
    stage's log, or to the terminal when `verbose`."""
    # The process state first: under `accelerate launch` on CPUs it sets torch's thread count,
    # which the effective eval threads default to.
    state = PartialState(cpu=not on_gpu())
    effective = resolve(profile, recipe, names)
    ctx = Context(run_dir=run_dir, profile=profile, recipe=recipe, effective=effective, state=state)
    # The other processes look only once the main one has written build.json (atomically, through
    # a temporary file they would otherwise take for a foreign one).
    folders = list(stages.folders().values())
    with ctx.state.main_process_first():
        if ctx.is_main:  # before anything is deleted or written through a link
            rundir.refuse_links(run_dir, folders)
        rundir.check_run_dir(run_dir, build_identity(profile, recipe), force, ctx.is_main, folders)
        if ctx.is_main:
            rundir.remove_temporaries(run_dir)
            rundir.check_finished(run_dir, folders, force)
    chain = effective.chain
    needed = {dep.name for s in names for dep in inputs_of(stages.get(s), chain)}
    keys = stage_keys(profile, recipe, chain, ctx.teacher_source)
    for spec in chain:  # before any stage runs: a missing input must not cost a stage's work
        done = rundir.read_done(run_dir / spec.folder)
        missing = done is None or done["key"] != keys[spec.name]
        if spec.name in needed and spec.name not in names and missing:
            readers = [s for s in names if spec in inputs_of(stages.get(s), chain)]
            raise EdgekdError(
                f"stage '{spec.name}' must be built first with these settings, before "
                f"{', '.join(readers)}; add it to --stages"
            )
    outcome: dict[str, str] = {}
    for spec in chain:
        stage, key = spec.name, keys[spec.name]
        final = run_dir / spec.folder
        done = rundir.read_done(final)
        if stage not in names:
            if done is not None:
                ctx.stage_dirs[stage] = final
            continue
        if done is not None and done["key"] == key:
            console.print(f"[green]{stage}[/]: up to date ({final}), skipped")
            ctx.stage_dirs[stage] = final
            outcome[stage] = "up to date"
            continue
        _prepare_work_dir(ctx, spec, key)
        ctx.stage_dirs[stage] = ctx.work_dir
        console.print(f"[bold]{stage}[/]: running in {ctx.work_dir}")
        start = time.perf_counter()
        if ctx.is_main or not spec.main_only:
            with library_log(ctx.work_dir / rundir.STAGE_LOG, stage, verbose):
                result = spec.run(ctx, getattr(recipe, stage))
        if ctx.is_main:
            _finish_stage(ctx, spec, key, result, time.perf_counter() - start)
            console.print(quality_table(f"{stage}: held-out quality", result.quality))
        ctx.barrier()
        ctx.stage_dirs[stage] = final
        outcome[stage] = "ran"
    if all(v == "up to date" for v in outcome.values()):
        console.print("Nothing to do: every requested stage is up to date.")
    if ctx.is_main:
        # A kill between a .done and the manifest left it behind.
        rundir.write_manifest(run_dir, stages.folders())
        report, html_path = summary.write(run_dir)
        summary.print_summary(report, console, html_path)
        if not verbose and "ran" in outcome.values():
            console.print(
                f"The libraries' own messages: {run_dir / rundir.BUILD_LOG} and each stage's "
                f"{rundir.STAGE_LOG} (--verbose shows them here)",
                style="dim",
                highlight=False,
                soft_wrap=True,
            )
    return outcome
