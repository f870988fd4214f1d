"""The terminal every part of edgekd prints to, and what reaches it.

One rich Console, so that the pipeline, the stages, the teacher's data and the command line share
its settings (width, colour, capture in tests). Libraries write their own notices (warnings,
deprecations, TorchScript tracer warnings, onnxruntime's opset notices, a child process's stderr):
while a build runs they go to a log file (`library_output`), and only edgekd's own lines reach
the terminal. It imports nothing of edgekd.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console()

# While library output goes to a log: the terminal's stderr (for edgekd's own lines) and the log.
_terminal_err: IO[str] | None = None
_library_log: IO[str] | None = None
_show_warning = warnings.showwarning

# Without a terminal a progress bar draws nothing until it ends; a line this often instead.
PLAIN_PROGRESS_SECONDS = 30.0


def err() -> Console:
    """A console on the terminal's stderr, for edgekd's error and warning lines."""
    return Console(file=_terminal_err or sys.stderr)


def show_library_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library's warning as Python shows it, into the log while one is open."""
    _show_warning(message, category, filename, lineno, file or _library_log, line)


@contextlib.contextmanager
def library_output(log: Path, header: str) -> Iterator[None]:
    """Send everything written to stderr (by Python, native code and child processes) to `log`,
    appended under `header`; edgekd's own lines (`err`) still reach the terminal."""
    global _terminal_err, _library_log
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
    saved = os.dup(2)
    outer = (_terminal_err, _library_log)
    terminal = _terminal_err or os.fdopen(os.dup(saved), "w", buffering=1)
    library_log = os.fdopen(os.dup(fd), "w", buffering=1)
    library_log.write(f"--- {header} ({time.strftime('%Y-%m-%d %H:%M:%S')}) ---\n")
    os.dup2(fd, 2)
    os.close(fd)
    _terminal_err, _library_log = terminal, library_log
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        library_log.close()
        if outer[0] is None:
            terminal.close()
        _terminal_err, _library_log = outer


@contextlib.contextmanager
def progress(description: str, total: int) -> Iterator[Callable[..., None]]:
    """A progress bar for `total` items; yields `advance(n=1)`. Without a terminal (a log file, a
    CI job) one plain line every PLAIN_PROGRESS_SECONDS and at the end."""
    if console.is_terminal:
        bar = Progress(
            TextColumn(description),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            redirect_stderr=False,  # a library's stderr belongs to the log, not the bar
            transient=False,
        )
        with bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)
        return
    start = last = time.monotonic()
    done = 0

    def line() -> None:
        elapsed = time.monotonic() - start
        rate = done / elapsed if elapsed > 0 else 0.0
        left = ""
        if 0 < done < total:
            seconds = (total - done) / rate
            left = f", {seconds:.0f} s left" if seconds < 90 else f", {seconds / 60:.0f} min left"
        console.print(
            f"{description}: {done}/{total} ({rate:.2f}/s{left})", highlight=False, soft_wrap=True
        )

    def advance(n: int = 1) -> None:
        nonlocal done, last
        done += n
        if time.monotonic() - last >= PLAIN_PROGRESS_SECONDS and done < total:
            last = time.monotonic()
            line()

    yield advance
    line()
