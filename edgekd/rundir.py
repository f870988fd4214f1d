"""The run folder: what a build leaves on disk, and the rules that make it resumable.

    <run>/build.json            the build's identity (profile and teacher); one build per folder
    <run>/cache/                teacher answers and log-probs, keyed by what made them
    <run>/.<NN-name>.partial/   a stage while it runs (".key" holds its key; "checkpoint" resumes)
    <run>/<NN-name>/            a finished stage: its artifacts, report.json and, written last,
                                .done (its key and the artifacts' sizes and hashes)
    <run>/manifest.json         every finished stage's key and artifacts, for `edgekd verify`
    <run>/report.json, .html    the build report
    <run>/.lock                 held (flock) by the build that runs in the folder; who holds it
    <run>/build.log             the libraries' own messages outside the stages (appended)

Each stage folder also keeps `log.txt`: the libraries' messages while the stage ran (warnings,
native code's and child processes' stderr), hashed with its artifacts when the stage finishes.

A stage folder is renamed from `.partial` only when the stage succeeded, so a folder with a .done
marker is whole. The folder names ("NN-name") are declared by each stage's spec. These names are all
edgekd owns in a run folder: it never deletes anything else there, and never writes, renames or
deletes through a symbolic link in its place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edgekd import atomic
from edgekd.console import console
from edgekd.errors import EdgekdError

BUILD_FILE = "build.json"
MANIFEST = "manifest.json"
REPORT_JSON = "report.json"  # each stage's, and the build's
REPORT_HTML = "report.html"
DONE = ".done"
KEY = ".key"
CACHE = "cache"
LOCK = ".lock"
# The training loop's resumable state inside a stage's partial folder; kept across a killed run.
CHECKPOINT = "checkpoint"
# Inside the checkpoint: its step, loss curve and the key of the stage that wrote it.
PROGRESS = "progress.json"
# The files a build writes at the top of its run folder (the stage folders come from the specs).
BUILD_LOG = "build.log"
STAGE_LOG = "log.txt"
OWN_FILES = (BUILD_FILE, MANIFEST, REPORT_JSON, REPORT_HTML, BUILD_LOG)


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


def command_line() -> str:
    """This process's command line, as a shell would take it back."""
    return shlex.join(sys.orig_argv)


@contextlib.contextmanager
def lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder for one build: an flock on `<run>/.lock`, which dies with the process
    (a killed build leaves no stale lock). A second build is refused, naming the holder."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise EdgekdError(f"--out {run_dir} is a file, not a folder; pass a folder for the run")
    path = run_dir / LOCK
    created = [d for d in (run_dir, *run_dir.parents) if not d.exists()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a link in the lock's place would make edgekd write where it points.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise EdgekdError(link_message(path)) from None
        raise EdgekdError(
            f"cannot write in {run_dir} ({err.strerror}); pass --out a folder you can write to"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EdgekdError(
                f"{run_dir} is in use by another edgekd build ({_holder(fd)}); wait for it to "
                "finish, or pass another --out"
            ) from None
        except OSError as err:  # a file system without locks (some network mounts)
            raise EdgekdError(
                f"cannot lock {path} ({err.strerror}); pass --out on a file system with file "
                "locks (a local disk)"
            ) from None
        os.ftruncate(fd, 0)
        holder = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.write(fd, json.dumps({**holder, "command": command_line()}).encode() + b"\n")
        yield
    finally:
        # A build refused before it wrote anything leaves no folder behind (its refusal was on
        # the terminal; the log holds at most the libraries' messages before it).
        if created and {p.name for p in run_dir.iterdir()} <= {LOCK, BUILD_LOG}:
            (run_dir / BUILD_LOG).unlink(missing_ok=True)
            path.unlink()
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()
        os.close(fd)  # releases the lock; the file stays, so no two builds lock two inodes


def _holder(fd: int) -> str:
    """Who holds the lock, from what it wrote in the lock file."""
    try:
        held = json.loads(os.pread(fd, 65536, 0))
        return f"pid {held['pid']}, started {held['started']}: {held['command']}"
    except (ValueError, KeyError, TypeError):  # it has the lock but has not written yet
        return "pid not yet written"


def link_message(link: Path) -> str:
    return (
        f"{link} is a symbolic link (to {os.readlink(link)}); edgekd never writes, renames or "
        "deletes through a link in its run folder: remove the link or pass another --out"
    )


def owned(run_dir: Path, folders: Iterable[str]) -> list[Path]:
    """What edgekd writes at the top of a run folder, given the stage folder names."""
    names = [*OWN_FILES, CACHE, LOCK]
    for folder in folders:
        names += [folder, partial_dir(run_dir, folder).name]
    return [run_dir / name for name in names]


def refuse_links(run_dir: Path, folders: Iterable[str]) -> None:
    """Refuse a symbolic link in the place of anything edgekd owns in the run folder, or inside
    its folders: writes, renames and deletes would go through it, out of the run."""
    for path in owned(Path(run_dir), folders):
        if path.is_symlink():
            raise EdgekdError(link_message(path))
        if path.is_dir():
            for parent, dirs, files in os.walk(path):
                for name in [*dirs, *files]:
                    if os.path.islink(os.path.join(parent, name)):
                        raise EdgekdError(link_message(Path(parent, name)))


def read_json(path: Path, what: str) -> dict:
    """A JSON object edgekd wrote; one line naming the file if it is not one."""
    try:
        held = json.loads(Path(path).read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        raise EdgekdError(f"{path} is not valid JSON ({err}); {what}") from None
    if not isinstance(held, dict):
        raise EdgekdError(f"{path} holds {type(held).__name__}, not a JSON object; {what}")
    return held


def check_run_dir(
    run_dir: Path, identity: dict, force: bool, is_main: bool, folders: Iterable[str]
) -> None:
    """Refuse a folder that holds a different build, unless --force; with it, remove only what
    edgekd wrote (`folders` are the stage folders' names) and say what stays."""
    path = run_dir / BUILD_FILE
    mine = {p.name for p in owned(run_dir, folders)}
    present = run_dir.iterdir() if run_dir.is_dir() else ()
    others = sorted(p.name for p in present if p.name not in mine and not _own_tmp(p))
    replace = "pass --out for a new folder or --force to replace it"
    if path.exists():
        try:
            held = read_json(path, f"edgekd cannot tell which build {run_dir} holds; {replace}")
        except EdgekdError:
            if not force:
                raise
            held = None
        if held != identity:
            if not force:
                diff = ", ".join(
                    f"{k}: {held.get(k)!r} there, {v!r} now"
                    for k, v in identity.items()
                    if held.get(k) != v
                )
                raise EdgekdError(f"{run_dir} holds a different build ({diff}); {replace}")
            if is_main:
                # The cache is keyed by what made each entry, so another build's is still right;
                # the log is appended to (this build's lines are already in it).
                for child in mine - {CACHE, LOCK, BUILD_LOG}:
                    atomic.remove(run_dir / child)
    elif others and not force:
        raise EdgekdError(
            f"{run_dir} is not empty and holds no edgekd build; pass --out for a new folder "
            "or --force to use it"
        )
    if force and others and is_main:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        console.print(
            f"--force: kept {len(others)} file{'s' * (len(others) > 1)} edgekd did not write: "
            f"{shown}",
            highlight=False,
        )
    if is_main:
        atomic.write_json(path, identity)


def _own_tmp(path: Path) -> bool:
    """A temporary of one of edgekd's files, left by a killed writer."""
    return any(path.name.startswith(f".{name}{atomic.TMP_MARK}") for name in OWN_FILES)


def remove_temporaries(run_dir: Path) -> None:
    """Remove what killed writers left: temporaries of edgekd's files in the run folder, and any
    in the cache (all of it is edgekd's)."""
    for child in run_dir.glob(f".*{atomic.TMP_MARK}*"):
        if _own_tmp(child):
            atomic.remove(child)
    atomic.remove_temporaries(run_dir / CACHE)


# Below this much free space, a failure to write is taken for the disk: torch.save, for one, says
# only "unexpected pos" when it runs out of space.
LOW_DISK_BYTES = 16 << 20
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28")


@contextlib.contextmanager
def disk_full_as_error(run_dir: Path) -> Iterator[None]:
    """Turn a disk that fills during the build into one line: the disk, and that a rerun resumes
    (nothing cut short was marked done)."""
    try:
        yield
    except EdgekdError:
        raise
    except Exception as err:
        free = _free_bytes(run_dir)
        if not (_says_full(err) or free < LOW_DISK_BYTES):
            raise
        said = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        raise EdgekdError(
            f"disk full: writing in {run_dir} failed ({said}); {free / 2**20:.0f} MB free on its "
            "file system. Free some space and run the same command again: it resumes from what "
            "is finished"
        ) from err


def _says_full(err: BaseException | None) -> bool:
    """The error, or one it was raised from or while handling, is the disk being full."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
            return True
        if any(text in str(err) for text in _FULL_TEXTS):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _free_bytes(run_dir: Path) -> int:
    try:
        return shutil.disk_usage(run_dir).free
    except OSError:
        return LOW_DISK_BYTES  # cannot tell: not taken for a full disk


def prepare_partial(work_dir: Path, key: str) -> None:
    """Reuse the training checkpoint (and the log) a killed run of the same stage and key left;
    start clean otherwise. Anything else in a partial folder may have been cut short, so it
    goes."""
    held_key = work_dir / KEY
    if work_dir.exists() and (not held_key.exists() or held_key.read_text() != key):
        atomic.remove(work_dir)
    elif work_dir.exists():
        for child in work_dir.iterdir():
            if child.name not in (KEY, CHECKPOINT, STAGE_LOG):
                atomic.remove(child)
    work_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(held_key, key)


def check_finished(run_dir: Path, folders: Iterable[str], force: bool) -> None:
    """A finished stage's report.json is read by the build report: one that is not JSON means the
    folder was changed after it finished. Refused; with --force the stage is removed, to run
    again."""
    for folder in folders:
        stage_dir = run_dir / folder
        if read_done(stage_dir) is None or not (stage_dir / REPORT_JSON).exists():
            continue
        try:
            read_json(
                stage_dir / REPORT_JSON,
                f"{folder} was changed after it finished; pass --force to build it again",
            )
        except EdgekdError as err:
            if not force:
                raise
            console.print(f"--force: {err}; removed {folder}, which runs again", highlight=False)
            atomic.remove(stage_dir)


def finish(work_dir: Path, final: Path, key: str, artifacts: list[str], report: dict) -> None:
    """Write the stage's report, hash its artifacts, rename its partial folder to `final` and
    mark it done (the marker last: a folder with one is whole)."""
    atomic.write_json(work_dir / REPORT_JSON, report)
    hashed = {}
    logged = [STAGE_LOG] if (work_dir / STAGE_LOG).is_file() else []
    for name in [*artifacts, REPORT_JSON, *logged]:
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
