"""The run folder: what a build leaves on disk, and the rules that make it resumable.

    <run>/build.json            the build's identity (profile and teacher); one build per folder
    <run>/cache/                teacher answers and log-probs, keyed by what made them
    <run>/.<NN-name>.partial/   a stage while it runs (".key" holds its key; "checkpoint" resumes)
    <run>/<NN-name>/            a finished stage: its artifacts, report.json and, written last,
                                .done (its key and the artifacts' sizes and hashes)
    <run>/manifest.json         every finished stage's key and artifacts, for `edgekd verify`
    <run>/report.json, .html    the build report

A stage folder is renamed from `.partial` only when the stage succeeded, so a folder with a .done
marker is whole. The folder names ("NN-name") are declared by each stage's spec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edgekd import atomic
from edgekd.errors import EdgekdError

BUILD_FILE = "build.json"
MANIFEST = "manifest.json"
REPORT_JSON = "report.json"  # each stage's, and the build's
REPORT_HTML = "report.html"
DONE = ".done"
KEY = ".key"
CACHE = "cache"
# The training loop's resumable state inside a stage's partial folder; kept across a killed run.
CHECKPOINT = "checkpoint"


@dataclass
class StageResult:
    """What a stage hands back: its artifacts (paths inside its folder) and its report."""

    artifacts: list[str]
    report: dict = field(default_factory=dict)
    quality: dict[str, dict] = field(default_factory=dict)  # row name -> ppl/kld/top1/tokens


def partial_dir(run_dir: Path, folder: str) -> Path:
    """Where a stage whose finished folder is `folder` runs."""
    return run_dir / f".{folder}.partial"


def read_done(stage_dir: Path) -> dict | None:
    """A finished stage's marker ({"key", "artifacts"}), or None if the stage is not finished."""
    try:
        return json.loads((stage_dir / DONE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


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
                    if child.name != CACHE:
                        atomic.remove(child)
    elif run_dir.exists() and any(p.name != CACHE for p in run_dir.iterdir()) and not force:
        raise EdgekdError(
            f"{run_dir} is not empty and holds no edgekd build; pass --out for a new folder "
            "or --force to use it"
        )
    if is_main:
        atomic.write_json(path, identity)


def prepare_partial(work_dir: Path, key: str) -> None:
    """Reuse the training checkpoint a killed run of the same stage and key left; start clean
    otherwise. Anything else in a partial folder may have been cut short, so it goes."""
    held_key = work_dir / KEY
    if work_dir.exists() and (not held_key.exists() or held_key.read_text() != key):
        atomic.remove(work_dir)
    elif work_dir.exists():
        for child in work_dir.iterdir():
            if child.name not in (KEY, CHECKPOINT):
                atomic.remove(child)
    work_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(held_key, key)


def finish(work_dir: Path, final: Path, key: str, artifacts: list[str], report: dict) -> None:
    """Write the stage's report, hash its artifacts, rename its partial folder to `final` and
    mark it done (the marker last: a folder with one is whole)."""
    atomic.write_json(work_dir / REPORT_JSON, report)
    hashed = {}
    for name in [*artifacts, REPORT_JSON]:
        path = work_dir / name
        if not path.is_file():
            raise RuntimeError(
                f"stage {report['stage']} reported artifact {name} that it did not write"
            )
        hashed[name] = {"bytes": path.stat().st_size, "sha256": atomic.sha256_file(path)}
    (work_dir / KEY).unlink(missing_ok=True)
    atomic.remove(final)
    atomic.fsync_path(work_dir)
    work_dir.rename(final)
    atomic.write_json(final / DONE, {"key": key, "artifacts": hashed})


def write_manifest(run_dir: Path, folders: dict[str, str]) -> None:
    """manifest.json from the finished stages among `folders` (stage name -> folder name)."""
    stages = {}
    for stage, folder in folders.items():
        done = read_done(run_dir / folder)
        if done is not None:
            stages[stage] = {
                "key": done["key"],
                "artifacts": {f"{folder}/{name}": meta for name, meta in done["artifacts"].items()},
            }
    atomic.write_json(run_dir / MANIFEST, {"stages": stages})
