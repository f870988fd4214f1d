"""The machine's cache of a GGUF teacher's answers, shared by every build on this machine.

The run folder's `cache/` already keeps a corpus for resuming one build. A newcomer's second build
(another profile, another folder, the same default teacher) would answer the same prompts again;
this cache lets it copy them instead. An entry is keyed on what decides the answers: the
teacher file's bytes (its sha256, not its path: a reinstalled package moves it), llama.cpp's
version (another version may decode differently), the prompts and the generation settings.
"""

from __future__ import annotations

import os
from importlib.metadata import version
from pathlib import Path

from edgekd import data
from edgekd.atomic import sha256_file
from edgekd.config import settings_hash
from edgekd.console import console
from edgekd.errors import EdgekdError

ENV = "EDGEKD_CACHE"


def root() -> Path:
    """$EDGEKD_CACHE, else $XDG_CACHE_HOME/edgekd, else ~/.cache/edgekd."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgekd"


def entry(teacher_gguf: Path, prompts_fingerprint: str, generation: dict) -> Path:
    """Where the answers of this teacher file to these prompts, so generated, are kept."""
    key = settings_hash(
        sha256_file(teacher_gguf), version("llama_cpp_python"), prompts_fingerprint, generation
    )
    return root() / "answers" / f"{key[:24]}.jsonl"


def load(path: Path) -> list[dict] | None:
    """The cached rows, or None when there are none or the file cannot be read (then the
    teacher answers again, and says why)."""
    if not path.is_file():
        return None
    try:
        rows = data.read_jsonl(path)
    except (EdgekdError, OSError, UnicodeDecodeError) as e:
        console.print(
            f"answer cache: {path} is unreadable ({e}); the teacher answers again", soft_wrap=True
        )
        return None
    if not rows or not all("messages" in row for row in rows):
        console.print(
            f"answer cache: {path} holds no chat rows; the teacher answers again", soft_wrap=True
        )
        return None
    return rows


def store(path: Path, rows: list[dict]) -> None:
    """Keep the rows for later builds; a cache that cannot be written costs only the reuse."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data.write_jsonl_atomic(path, rows)
    except OSError as e:
        console.print(
            f"answer cache: could not write {path} ({e}); later builds answer again", soft_wrap=True
        )
