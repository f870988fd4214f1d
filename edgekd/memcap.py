"""Run a child process confined to a memory cap and say what it used: the profile's memory budget
made a fact on the host, not an estimate.

Where it can, the child runs in a memory cgroup of its own: the cgroup file system directly when
this process may write it (root; cgroup v1's memory controller or the v2 unified hierarchy), else
a transient systemd scope (`systemd-run --scope -p MemoryMax=`) where systemd runs the machine.
The kernel kills the child if resident memory plus the page cache it charged cannot be kept under
the cap; the peak is the cgroup's own. Where no cap can be set, `cap_method` says why and the
caller keeps the estimate, labelled as one.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
_V1 = CGROUP / "memory"
_names = itertools.count()


@dataclass(frozen=True)
class Capped:
    """How a capped child ended."""

    method: str  # "cgroup v1", "cgroup v2" or "systemd-run scope"
    cap_bytes: int
    peak_bytes: int | None  # the cgroup's peak usage; None where the cgroup is gone unread
    killed: bool  # by the kernel's out-of-memory killer at the cap
    returncode: int
    stdout: str
    stderr: str


def _writable(folder: Path, *files: str) -> bool:
    return os.access(folder, os.W_OK) and all((folder / f).exists() for f in files)


def _own_v2_cgroup() -> Path | None:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return CGROUP / line[3:].lstrip("/")
    except OSError:
        pass
    return None


def cap_method() -> tuple[str | None, str]:
    """The way this host can cap a child's memory, or None and why not."""
    if _writable(_V1, "memory.limit_in_bytes", "cgroup.procs"):
        return "cgroup v1", f"{_V1} (memory controller)"
    own = _own_v2_cgroup()
    if (CGROUP / "cgroup.controllers").is_file() and own is not None and _writable(own):
        return "cgroup v2", str(own)
    if shutil.which("systemd-run") and Path("/run/systemd/system").is_dir():
        return "systemd-run scope", "systemd-run --scope -p MemoryMax="
    why = "no writable memory cgroup (not root?)"
    if shutil.which("systemd-run"):
        why += ", and systemd-run cannot start a scope: systemd does not run this machine"
    return None, why


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _events(path: Path) -> dict[str, int]:
    try:
        pairs = (line.split() for line in path.read_text().splitlines())
        return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].isdigit()}
    except OSError:
        return {}


def _start(argv: list[str], procs: Path | None, env: dict | None) -> subprocess.Popen:
    """The child, moved into the cgroup (its `procs` file) before it runs `argv`."""
    if procs is not None:  # the shell joins the cgroup, then becomes the child: no untracked fork
        argv = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(procs), *argv]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _cgroup(method: str) -> tuple[Path, str, str, str]:
    """A new cgroup: its folder, then its limit, peak and events files."""
    if method == "cgroup v1":
        folder = _V1 / f"edgekd-{os.getpid()}-{next(_names)}"
        return folder, "memory.limit_in_bytes", "memory.max_usage_in_bytes", "memory.oom_control"
    own = _own_v2_cgroup()
    assert own is not None
    # A v2 cgroup with processes cannot hand controllers down: the child is a sibling of ours.
    parent = own.parent if own != CGROUP else own
    control = parent / "cgroup.subtree_control"
    if "memory" not in control.read_text().split():
        control.write_text("+memory")
    folder = parent / f"edgekd-{os.getpid()}-{next(_names)}"
    return folder, "memory.max", "memory.peak", "memory.events"


def run_capped(argv: list[str], cap_bytes: int, env: dict | None = None) -> Capped:
    """Run `argv` under a memory cap of `cap_bytes` and wait for it. Raises OSError where no cap
    can be set (see `cap_method`)."""
    method, why = cap_method()
    if method is None:
        raise OSError(why)
    if method == "systemd-run scope":
        scope = ["systemd-run", "--scope", "--quiet", *([] if os.geteuid() == 0 else ["--user"])]
        props = ["-p", f"MemoryMax={cap_bytes}", "-p", "MemorySwapMax=0"]
        proc = _start([*scope, *props, "--", *argv], None, env)
        out, err = proc.communicate()
        killed = proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)
        # The scope goes with the child: its peak is gone; a kill happened at the cap.
        peak = cap_bytes if killed else None
        return Capped(method, cap_bytes, peak, killed, proc.returncode, out, err)
    folder, limit, peak_file, events = _cgroup(method)
    folder.mkdir()
    try:
        (folder / limit).write_text(str(cap_bytes))
        swap = "memory.memsw.limit_in_bytes" if method == "cgroup v1" else "memory.swap.max"
        if (folder / swap).exists():  # no swapping out of the cap
            (folder / swap).write_text(str(cap_bytes) if method == "cgroup v1" else "0")
        proc = _start(argv, folder / "cgroup.procs", env)
        out, err = proc.communicate()
        peak = _read_int(folder / peak_file)
        oom = _events(folder / events).get("oom_kill", 0)
        failed = _read_int(folder / "memory.failcnt") if method == "cgroup v1" else None
        killed = proc.returncode == -signal.SIGKILL and (oom > 0 or bool(failed))
        return Capped(method, cap_bytes, peak, killed, proc.returncode, out, err)
    finally:
        folder.rmdir()


def drop_page_cache(files: list[Path]) -> None:
    """Ask the kernel to forget the files' cached pages, so that the capped child reads them in
    itself and they count against its cap (pages another process maps stay)."""
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
