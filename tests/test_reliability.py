"""Kill anywhere, resume: `edgekd build` is SIGKILLed at several points, then run again.

Each kill point is found by watching the run folder (or the live progress output), never by a hook
in edgekd. After every kill nothing cut short may be marked done or listed in manifest.json; the
rerun must reuse what was complete and redo the rest.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgekd import pipeline, stages
from edgekd.config import load_profile, load_recipe
from edgekd.verify import verify

FAST = [
    "student.num_layers=2",
    "student.calibration_examples=4",
    "distill.batch_size=2",
    "distill.log_every=1",
    "data.max_seq_len=64",
    "qlora.enabled=false",
    "qat_kd.enabled=false",
    "eval.sample_max_tokens=4",
    "export_onnx.genai=false",
]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Build:
    """`edgekd build` in a child process, its output collected by a thread as it comes."""

    def __init__(self, run: Path, args: list[str], live: bool = False):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}  # no wrapped lines
        if live:  # rich then draws progress bars as they move, not once at the end
            env.update(TTY_INTERACTIVE="1", TTY_COMPATIBLE="1")
        cmd = [sys.executable, "-m", "edgekd.cli", "build", "--profile", "phone-1gb"]
        self.proc = subprocess.Popen(
            [*cmd, "--out", str(run), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while chunk := self.proc.stdout.read1(4096):
            self.chunks.append(chunk)

    @property
    def output(self) -> str:
        return ANSI.sub("", b"".join(self.chunks).decode(errors="replace"))

    def kill_when(self, seen, timeout: float = 120) -> None:
        """SIGKILL the build as soon as `seen()` is true; fail if it ended first."""
        deadline = time.time() + timeout
        while not seen():
            assert self.proc.poll() is None, f"build ended before the kill point:\n{self.output}"
            assert time.time() < deadline, f"kill point not reached:\n{self.output}"
            time.sleep(0.02)
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reader.join()
        assert self.proc.returncode == -signal.SIGKILL

    def finish(self) -> str:
        self.proc.wait(timeout=600)
        self.reader.join()
        assert self.proc.returncode == 0, self.output[-4000:]
        return self.output


def _args(teacher: Path, stages: str, extra: list[str], data: Path | None = None) -> list[str]:
    args = ["--teacher", str(teacher), "--stages", stages]
    if data is not None:
        args += ["--data", str(data)]
    for s in [*FAST, *extra]:
        args += ["--set", s]
    return args


def _manifest_stages(run: Path) -> set[str]:
    path = run / "manifest.json"
    return set(json.loads(path.read_text())["stages"]) if path.exists() else set()


def _marker(run: Path, stage: str) -> tuple[int, int]:
    """Identity of a stage's .done marker (inode, mtime): unchanged means the stage was reused."""
    st = (run / stages.get(stage).folder / ".done").stat()
    return st.st_ino, st.st_mtime_ns


def _no_leftovers(run: Path) -> None:
    left = [p for p in run.rglob("*") if ".tmp-" in p.name or p.name.endswith(".partial")]
    assert not left, left


def _partial_holds_file(run: Path, stage: str, suffix: str):
    partial = run / f".{stages.get(stage).folder}.partial"
    return lambda: any(p.name != ".key" and suffix in p.name for p in partial.glob("*"))


def _assert_killed_stage_not_done(run: Path, stage: str) -> None:
    assert not (run / stages.get(stage).folder / ".done").exists()
    assert stage not in _manifest_stages(run)
    assert (run / f".{stages.get(stage).folder}.partial").is_dir()


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
            "data.gen_max_tokens=48",
            "distill.max_steps=30",
            "distill.checkpoint_every=3",
        ],
    )
    partial = run / ".01-distill.partial"
    build = Build(run, args, live=True)
    build.kill_when(lambda: partial.is_dir() and "Teacher answers" in build.output)
    assert not list((run / "cache").glob("corpus-*")), "a cut-short corpus looks complete"
    _assert_killed_stage_not_done(run, "distill")

    build = Build(run, args)
    progress = partial / "checkpoint" / "progress.json"
    build.kill_when(progress.exists)
    (corpus,) = (run / "cache").glob("corpus-*.jsonl")
    corpus_stat = corpus.stat().st_mtime_ns
    _assert_killed_stage_not_done(run, "distill")
    step = json.loads(progress.read_text())["step"]

    out = Build(run, args).finish()
    assert f"resuming from the checkpoint at step {step}" in out
    assert "Teacher answers" not in out  # the finished corpus was reused, not regenerated
    assert corpus.stat().st_mtime_ns == corpus_stat
    assert _manifest_stages(run) == {"distill"}
    _no_leftovers(run)
    checked, findings = verify(run)
    assert checked > 5 and findings == []


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_teacher_dir):
    """A finished distill stage, built in this process with the settings the CLI runs use."""
    from tests.conftest import write_chat_jsonl

    root = tmp_path_factory.mktemp("killed-exports")
    data = write_chat_jsonl(root / "chat.jsonl")
    recipe = load_recipe(None, [*FAST, "distill.max_steps=2"], str(tiny_teacher_dir), str(data))
    pipeline.build(load_profile("phone-1gb"), recipe, root / "run", ["distill"])
    return root / "run", data


@pytest.mark.slow
def test_kill_during_each_export_then_resume(distilled, tiny_teacher_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(distilled[0], run)
    args = _args(tiny_teacher_dir, "export_gguf,export_onnx", ["distill.max_steps=2"], distilled[1])
    distill_done = _marker(run, "distill")

    build = Build(run, args)
    build.kill_when(_partial_holds_file(run, "export_gguf", ".gguf"))
    assert "distill: running" not in build.output
    _assert_killed_stage_not_done(run, "export_gguf")
    assert _manifest_stages(run) == {"distill"}

    build = Build(run, args)
    build.kill_when(_partial_holds_file(run, "export_onnx", "fp32"))
    _assert_killed_stage_not_done(run, "export_onnx")
    assert _manifest_stages(run) == {"distill", "export_gguf"}
    gguf_done = _marker(run, "export_gguf")

    out = Build(run, args).finish()
    assert "export_gguf: up to date" in out and "export_onnx: running" in out
    assert "distill: running" not in out and "export_gguf: running" not in out
    assert _marker(run, "distill") == distill_done and _marker(run, "export_gguf") == gguf_done
    assert _manifest_stages(run) == {"distill", "export_gguf", "export_onnx"}
    _no_leftovers(run)
    checked, findings = verify(run)
    assert checked > 10 and findings == []


@pytest.mark.slow
def test_same_inputs_and_seed_give_the_same_student_and_numbers(tiny_teacher_dir, tmp_path):
    from tests.conftest import write_chat_jsonl

    data = write_chat_jsonl(tmp_path / "chat.jsonl")
    recipe = load_recipe(None, [*FAST, "distill.max_steps=3"], str(tiny_teacher_dir), str(data))
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
    recipe = load_recipe(None, FAST, str(tiny_teacher_dir))
    stages = ["distill", "export_gguf", "export_onnx"]
    plan = make_plan(profile, recipe, stages, timing=False)
    assert list(plan.disk_bytes) == stages and all(b > 0 for b in plan.disk_bytes.values())
    # Two copies of fp32 weights at least: the student and its checkpoint.
    assert plan.disk_bytes["distill"] > 8 * 4 * 10**6
    assert any(line.startswith("disk") and "GB" in line for line in plan.lines(profile))
    assert pipeline.pending_stages(profile, recipe, tmp_path, stages, plan.teacher) == stages
