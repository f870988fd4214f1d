"""Atomic writes: a writer that dies leaves the old file, never a partial new one."""

import os

import pytest

from edgekd import atomic


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    atomic.write_text(path, "old")
    with pytest.raises(RuntimeError), atomic.atomic_path(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_folder_written_whole_or_not_at_all(tmp_path):
    out = tmp_path / "fp32"
    with atomic.atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "model.onnx").write_text("x")
        assert not out.exists()
    assert (out / "model.onnx").read_text() == "x"


def test_leftovers_of_killed_writers_are_removed(tmp_path):
    # What a SIGKILLed writer leaves: its temporary name, with the dead process's id.
    (tmp_path / f".corpus-1.jsonl{atomic.TMP_MARK}{os.getpid() + 1}").write_text("{")
    (tmp_path / f".fp32{atomic.TMP_MARK}12").mkdir()
    (tmp_path / "corpus-0.jsonl").write_text("{}\n")
    atomic.remove_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["corpus-0.jsonl"]
