"""The run folder trusts nothing it did not write: one build at a time (an OS lock), checkpoints
keyed by their settings, no write or delete through a symbolic link, `--force` deleting only what
edgekd wrote, and one line (never a traceback) for a folder it cannot use, a disk that fills or a
Ctrl-C. Every build here is the real command line in a child process, on a tiny teacher."""

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekd import atomic, rundir
from edgekd.cli import app
from edgekd.errors import EdgekdError
from edgekd.testing import (
    FAST_BUILD,
    Build,
    assert_killed_stage_not_done,
    fill,
    partial_folder,
    set_args,
    stage_folder,
    tmpfs,
    write_chat_jsonl,
)
from edgekd.verify import verify

pytestmark = pytest.mark.slow


def _args(teacher: Path, data: Path, *extra: str) -> list[str]:
    sets = set_args([*FAST_BUILD, "distill.max_steps=2", *extra])
    return ["--teacher", str(teacher), "--data", str(data), "--stages", "distill", *sets]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_chat_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_teacher_dir, data) -> Path:
    """A finished distill run, built once; tests work on copies of it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    Build(run, _args(tiny_teacher_dir, data)).finish()
    return run


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run, symlinks=True)
    return run


def _checkpoint_written(run: Path):
    return (partial_folder(run, "distill") / rundir.CHECKPOINT / rundir.PROGRESS).exists


# --- one build per folder -----------------------------------------------------------------------


def test_a_second_build_is_refused_while_the_first_runs(tiny_teacher_dir, data, tmp_path):
    run = tmp_path / "run"
    args = _args(tiny_teacher_dir, data, "distill.max_steps=150")
    first = Build(run, args)
    first.wait_for(lambda: "distill: step 1/" in first.output)
    second = Build(run, args).fail()
    assert first.proc.poll() is None, "the first build ended before the second was refused"
    assert f"is in use by another edgekd build (pid {first.proc.pid}, started" in second
    assert "edgekd.cli build" in second and "Traceback" not in second
    first.finish()
    assert (stage_folder(run, "distill") / ".done").exists()
    holder = json.loads((run / rundir.LOCK).read_text())
    assert holder["pid"] == first.proc.pid and "--stages distill" in holder["command"]


def test_a_killed_build_leaves_no_stale_lock(tiny_teacher_dir, data, tmp_path):
    run = tmp_path / "run"
    args = _args(tiny_teacher_dir, data, "distill.max_steps=30", "distill.checkpoint_every=3")
    Build(run, args).kill_when(_checkpoint_written(run))
    assert "resuming from the checkpoint" in Build(run, args).finish()


# --- a checkpoint carries its settings' key -----------------------------------------------------


def test_a_checkpoint_of_other_settings_is_never_resumed(tiny_teacher_dir, data, tmp_path):
    run = tmp_path / "run"
    steps = ["distill.max_steps=30", "distill.checkpoint_every=3"]
    ours = _args(tiny_teacher_dir, data, *steps)
    theirs = _args(tiny_teacher_dir, data, *steps, "distill.lr=3e-5")
    checkpoint = partial_folder(run, "distill") / rundir.CHECKPOINT
    Build(run, theirs).kill_when(_checkpoint_written(run))
    shutil.move(checkpoint, tmp_path / "theirs")
    Build(run, ours).kill_when(_checkpoint_written(run))
    # The partial folder's .key is ours; the checkpoint in it is another build's.
    shutil.rmtree(checkpoint)
    shutil.copytree(tmp_path / "theirs", checkpoint)
    out = Build(run, ours).finish()
    assert "was made with other settings" in out and "not resumed" in out
    assert "resuming from the checkpoint" not in out
    curve = (stage_folder(run, "distill") / "loss_curve.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in curve] == list(range(1, 31))


# --- symbolic links -----------------------------------------------------------------------------


def _outside(tmp_path: Path) -> Path:
    """A folder of the user's, outside the run, with a file that looks like a temporary."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / f".notes{atomic.TMP_MARK}1").write_text("mine too")
    return folder


def test_a_linked_cache_is_refused_and_nothing_through_it_changes(
    copy, tiny_teacher_dir, data, tmp_path
):
    outside = _outside(tmp_path)
    shutil.rmtree(copy / rundir.CACHE)
    (copy / rundir.CACHE).symlink_to(outside)
    out = Build(copy, _args(tiny_teacher_dir, data, "distill.lr=3e-5")).fail()
    assert f"{copy / rundir.CACHE} is a symbolic link (to {outside})" in out
    assert sorted(p.name for p in outside.iterdir()) == [".notes.tmp-1", "notes.txt"]


def test_a_linked_partial_folder_is_refused_and_kept(tiny_teacher_dir, data, tmp_path):
    run = tmp_path / "run"
    args = _args(tiny_teacher_dir, data, "distill.max_steps=30", "distill.checkpoint_every=3")
    Build(run, args).kill_when(_checkpoint_written(run))
    # The killed stage's partial folder (same key: it would resume) moved out and linked back.
    partial, outside = partial_folder(run, "distill"), tmp_path / "outside"
    shutil.move(partial, outside)
    (outside / "notes.txt").write_text("mine")
    partial.symlink_to(outside)
    before = sorted(p.name for p in outside.iterdir())
    out = Build(run, args).fail()
    assert f"{partial} is a symbolic link" in out and "Traceback" not in out
    assert sorted(p.name for p in outside.iterdir()) == before
    assert partial.is_symlink() and not stage_folder(run, "distill").exists()


def test_a_link_inside_a_stage_folder_or_in_place_of_a_file_is_refused(tmp_path):
    run, folders = tmp_path / "run", ["01-distill"]
    (run / "01-distill" / "model").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    rundir.refuse_links(run, folders)
    (run / "01-distill" / "model" / "w").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(EdgekdError, match=r"01-distill/model/w is a symbolic link"):
        rundir.refuse_links(run, folders)
    (run / "01-distill" / "model" / "w").unlink()
    (run / rundir.MANIFEST).symlink_to(tmp_path / "elsewhere" / "m.json")
    with pytest.raises(EdgekdError, match=r"manifest.json is a symbolic link"):
        rundir.refuse_links(run, folders)
    # The user's own links, under names edgekd does not write, are none of its business.
    (run / rundir.MANIFEST).unlink()
    (run / "mine").symlink_to(tmp_path / "elsewhere")
    rundir.refuse_links(run, folders)


def _cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_verify_flags_an_artifact_that_is_a_link(copy, tmp_path):
    weights = copy / "01-distill" / "model" / "model.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(weights, outside)
    weights.symlink_to(outside)  # the same bytes: only the link is wrong
    checked, findings = verify(copy)
    (found,) = findings
    assert found.path == "01-distill/model/model.safetensors"
    assert "symbolic link" in found.problem and "outside the run folder" in found.problem
    out = _cli("verify", copy)
    assert out.exit_code == 1 and "symbolic link" in out.output


@pytest.mark.parametrize("bad", ["../outside.bin", "/etc/hostname", "01-distill/../../x"])
def test_verify_refuses_a_manifest_path_out_of_the_run(copy, bad):
    manifest = json.loads((copy / rundir.MANIFEST).read_text())
    manifest["stages"]["distill"]["artifacts"][bad] = {"bytes": 1, "sha256": "0" * 64}
    (copy / rundir.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(EdgekdError, match="not inside the run folder"):
        verify(copy)
    out = _cli("verify", copy)
    assert out.exit_code == 2 and "cannot be trusted" in out.output


def test_verify_reports_files_the_manifest_does_not_list(copy):
    (copy / "01-distill" / "extra.bin").write_bytes(b"x")
    (copy / "01-distill" / "model" / "more.json").write_text("{}")
    checked, findings = verify(copy)
    assert [(f.path, f.problem) for f in findings] == [
        ("01-distill/extra.bin", "not in the manifest"),
        ("01-distill/model/more.json", "not in the manifest"),
    ]
    out = _cli("verify", copy)
    assert out.exit_code == 1 and "not in the manifest: 01-distill/extra.bin" in out.output
    assert f"0 of {checked} artifacts do not match" in out.output


# --- --force deletes only what edgekd wrote -----------------------------------------------------


def test_force_keeps_the_users_files_across_builds(tiny_teacher_dir, data, tmp_path):
    run = tmp_path / "run"
    (run / "photos").mkdir(parents=True)
    (run / "photos" / "cat.jpg").write_bytes(b"cat")
    (run / "notes.txt").write_text("mine")
    (run / f".draft{atomic.TMP_MARK}7").write_text("mine too")
    args = _args(tiny_teacher_dir, data)
    out = Build(run, [*args, "--force"]).finish()
    assert "kept 3 files edgekd did not write: .draft.tmp-7, notes.txt, photos" in out
    # Another profile: a different build, which --force replaces.
    out = Build(run, [*args, "--profile", "laptop-cpu", "--force"]).finish()
    assert "kept 3 files edgekd did not write" in out
    assert (run / "notes.txt").read_text() == "mine"
    assert (run / "photos" / "cat.jpg").read_bytes() == b"cat"
    assert (run / f".draft{atomic.TMP_MARK}7").exists()
    assert json.loads((run / rundir.BUILD_FILE).read_text())["profile"]["name"] == "laptop-cpu"
    assert verify(run)[1] == []


# --- one line instead of a traceback ------------------------------------------------------------


def test_out_that_is_a_regular_file(tiny_teacher_dir, data, tmp_path):
    out = tmp_path / "a-file"
    out.write_text("mine")
    said = Build(out, _args(tiny_teacher_dir, data)).fail()
    assert f"--out {out} is a file, not a folder" in said and "Traceback" not in said
    assert out.read_text() == "mine"


def test_out_on_a_read_only_folder(tiny_teacher_dir, data, tmp_path):
    folder = tmp_path / "ro"
    if os.geteuid() != 0:  # permissions bind everyone but root
        folder.mkdir()
        folder.chmod(0o555)
        said = Build(folder / "run", _args(tiny_teacher_dir, data)).fail()
    else:
        try:
            with tmpfs(folder, 4, read_only=True):
                said = Build(folder / "run", _args(tiny_teacher_dir, data)).fail()
        except OSError as err:
            pytest.skip(f"root, and no read-only file system to try: {err}")
    assert f"cannot write in {folder / 'run'}" in said and "Traceback" not in said


def test_build_json_that_is_not_json(copy, tiny_teacher_dir, data):
    (copy / rundir.BUILD_FILE).write_text("{ not json")
    (copy / "notes.txt").write_text("mine")
    said = Build(copy, _args(tiny_teacher_dir, data)).fail()
    assert f"{copy / rundir.BUILD_FILE} is not valid JSON" in said and "--force" in said
    assert "Traceback" not in said
    out = Build(copy, [*_args(tiny_teacher_dir, data), "--force"]).finish()
    assert "kept 1 file edgekd did not write: notes.txt" in out
    assert json.loads((copy / rundir.BUILD_FILE).read_text())["teacher"] == str(tiny_teacher_dir)


def test_a_finished_stage_report_that_is_not_json(copy, tiny_teacher_dir, data):
    report = stage_folder(copy, "distill") / rundir.REPORT_JSON
    report.write_text("garbage")
    said = Build(copy, _args(tiny_teacher_dir, data)).fail()
    assert f"{report} is not valid JSON" in said and "pass --force" in said
    assert "Traceback" not in said
    out = _cli("report", copy)
    assert out.exit_code == 2 and "is not valid JSON" in out.output
    out = Build(copy, [*_args(tiny_teacher_dir, data), "--force"]).finish()
    assert "which runs again" in out and "distill: running" in out
    assert json.loads(report.read_text())["stage"] == "distill"


def test_a_disk_that_fills_during_a_stage(tiny_teacher_dir, data, tmp_path):
    mount = tmp_path / "disk"
    args = _args(tiny_teacher_dir, data, "distill.max_steps=20", "distill.checkpoint_every=1")
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(tmpfs(mount, 300))
        except OSError as err:
            pytest.skip(f"no small file system to fill: {err}")
        run = mount / "run"
        build = Build(run, args)
        # Past preflight's free-space check: the disk fills while the stage runs.
        build.wait_for(lambda: "distill: running in" in build.output)
        filler = fill(mount)
        said = build.fail()
        assert "disk full: writing in" in said and "run the same command again" in said
        assert "Traceback" not in said
        assert_killed_stage_not_done(run, "distill")
        filler.unlink()
        Build(run, args).finish()
        assert verify(run)[1] == []


def test_sigint_stops_the_build_with_one_line_and_the_rerun_resumes(
    tiny_teacher_dir, data, tmp_path
):
    run = tmp_path / "run"
    args = _args(tiny_teacher_dir, data, "distill.max_steps=200", "distill.checkpoint_every=3")
    build = Build(run, args)
    assert build.interrupt_when(_checkpoint_written(run)) == 130
    said = build.output
    assert "the build was interrupted (SIGINT)" in said and "Run the same command to resume" in said
    assert "Traceback" not in said and "Aborted" not in said
    assert_killed_stage_not_done(run, "distill")
    assert "resuming from the checkpoint" in Build(run, args).finish()
