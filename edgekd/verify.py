"""Integrity of a finished run: every artifact in manifest.json, re-hashed; links, paths out of the
run and files the manifest does not list, named."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from edgekd import atomic, logit_cache, stages
from edgekd.errors import EdgekdError
from edgekd.rundir import CACHE, DONE, MANIFEST

UNLISTED = "not in the manifest"


@dataclass(frozen=True)
class Finding:
    """One artifact that does not match the manifest ('missing', 'differs', 'size differs',
    'symbolic link ...'), or a file of a stage folder that the manifest does not list."""

    path: str
    problem: str


def verify(run_dir: Path) -> tuple[int, list[Finding]]:
    """Re-hash every artifact listed in `run_dir`/manifest.json; returns how many were checked
    and the findings: artifacts missing, different or reached through a link, and files in the
    stage folders that the manifest does not list."""
    run_dir = Path(run_dir)
    manifest = run_dir / MANIFEST
    if _is_cache(manifest):
        return _verify_cache(run_dir, "")
    try:
        stage_list = json.loads(manifest.read_text())["stages"]
        listed = {name: meta for s in stage_list.values() for name, meta in s["artifacts"].items()}
    except FileNotFoundError:
        raise EdgekdError(f"{manifest} does not exist; pass the run folder of a build") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        raise EdgekdError(
            f"{manifest} is not an edgekd manifest ({err}); it cannot be trusted"
        ) from err
    for name in listed:
        parts = PurePosixPath(name).parts
        if PurePosixPath(name).is_absolute() or ".." in parts or not parts:
            raise EdgekdError(
                f"{manifest} lists {name!r}, a path that is not inside the run folder; edgekd "
                "writes no such path, so the manifest cannot be trusted"
            )
    checked, findings = 0, []
    for name, meta in listed.items():
        checked += 1
        path = run_dir / name
        if (link := _link_on(run_dir, name)) is not None:
            outside = not path.resolve().is_relative_to(run_dir.resolve())
            where = ", resolves outside the run folder" if outside else ""
            findings.append(Finding(name, f"symbolic link ({link} -> {os.readlink(link)}){where}"))
        elif not path.is_file():
            findings.append(Finding(name, "missing"))
        elif path.stat().st_size != meta["bytes"]:
            findings.append(Finding(name, "size differs"))
        elif atomic.sha256_file(path) != meta["sha256"]:
            findings.append(Finding(name, "differs"))
    folders = {PurePosixPath(name).parts[0] for name in listed} | set(stages.folders().values())
    for folder in sorted(folders):
        findings += [Finding(f, UNLISTED) for f in _files(run_dir, folder) if f not in listed]
    for cache in sorted((run_dir / CACHE).glob(f"*/{logit_cache.CACHE_MANIFEST}")):
        n, found = _verify_cache(cache.parent, f"{CACHE}/{cache.parent.name}/")
        checked += n
        findings += found
    return checked, findings


def _is_cache(manifest: Path) -> bool:
    """A logit cache folder's manifest (edgekd teacher-cache) rather than a run's."""
    try:
        return "shards" in json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False


def _verify_cache(folder: Path, prefix: str) -> tuple[int, list[Finding]]:
    """A logit cache's shards against its manifest, and shard files it does not list."""
    manifest = logit_cache.read_manifest(folder)
    findings = [Finding(prefix + name, problem) for name, problem in
                logit_cache.check_shards(folder, manifest)]  # fmt: skip
    listed = {s["file"] for s in manifest["shards"]}
    findings += [
        Finding(prefix + p.name, UNLISTED)
        for p in sorted(folder.glob("shard-*"))
        if p.name not in listed
    ]
    checked = len(manifest["shards"])
    reference = folder / logit_cache.REFERENCE_DIR
    if (reference / logit_cache.CACHE_MANIFEST).is_file():
        n, found = _verify_cache(reference, f"{prefix}{logit_cache.REFERENCE_DIR}/")
        checked, findings = checked + n, findings + found
    return checked, findings


def _link_on(run_dir: Path, name: str) -> Path | None:
    """The first symbolic link on the way from the run folder to `name`, if any."""
    path = run_dir
    for part in PurePosixPath(name).parts:
        path = path / part
        if path.is_symlink():
            return path
    return None


def _files(run_dir: Path, folder: str) -> list[str]:
    """Every file (and link) under a stage folder but its .done marker, relative to the run."""
    top = run_dir / folder
    if top.is_symlink() or not top.is_dir():
        return []
    found = []
    for parent, dirs, files in os.walk(top):
        rel = Path(parent).relative_to(run_dir)
        links = [d for d in dirs if os.path.islink(os.path.join(parent, d))]
        found += [(rel / f).as_posix() for f in [*files, *links] if f != DONE or parent != str(top)]
    return sorted(found)
