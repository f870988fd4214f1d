"""Integrity of a finished run: every artifact in manifest.json, re-hashed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgekd import atomic
from edgekd.errors import EdgekdError
from edgekd.rundir import MANIFEST


@dataclass(frozen=True)
class Finding:
    """One artifact that does not match the manifest: 'missing', 'differs' or 'size differs'."""

    path: str
    problem: str


def verify(run_dir: Path) -> tuple[int, list[Finding]]:
    """Re-hash every artifact listed in `run_dir`/manifest.json; returns how many were checked
    and those that are missing or differ."""
    run_dir = Path(run_dir)
    manifest = run_dir / MANIFEST
    try:
        stages = json.loads(manifest.read_text())["stages"]
    except FileNotFoundError:
        raise EdgekdError(f"{manifest} does not exist; pass the run folder of a build") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise EdgekdError(
            f"{manifest} is not an edgekd manifest ({err}); it cannot be trusted"
        ) from err
    checked, findings = 0, []
    for stage in stages.values():
        for name, meta in stage["artifacts"].items():
            checked += 1
            path = run_dir / name
            if not path.is_file():
                findings.append(Finding(name, "missing"))
            elif path.stat().st_size != meta["bytes"]:
                findings.append(Finding(name, "size differs"))
            elif atomic.sha256_file(path) != meta["sha256"]:
                findings.append(Finding(name, "differs"))
    return checked, findings
