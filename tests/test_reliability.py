"""Kill anywhere, resume: `edgekd build` is SIGKILLed at several points, then run again.

Each kill point is found by watching the run folder (or the live progress output), never by a hook
in edgekd. After every kill nothing cut short may be marked done or listed in manifest.json; the
rerun must reuse what was complete and redo the rest.
"""

import json
from pathlib import Path

import pytest

from edgekd import pipeline, rundir
from edgekd.config import load_profile, load_recipe
from edgekd.testing import (
    FAST_BUILD,
    Build,
    assert_killed_stage_not_done,
    assert_no_leftovers,
    manifest_stages,
    marker,
    partial_holds_file,
    set_args,
    stage_folder,
    write_chat_jsonl,
)
from edgekd.verify import verify


def _args(teacher: Path, stages: str, extra: list[str], data: Path | None = None) -> list[str]:
    args = ["--teacher", str(teacher), "--stages", stages, *set_args([*FAST_BUILD, *extra])]
    return [*args, "--data", str(data)] if data is not None else args


@pytest.mark.slow
def test_kill_during_teacher_generation_and_training_then_resume(tiny_teacher_dir, tmp_path):
    run = tmp_path / "run"
    # No --data: the corpus is the shipped prompts, answered by the teacher (edgekd/data.py).
    args = _args(
        tiny_teacher_dir,
        "distill",
        [
            # Long enough that generation outlasts the progress bar's first refresh (0.1 s).
            "data.num_prompts=64",
            "data.generation.max_tokens=48",
            "distill.max_steps=30",
            "distill.checkpoint_every=3",
        ],
    )
    partial = run / ".01-distill.partial"
    build = Build(run, args, live=True)
    build.kill_when(lambda: partial.is_dir() and "Teacher answers" in build.output)
    assert not list((run / "cache").glob("corpus-*")), "a cut-short corpus looks complete"
    assert_killed_stage_not_done(run, "distill")

    build = Build(run, args)
    progress = partial / "checkpoint" / "progress.json"
    build.kill_when(progress.exists)
    (corpus,) = (run / "cache").glob("corpus-*.jsonl")
    corpus_stat = corpus.stat().st_mtime_ns
    assert_killed_stage_not_done(run, "distill")
    step = json.loads(progress.read_text())["step"]

    out = Build(run, args).finish()
    assert f"resuming from the checkpoint at step {step}" in out
    assert "Teacher answers" not in out  # the finished corpus was reused, not regenerated
    assert corpus.stat().st_mtime_ns == corpus_stat
    assert manifest_stages(run) == {"distill"}
    assert_no_leftovers(run)
    checked, findings = verify(run)
    assert checked > 5 and findings == []


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_teacher_dir):
    """A finished distill stage, built in this process with the settings the CLI runs use."""
    root = tmp_path_factory.mktemp("killed-exports")
    data = write_chat_jsonl(root / "chat.jsonl")
    fast = [*FAST_BUILD, "distill.max_steps=2"]
    recipe = load_recipe(None, fast, str(tiny_teacher_dir), str(data))
    pipeline.build(load_profile("phone-1gb"), recipe, root / "run", ["distill"])
    return root / "run", data


@pytest.mark.slow
def test_kill_during_each_export_then_resume(distilled, tiny_teacher_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(distilled[0], run)
    args = _args(tiny_teacher_dir, "export_gguf,export_onnx", ["distill.max_steps=2"], distilled[1])
    distill_done = marker(run, "distill")

    build = Build(run, args)
    build.kill_when(partial_holds_file(run, "export_gguf", ".gguf"))
    assert "distill: running" not in build.output
    assert_killed_stage_not_done(run, "export_gguf")
    assert manifest_stages(run) == {"distill"}

    build = Build(run, args)
    build.kill_when(partial_holds_file(run, "export_onnx", "fp32"))
    assert_killed_stage_not_done(run, "export_onnx")
    assert manifest_stages(run) == {"distill", "export_gguf"}
    gguf_done = marker(run, "export_gguf")

    out = Build(run, args).finish()
    assert "export_gguf: up to date" in out and "export_onnx: running" in out
    # The exporter's tracer warnings are in the stage's log, both attempts', not on the terminal.
    onnx_log = (stage_folder(run, "export_onnx") / rundir.STAGE_LOG).read_text()
    assert "TracerWarning" in onnx_log and "TracerWarning" not in out
    assert onnx_log.count("--- export_onnx (") == 2
    assert "distill: running" not in out and "export_gguf: running" not in out
    assert marker(run, "distill") == distill_done and marker(run, "export_gguf") == gguf_done
    assert manifest_stages(run) == {"distill", "export_gguf", "export_onnx"}
    assert_no_leftovers(run)
    checked, findings = verify(run)
    assert checked > 10 and findings == []


@pytest.mark.slow
def test_same_inputs_and_seed_give_the_same_student_and_numbers(tiny_teacher_dir, tmp_path):
    data = write_chat_jsonl(tmp_path / "chat.jsonl")
    fast = [*FAST_BUILD, "distill.max_steps=3"]
    recipe = load_recipe(None, fast, str(tiny_teacher_dir), str(data))
    reports = []
    for name in ("a", "b"):
        pipeline.build(load_profile("phone-1gb"), recipe, tmp_path / name, ["distill"])
        reports.append(json.loads((tmp_path / name / "01-distill" / "report.json").read_text()))
    weights = [(tmp_path / n / "01-distill/model/model.safetensors").read_bytes() for n in "ab"]
    assert weights[0] == weights[1]
    assert reports[0]["quality"] == reports[1]["quality"]
    assert reports[0]["student"] == reports[1]["student"]
    curves = [(tmp_path / n / "01-distill/loss_curve.jsonl").read_text() for n in "ab"]
    losses = [[json.loads(line)["loss"] for line in c.splitlines()] for c in curves]
    assert losses[0] == losses[1]
    assert reports[0]["quality"]["student after"] != reports[0]["quality"]["student before"]


def test_disk_check_says_what_is_needed_free_and_where(tmp_path):
    import shutil as sh

    from edgekd.errors import EdgekdError
    from edgekd.preflight import check_disk

    run = tmp_path / "not" / "yet" / "run"
    check_disk(run, 1 << 20, ["distill"])
    free = sh.disk_usage(tmp_path).free
    with pytest.raises(EdgekdError) as err:
        check_disk(run, free + (1 << 40), ["distill", "export_gguf"])
    line = str(err.value)
    assert f"need about {(free + (1 << 40)) / 2**30:.1f} GB (estimate) in {run}" in line
    assert f"only {free / 2**30:.1f} GB is free on the file system of {tmp_path}" in line
    assert "\n" not in line and "stages distill, export_gguf" in line


def test_disk_estimate_covers_each_stage_and_skips_finished_ones(tiny_teacher_dir, tmp_path):
    from edgekd.plan import make_plan

    profile = load_profile("phone-1gb")
    recipe = load_recipe(None, FAST_BUILD, str(tiny_teacher_dir))
    stages = ["distill", "export_gguf", "export_onnx"]
    plan = make_plan(profile, recipe, stages, timing=False)
    assert list(plan.disk_bytes) == stages and all(b > 0 for b in plan.disk_bytes.values())
    # Two copies of fp32 weights at least: the student and its checkpoint.
    assert plan.disk_bytes["distill"] > 8 * 4 * 10**6
    assert any(line.startswith("disk") and "GB" in line for line in plan.lines(profile))
    assert pipeline.pending_stages(profile, recipe, tmp_path, stages, plan.teacher) == stages
