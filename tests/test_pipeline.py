"""The distill stage end to end on a tiny teacher: outputs, skip, re-run, refusal, resume, DDP."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from edgekd import pipeline
from edgekd.config import load_profile, load_recipe
from edgekd.errors import EdgekdError
from tests.stages.conftest import FAST as STAGE_FAST

FAST = [
    "student.num_layers=2",
    "student.calibration_examples=4",
    "distill.max_steps=4",
    "distill.batch_size=2",
    "distill.log_every=1",
    "data.max_seq_len=64",
]


def _build(teacher, data, run_dir, extra=(), force=False):
    recipe = load_recipe(None, [*FAST, *extra], teacher=str(teacher), data=str(data))
    return pipeline.build(load_profile("phone-1gb"), recipe, run_dir, ["distill"], force=force)


def test_distill_writes_student_report_and_manifest(tiny_teacher_dir, chat_jsonl, tmp_path):
    run = tmp_path / "run"
    assert _build(tiny_teacher_dir, chat_jsonl, run) == {"distill": "ran"}
    stage = run / "01-distill"
    student = AutoModelForCausalLM.from_pretrained(stage / "model")
    assert student.config.num_hidden_layers == 2
    assert not (stage / "model" / "tokenizer.model").exists()
    report = json.loads((stage / "report.json").read_text())
    assert set(report["quality"]) == {"teacher", "student before", "student after"}
    assert report["quality"]["teacher"]["kld"] < 1e-3
    # A random tiny teacher has near-ties that the fp16 reference can flip; kld is the real check.
    assert report["quality"]["teacher"]["top1"] > 0.9
    assert report["student"]["kept_layers"] in ([0, 1], [0, 3], [2, 3])
    assert len(report["student"]["layer_candidates"]) == 3
    curve = [json.loads(line) for line in (stage / "loss_curve.jsonl").read_text().splitlines()]
    assert [row["step"] for row in curve] == [1, 2, 3, 4]
    manifest = json.loads((run / "manifest.json").read_text())
    arts = manifest["stages"]["distill"]["artifacts"]
    assert "01-distill/model/model.safetensors" in arts
    assert all(len(a["sha256"]) == 64 and a["bytes"] > 0 for a in arts.values())
    assert not list(run.glob(".*partial"))


def test_rerun_skips_and_changed_setting_reruns(tiny_teacher_dir, chat_jsonl, tmp_path, capsys):
    run = tmp_path / "run"
    _build(tiny_teacher_dir, chat_jsonl, run)
    done = (run / "01-distill" / ".done").read_text()
    assert _build(tiny_teacher_dir, chat_jsonl, run) == {"distill": "up to date"}
    assert "Nothing to do" in capsys.readouterr().out
    assert (run / "01-distill" / ".done").read_text() == done
    assert _build(tiny_teacher_dir, chat_jsonl, run, ["distill.lr=1e-3"]) == {"distill": "ran"}
    assert (run / "01-distill" / ".done").read_text() != done


def test_different_build_is_refused_without_force(
    tiny_teacher_dir, chat_jsonl, tmp_path, tokenizer
):
    from edgekd.testing import save_tiny_llama

    run = tmp_path / "run"
    _build(tiny_teacher_dir, chat_jsonl, run)
    other = save_tiny_llama(tmp_path / "other", tokenizer, num_layers=4, seed=1)
    before = (run / "01-distill" / "model" / "model.safetensors").read_bytes()
    with pytest.raises(EdgekdError, match="holds a different build.*--force"):
        _build(other, chat_jsonl, run)
    assert (run / "01-distill" / "model" / "model.safetensors").read_bytes() == before
    assert _build(other, chat_jsonl, run, force=True) == {"distill": "ran"}


def _cli(*args):
    return [sys.executable, "-m", "edgekd.cli", "build", "--profile", "phone-1gb", *args]


@pytest.mark.slow
def test_killed_build_resumes_from_checkpoint(tiny_teacher_dir, chat_jsonl, tmp_path):
    run = tmp_path / "run"
    args = ["--stages", "distill", "--teacher", str(tiny_teacher_dir), "--data", str(chat_jsonl)]
    args += ["--out", str(run)]
    for s in [*FAST, "distill.max_steps=400", "distill.checkpoint_every=3"]:
        args += ["--set", s]
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    progress = run / ".01-distill.partial" / "checkpoint" / "progress.json"
    deadline = time.time() + 120
    while not progress.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert progress.exists(), proc.stdout.read().decode() if proc.poll() is not None else "no ckpt"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "01-distill").exists()
    step = json.loads(progress.read_text())["step"]
    assert step >= 3
    out = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert f"resuming from the checkpoint at step {step}" in out.stdout
    report = json.loads((run / "01-distill" / "report.json").read_text())
    assert report["training"]["tokens_this_run"] < 400 * 2 * 64


@pytest.mark.slow
def test_distill_at_scale_settings_on_cpu(tiny_teacher_dir, chat_jsonl, tmp_path, tokenizer):
    """bf16 autocast, gradient checkpointing and a 4-bit NF4 teacher, on this CPU."""
    from edgekd.testing import save_tiny_llama

    student = save_tiny_llama(tmp_path / "student", tokenizer, num_layers=2, seed=3)
    run = tmp_path / "run"
    args = ["--stages", "distill", "--teacher", str(tiny_teacher_dir), "--data", str(chat_jsonl)]
    args += ["--out", str(run)]
    for s in [
        *FAST,
        f"student.source={student}",
        "teacher.load_in=4bit",
        "teacher.dtype=bfloat16",
        "distill.scale.mixed_precision=bf16",
        "distill.scale.gradient_checkpointing=true",
        "distill.scale.loss_chunk_tokens=16",
    ]:
        args += ["--set", s]
    # Its own process: accelerate fixes the mixed precision once per process.
    out = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    curve = [json.loads(line) for line in (run / "01-distill" / "loss_curve.jsonl").open()]
    assert [row["step"] for row in curve] == [1, 2, 3, 4]
    assert all(0 < row["loss"] < 100 for row in curve)
    trained = AutoModelForCausalLM.from_pretrained(run / "01-distill" / "model")
    assert trained.dtype == torch.float32  # bf16 autocast leaves fp32 weights


TRAINING_FAST = [s for s in STAGE_FAST if s.startswith(("qlora.", "qat_kd."))]


@pytest.mark.slow
def test_two_process_accelerate_launch(tiny_teacher_dir, chat_jsonl, tmp_path):
    """The three training stages under DDP: 2 CPU processes, gloo, the chunked KD loss."""
    run = tmp_path / "run"
    cmd = [
        # accelerate 1.15's --cpu launcher starts one process unless given an MPI hostfile;
        # --multi_gpu starts them with torch's launcher, and edgekd picks gloo without CUDA.
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "-m", "edgekd.cli", "build", "--profile", "phone-1gb", "--stages", "distill,qlora,qat_kd",
        "--teacher", str(tiny_teacher_dir), "--data", str(chat_jsonl), "--out", str(run),
    ]  # fmt: skip
    for s in [*FAST, *TRAINING_FAST]:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for stage, steps in (("01-distill", 4), ("02-qlora", 3), ("03-qat-kd", 4)):
        report = json.loads((run / stage / "report.json").read_text())
        assert report["training"]["processes"] == 2, stage
        curve = (run / stage / "loss_curve.jsonl").read_text().splitlines()
        assert json.loads(curve[-1])["step"] == steps, stage
        assert Path(run / stage / "model" / "model.safetensors").exists(), stage
    assert (run / "02-qlora" / "adapter" / "adapter_config.json").exists()


@pytest.mark.slow
def test_two_process_fsdp(tiny_teacher_dir, chat_jsonl, tmp_path):
    """The three training stages with the student sharded by FSDP2 over 2 CPU processes (gloo),
    launched with the repo's configs/accelerate/fsdp.yaml; the trained weights are gathered and
    saved."""
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", "configs/accelerate/fsdp.yaml", "--num_processes", "2",
        "-m", "tests.fsdp_on_cpu", "build", "--profile", "phone-1gb",
        "--stages", "distill,qlora,qat_kd", "--teacher", str(tiny_teacher_dir),
        "--data", str(chat_jsonl), "--out", str(run),
    ]  # fmt: skip
    for s in [*FAST, *TRAINING_FAST, "distill.checkpoint_every=2"]:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).parent.parent
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for stage, steps in (("01-distill", 4), ("02-qlora", 3), ("03-qat-kd", 4)):
        report = json.loads((run / stage / "report.json").read_text())
        assert report["training"]["processes"] == 2, stage
        assert report["training"]["distributed"] == "FSDP", stage
        curve = (run / stage / "loss_curve.jsonl").read_text().splitlines()
        assert json.loads(curve[-1])["step"] == steps, stage
    # What each stage saved is what it trained, gathered from the shards: not its input.
    start = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).state_dict()
    for stage in ("01-distill", "02-qlora", "03-qat-kd"):
        saved = AutoModelForCausalLM.from_pretrained(run / stage / "model").state_dict()
        moved = [k for k, v in saved.items() if not torch.equal(v, start[k])]
        assert len(moved) > len(saved) // 2, stage
        start = saved
