"""The cases of docs/reliability.md, run again: each bad input must still get its message and
leave the finished run as it was, and the table must hold every case."""

import importlib.util
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekd.cli import app

ROOT = Path(__file__).parents[1]


def _script():
    spec = importlib.util.spec_from_file_location(
        "reliability_table", ROOT / "scripts" / "reliability_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


table = _script()


def _cli(args: list[str]) -> tuple[int, str]:
    """The same command line, in this process (the script runs it in a child)."""
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


def test_table_lists_every_case():
    doc = (ROOT / "docs" / "reliability.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(table.CASES) + len(table.KILLS) >= 20
    assert f"{len(rows)} cases." in doc
    for row, case in zip(rows, table.CASES, strict=False):
        assert f"| {case.fault} |" in row and case.expect in row


@pytest.mark.slow
def test_fast_cases_still_hold(tmp_path, tiny_teacher_dir):
    ws = table.make_workspace(tmp_path, cli=_cli, teacher=tiny_teacher_dir)
    fast = [case for case in table.CASES if case.fast]
    assert len(fast) >= 20
    for case in fast:
        row = table.run_case(case, ws, cli=_cli)  # raises if the message or the run changed
        assert case.expect in row.said
