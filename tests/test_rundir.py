"""The run folder's rules: the partial folder, the .done marker written last, the manifest."""

import json

import pytest

from edgekd import rundir
from edgekd.errors import EdgekdError


def test_partial_folder_and_missing_or_torn_marker(tmp_path):
    assert rundir.partial_dir(tmp_path, "01-distill") == tmp_path / ".01-distill.partial"
    assert rundir.read_done(tmp_path / "01-distill") is None
    (tmp_path / "01-distill").mkdir()
    (tmp_path / "01-distill" / ".done").write_text('{"key": ')
    assert rundir.read_done(tmp_path / "01-distill") is None


def test_prepare_keeps_the_checkpoint_of_the_same_key_only(tmp_path):
    work = rundir.partial_dir(tmp_path, "01-distill")
    rundir.prepare_partial(work, "k1")
    (work / rundir.CHECKPOINT).mkdir()
    (work / "half-written.bin").write_bytes(b"x")
    (work / rundir.STAGE_LOG).write_text("the killed attempt's messages")
    rundir.prepare_partial(work, "k1")
    kept = [rundir.KEY, rundir.CHECKPOINT, rundir.STAGE_LOG]
    assert sorted(p.name for p in work.iterdir()) == sorted(kept)
    rundir.prepare_partial(work, "k2")
    assert [p.name for p in work.iterdir()] == [rundir.KEY]
    assert (work / rundir.KEY).read_text() == "k2"


def test_finish_renames_marks_done_and_the_manifest_lists_it(tmp_path):
    work = rundir.partial_dir(tmp_path, "01-distill")
    rundir.prepare_partial(work, "k")
    (work / "model").mkdir()
    (work / "model" / "w.bin").write_bytes(b"abc")
    final = tmp_path / "01-distill"
    (work / rundir.STAGE_LOG).write_text("a library's notice\n")
    rundir.finish(work, final, "k", ["model/w.bin"], {"stage": "distill"})
    assert not work.exists() and not (final / rundir.KEY).exists()
    done = rundir.read_done(final)
    hashed = {"model/w.bin", rundir.REPORT_JSON, rundir.STAGE_LOG}
    assert done["key"] == "k" and set(done["artifacts"]) == hashed
    assert done["artifacts"]["model/w.bin"]["bytes"] == 3
    rundir.write_manifest(tmp_path, {"distill": "01-distill", "qlora": "02-qlora"})
    manifest = json.loads((tmp_path / rundir.MANIFEST).read_text())
    assert list(manifest["stages"]) == ["distill"]
    assert "01-distill/model/w.bin" in manifest["stages"]["distill"]["artifacts"]


def test_finish_refuses_an_artifact_the_stage_did_not_write(tmp_path):
    work = rundir.partial_dir(tmp_path, "04-export-gguf")
    rundir.prepare_partial(work, "k")
    with pytest.raises(RuntimeError, match="stage export_gguf reported artifact m.gguf"):
        rundir.finish(work, tmp_path / "04-export-gguf", "k", ["m.gguf"], {"stage": "export_gguf"})
    assert rundir.read_done(tmp_path / "04-export-gguf") is None


def test_a_folder_of_something_else_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(EdgekdError, match="holds no edgekd build"):
        rundir.check_run_dir(tmp_path, {"teacher": "t"}, force=False, is_main=True, folders=[])
    rundir.check_run_dir(tmp_path, {"teacher": "t"}, force=True, is_main=True, folders=[])
    assert json.loads((tmp_path / rundir.BUILD_FILE).read_text()) == {"teacher": "t"}
