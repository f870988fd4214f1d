"""edgekd verify: every artifact of the manifest re-hashed; differences named, exit code 1."""

import json

import pytest
from typer.testing import CliRunner

from edgekd import atomic
from edgekd.cli import app
from edgekd.errors import EdgekdError
from edgekd.verify import Finding, verify


@pytest.fixture
def run(tmp_path):
    """A run folder with a manifest of three artifacts, as the pipeline writes it."""
    run = tmp_path / "run"
    artifacts = {}
    for name, body in (
        ("01-distill/a.bin", b"a" * 10),
        ("01-distill/m/b.json", b"{}"),
        ("04-x/c", b"c"),
    ):
        path = run / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        artifacts[name] = {"bytes": len(body), "sha256": atomic.sha256_file(path)}
    manifest = {"stages": {"distill": {"key": "k", "artifacts": artifacts}}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def test_intact_run_verifies(run):
    assert verify(run) == (3, [])
    out = CliRunner().invoke(app, ["verify", str(run)])
    assert out.exit_code == 0 and "all 3 artifacts match" in out.output


def test_changed_and_missing_artifacts_are_named(run):
    (run / "01-distill/a.bin").write_bytes(b"b" * 10)  # same size, other bytes
    (run / "01-distill/m/b.json").write_bytes(b"{ }")
    (run / "04-x/c").unlink()
    assert verify(run) == (
        3,
        [
            Finding("01-distill/a.bin", "differs"),
            Finding("01-distill/m/b.json", "size differs"),
            Finding("04-x/c", "missing"),
        ],
    )
    out = CliRunner().invoke(app, ["verify", str(run)])
    assert out.exit_code == 1
    assert "differs: 01-distill/a.bin" in out.output and "missing: 04-x/c" in out.output
    assert "3 of 3 artifacts do not match" in out.output


def test_missing_or_broken_manifest(tmp_path, run):
    with pytest.raises(EdgekdError, match="manifest.json does not exist"):
        verify(tmp_path / "empty")
    (run / "manifest.json").write_text("{ not json")
    out = CliRunner().invoke(app, ["verify", str(run)])
    assert out.exit_code == 2 and "is not an edgekd manifest" in out.output
