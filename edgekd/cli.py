"""The edgekd command line: a thin typer app over config, plan and pipeline."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.table import Table

from edgekd.config import known_profiles, load_profile, load_recipe
from edgekd.console import console, err, show_library_warning
from edgekd.errors import EdgekdError, EdgekdWarning

if not sys.stderr.isatty():
    # transformers' GGUF loader draws a tqdm bar that fills a log file with carriage returns.
    os.environ.setdefault("TQDM_DISABLE", "1")


def _show_edgekd_warning(message, category, filename, lineno, file=None, line=None):
    """edgekd's own guidance as one line on the terminal, like its errors; a library's warning as
    Python shows it, into the build's log while one is open (edgekd's source location and line
    mean nothing to the user)."""
    if issubclass(category, EdgekdWarning):
        err().print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
    else:
        show_library_warning(message, category, filename, lineno, file, line)


warnings.showwarning = _show_edgekd_warning

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
profiles_app = typer.Typer(no_args_is_help=True, help="Device profiles.")
app.add_typer(profiles_app, name="profiles")


def _fail(error: EdgekdError) -> None:
    err().print(f"[red]error:[/] {error}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def build(
    profile: Annotated[str, typer.Option(help="profile name or path to a profile YAML")],
    recipe: Annotated[Path | None, typer.Option(help="recipe YAML overriding the default")] = None,
    teacher: Annotated[
        str | None, typer.Option(help="'embedded', HF folder, hub id or .gguf file")
    ] = None,
    data: Annotated[str | None, typer.Option(help="jsonl, text file/folder or dataset")] = None,
    out: Annotated[Path | None, typer.Option(help="run folder [default: export/<profile>]")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override, e.g. distill.kd.temperature=4")
    ] = None,
    stages: Annotated[str | None, typer.Option(help="comma-separated subset, e.g. distill")] = None,
    dry_run: Annotated[bool, typer.Option(help="print the plan and stop")] = False,
    force: Annotated[bool, typer.Option(help="replace a different build in --out")] = False,
    allow_pickle: Annotated[
        bool, typer.Option(help="accept pickle weights (.bin/.pt) for teacher and student")
    ] = False,
    verbose: Annotated[
        bool, typer.Option(help="show the libraries' own messages here, not in the run's logs")
    ] = False,
) -> None:
    """Distill, recover, export and benchmark a student for a device profile."""
    from edgekd import pipeline
    from edgekd.plan import fit_error, make_plan

    try:
        prof = load_profile(profile)
        trust = ["teacher.allow_pickle=true", "student.allow_pickle=true"] if allow_pickle else []
        rec = load_recipe(recipe, [*trust, *(set_ or [])], teacher=teacher, data=data)
        chosen = pipeline.select_stages(stages.split(",") if stages else None, prof, rec)
        plan = make_plan(prof, rec, chosen, timing=dry_run, strict=not dry_run)
        if dry_run:
            for line in plan.lines(prof):
                console.print(line, highlight=False, soft_wrap=True)
            if not plan.fits:
                raise fit_error(plan, prof)
            return
        from edgekd.preflight import preflight
        from edgekd.rundir import BUILD_LOG, command_line, disk_full_as_error

        run_dir = out or Path("export") / prof.name
        with (
            disk_full_as_error(run_dir),
            pipeline.claim(run_dir),
            pipeline.library_log(run_dir / BUILD_LOG, command_line(), verbose),
        ):
            preflight(prof, rec, plan, run_dir)
            pipeline.build(prof, rec, run_dir, chosen, force=force, verbose=verbose)
    except EdgekdError as e:
        _fail(e)
    except KeyboardInterrupt:
        from edgekd.rundir import command_line

        # A stage cut short stays in its partial folder, unmarked; the rerun resumes from there.
        err().print(
            "[yellow]stopped:[/] the build was interrupted (SIGINT); nothing unfinished is marked "
            f"done. Run the same command to resume: {command_line()}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(130) from None


@app.command("teacher-cache")
def teacher_cache(
    teacher: Annotated[str, typer.Option(help="http(s)://host:port/v1, .gguf, folder or hub id")],
    out: Annotated[Path, typer.Option(help="the cache folder to write (shards + manifest)")],
    data: Annotated[str | None, typer.Option(help="jsonl, text file/folder or dataset")] = None,
    recipe: Annotated[Path | None, typer.Option(help="recipe YAML overriding the default")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override, e.g. teacher.model=NAME")
    ] = None,
) -> None:
    """Write the teacher's top-k logit cache for a corpus, to copy to the machine that trains:
    `edgekd build --data OUT/corpus.jsonl --set logit_cache.path=OUT` uses it."""
    from edgekd.teacher_cache import write_cache

    try:
        rec = load_recipe(recipe, set_ or [], teacher=teacher, data=data)
        write_cache(rec, out)
    except EdgekdError as e:
        _fail(e)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a build's run folder")]) -> None:
    """Print a build's summary again: verdict, speed, memory and accuracy."""
    from edgekd.report import summary
    from edgekd.rundir import BUILD_FILE, REPORT_HTML

    try:
        if not (run_dir / BUILD_FILE).is_file():
            raise EdgekdError(f"{run_dir} holds no edgekd build (no build.json); pass a run folder")
        html = run_dir / REPORT_HTML
        summary.print_summary(summary.gather(run_dir), console, html if html.is_file() else None)
    except EdgekdError as e:
        _fail(e)


@app.command()
def verify(run_dir: Annotated[Path, typer.Argument(help="a build's run folder")]) -> None:
    """Re-hash every artifact against manifest.json; exit 1 if any is missing, differs or is a
    link, or if a stage folder holds a file the manifest does not list."""
    from edgekd.verify import UNLISTED
    from edgekd.verify import verify as verify_run

    try:
        checked, findings = verify_run(run_dir)
    except EdgekdError as e:
        _fail(e)
    for f in findings:
        console.print(f"{f.problem}: {f.path}", highlight=False, soft_wrap=True)
    manifest = run_dir / "manifest.json"
    if findings:
        bad = sum(f.problem != UNLISTED for f in findings)
        extra = len(findings) - bad
        console.print(
            f"{bad} of {checked} artifacts do not match {manifest}"
            + (f"; {extra} files in its stage folders are not in it" if extra else ""),
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)
    console.print(f"all {checked} artifacts match {manifest}")


@app.command()
def bench(
    artifact: Annotated[
        Path, typer.Argument(help="a .gguf file, an ONNX export folder or a build's run folder")
    ],
    profile: Annotated[str, typer.Option(help="profile name or path to a profile YAML")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override, e.g. bench.runs=3")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="also write the report to this file")
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(help="also measure it on this device: ssh://user@host[:port] (or an alias)"),
    ] = None,
) -> None:
    """Benchmark one GGUF or ONNX artifact against a device profile, on this host and, with
    --device or the profile's device:, on the device over SSH."""
    from functools import partial

    from edgekd import atomic
    from edgekd.benchmark import bench_file
    from edgekd.config import with_device
    from edgekd.report.summary import device_faults, print_bench

    try:
        if not artifact.exists():
            raise EdgekdError(
                f"{artifact} does not exist; pass a .gguf file, an ONNX folder or a run folder"
            )
        prof = with_device(load_profile(profile), device)
        rec = load_recipe(None, set_ or [])
        what = _shipped_artifacts(artifact) if (artifact / "build.json").is_file() else artifact
        on_device = None
        if prof.device is not None:
            from edgekd.device import bench_on_device

            on_device = partial(bench_on_device, prof.device, profile=prof, settings=rec.bench)
        result = bench_file(what, prof, rec.bench, on_device)
    except EdgekdError as e:
        _fail(e)
    print_bench(result, console)
    if json_out is not None:
        atomic.write_json(json_out, result)
    faults = device_faults(result)
    if faults:  # the host's numbers stand; the device's are missing, and the exit code says so
        _fail(EdgekdError("; ".join(faults)))


def _shipped_artifacts(run_dir: Path) -> list:
    """The device artifacts a finished build shipped, as its export stages list them."""
    from edgekd import stages
    from edgekd.benchmark import export_artifacts
    from edgekd.rundir import read_done

    done = {s.name: run_dir / s.folder for s in stages.SPECS if read_done(run_dir / s.folder)}
    exports = [s for s in stages.SPECS if s.kind == "export" and s.name in done]
    found = [a for a in export_artifacts(exports, done) if a.shipped]
    if not found:
        raise EdgekdError(f"{run_dir} holds no finished export stage: nothing to benchmark")
    return found


@app.command("eval")
def eval_(
    artifact: Annotated[
        Path, typer.Argument(help="a build's run folder, a .gguf file, an ONNX or model folder")
    ],
    tasks: Annotated[
        str, typer.Option(help="comma-separated lm-evaluation-harness tasks, e.g. edgekd_choice")
    ],
    limit: Annotated[int | None, typer.Option(help="questions per task [default: all]")] = None,
    fewshot: Annotated[
        int | None, typer.Option(help="examples before each question [default: the task's]")
    ] = None,
    chat_template: Annotated[
        bool, typer.Option(help="prompts through each model's own chat template")
    ] = False,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override, e.g. eval.threads=4")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="also write the scores to this file")
    ] = None,
) -> None:
    """Score one artifact, or a build's teacher and every artifact, on lm-evaluation-harness
    tasks, each in its own runtime; a build's artifacts with their share of the teacher's."""
    from edgekd import atomic, build_artifacts, harness
    from edgekd.report.summary import task_table

    try:
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        harness.check_tasks(names, limit=limit, fewshot=fewshot)
        rec = load_recipe(None, set_ or [])
        found = build_artifacts.find(artifact)
        threads = rec.eval.threads or os.cpu_count() or 1
        rows = harness.score_artifacts(
            found,
            names,
            limit=limit,
            fewshot=fewshot,
            threads=threads,
            chat_template=chat_template,
            say=console.print,
        )
    except EdgekdError as e:
        _fail(e)
    console.print(task_table(rows))
    if json_out is not None:
        atomic.write_json(
            json_out,
            {
                "tasks": names,
                "limit": limit,
                "fewshot": fewshot,
                "chat_template": chat_template,
                "artifacts": rows,
            },
        )


@profiles_app.command("list")
def profiles_list() -> None:
    """The shipped device profiles."""
    table = Table()
    for col in ("name", "RAM", "budget", "threads", "bandwidth", "context", "description"):
        table.add_column(col)
    for name in sorted(known_profiles()):
        p = load_profile(name)
        table.add_row(
            name,
            f"{p.ram_mb} MB",
            f"{p.memory_budget_mb} MB",
            str(p.threads),
            f"{p.memory_bandwidth_gbs:g} GB/s",
            str(p.context_length),
            p.description,
        )
    console.print(table)


@profiles_app.command("show")
def profiles_show(name: str) -> None:
    """One profile, as YAML."""
    try:
        p = load_profile(name)
    except EdgekdError as e:
        _fail(e)
    sys.stdout.write(yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
