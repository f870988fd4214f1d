"""The command line: plans, profiles and one-line errors before any work starts."""

import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekd.cli import app

CONFIGS = Path(__file__).parent / "data" / "configs"
RECIPES = Path(__file__).parents[1] / "edgekd" / "recipes"
runner = CliRunner()


def _run(*args):
    return runner.invoke(app, list(args))


def test_profiles_list_and_show():
    out = _run("profiles", "list")
    assert out.exit_code == 0
    for name in ("phone-1gb", "phone-4gb", "sbc-8gb", "laptop-cpu"):
        assert name in out.output
    show = _run("profiles", "show", "sbc-8gb")
    assert show.exit_code == 0
    assert "memory_budget_mb: 4096" in show.output


def _error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:")
    return lines[0]


def test_unknown_profile(tmp_path):
    line = _error_line(_run("build", "--profile", "phone-2gb", "--out", str(tmp_path)))
    assert "unknown profile 'phone-2gb'" in line and "phone-1gb" in line


def test_missing_teacher_and_folder_without_model(tmp_path):
    line = _error_line(_run("build", "--profile", "phone-1gb", "--teacher", "no/such/dir.gguf"))
    assert "no/such/dir.gguf" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _error_line(_run("build", "--profile", "phone-1gb", "--teacher", str(empty)))
    assert str(empty) in line and "config.json" in line


def test_teacher_folder_without_weights(tmp_path, tiny_teacher_dir, chat_jsonl):
    folder = tmp_path / "cfg-only"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_teacher_dir / "config.json").read_text())
    out = tmp_path / "run"
    line = _error_line(
        _run("build", "--profile", "phone-1gb", "--teacher", str(folder), "--data",
             str(chat_jsonl), "--out", str(out))
    )  # fmt: skip
    assert str(folder) in line and "weights" in line
    assert not out.exists()


def test_bad_data_is_refused_before_work(tmp_path, tiny_teacher_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    out = tmp_path / "run"
    line = _error_line(
        _run("build", "--profile", "phone-1gb", "--teacher", str(tiny_teacher_dir), "--data",
             str(bad), "--out", str(out))
    )  # fmt: skip
    assert str(bad) in line and "2" in line
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    line = _error_line(
        _run("build", "--profile", "phone-1gb", "--teacher", str(tiny_teacher_dir), "--data",
             str(empty), "--out", str(out))
    )  # fmt: skip
    assert str(empty) in line
    assert not out.exists()


def test_typo_in_set_and_unknown_stage(tiny_teacher_dir):
    line = _error_line(
        _run("build", "--profile", "phone-1gb", "--teacher", str(tiny_teacher_dir), "--set",
             "distill.temperatur=4")
    )  # fmt: skip
    assert "unknown key 'distill.temperatur'" in line
    line = _error_line(_run("build", "--profile", "phone-1gb", "--stages", "distil"))
    assert "unknown stage 'distil'" in line


def test_student_with_other_tokenizer_is_refused(tmp_path, tiny_teacher_dir, chat_jsonl):
    from transformers import AutoTokenizer

    from edgekd.testing import save_tiny_llama

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    tok.add_tokens(["<extra_a>", "<extra_b>"])
    student = save_tiny_llama(tmp_path / "student", tok, num_layers=1)
    line = _error_line(
        _run("build", "--profile", "phone-1gb", "--teacher", str(tiny_teacher_dir), "--data",
             str(chat_jsonl), "--set", f"student.source={student}", "--out", str(tmp_path / "r"))
    )  # fmt: skip
    assert "tokenizer" in line


def _dry_run(recipe, profile, student):
    return _run(
        "build", "--profile", profile, "--recipe", str(RECIPES / recipe), "--dry-run",
        "--teacher", str(CONFIGS / "qwen2.5-7b-instruct"),
        "--set", f"student.source={CONFIGS / student}",
    )  # fmt: skip


def test_example_recipes_plan_from_configs_alone():
    small = _dry_run("qwen2.5-7b-to-0.5b.yaml", "phone-1gb", "qwen2.5-0.5b-instruct")
    assert small.exit_code == 0, small.output
    assert "7615.6M params" in small.output  # Qwen2.5-7B's published parameter count
    assert "494.0M params" in small.output  # Qwen2.5-0.5B
    assert "fits" in small.output and "distill: up to" in small.output
    mid = _dry_run("qwen2.5-7b-to-1.5b.yaml", "phone-4gb", "qwen2.5-1.5b-instruct")
    assert mid.exit_code == 0, mid.output
    assert "1543.7M params" in mid.output
    # The per-GPU training memory estimate, for 1, 2 and 8 GPUs, labelled as one.
    assert "distill per GPU, estimated" in mid.output
    assert "1 GPU    2 GPUs    8 GPUs" in mid.output
    for strategy in ("DDP", "ZeRO-2", "FSDP2"):
        assert f"\n          {strategy} " in mid.output
    assert "logits 2.9 GB chunked (1024 tokens); naive full logits would be 23.2 GB" in mid.output
    # Each stage's peak on the host, from its spec. The recipe's held-out reference dominates
    # distill's: fp32 log-probs over 152k tokens at up to 256 x 1024 positions (148 GB), beside
    # the bf16 7B teacher (14 GB) and the 1.5B student with AdamW (23 GB).
    host = next(line for line in mid.output.splitlines() if line.startswith("host RAM"))
    for stage in ("distill", "qlora", "qat_kd", "export_gguf", "export_onnx", "bench"):
        assert f" {stage} " in host
    distill = float(host.split(" distill ")[1].split(" GB")[0])
    assert 148 + 14 + 23 < distill < 148 + 14 + 23 + 6  # + logits, activations, runtime


def _pruned_dry_run(recipe, profile, *sets):
    return _run(
        "build", "--profile", profile, "--recipe", str(RECIPES / recipe), "--dry-run",
        "--teacher", str(CONFIGS / "qwen2.5-7b-instruct"), "--set", "student.source=null",
        *[a for s in sets for a in ("--set", s)],
    )  # fmt: skip


@pytest.mark.parametrize(
    ("recipe", "profile", "budget"),
    [("qwen2.5-7b-to-0.5b.yaml", "phone-1gb", 480), ("qwen2.5-7b-to-1.5b.yaml", "phone-4gb", 1500)],
)
def test_a_7b_teacher_is_pruned_to_fit_the_profile(recipe, profile, budget):
    out = _pruned_dry_run(recipe, profile, "student.prune=auto").output
    assert "7615.6M params" in out and f"of {budget} MB budget: fits" in out
    rows = re.findall(r"\n  (width|depth_width|depth) +(\d+) layers, hidden (\d+), .*?: ([\d.]+)M "
                      r"params, Q4_K_M ~(\d+) MB \+ KV (\d+) MB", out)  # fmt: skip
    assert {r[0] for r in rows} >= {"width", "depth_width"}
    for _, _, hidden, _, weights, kv in rows:
        assert int(hidden) % 256 == 0 and int(weights) + int(kv) <= 0.95 * budget


def test_depth_alone_is_refused_for_a_7b_teacher_on_a_1gb_phone():
    line = _error_line(
        _pruned_dry_run("qwen2.5-7b-to-0.5b.yaml", "phone-1gb", "student.prune=depth")
    )
    assert "no depth student of this teacher fits phone-1gb's memory_budget_mb=480" in line
    assert "set student.prune=depth_width" in line


def test_student_that_cannot_fit_is_refused():
    # The dry run shows the whole plan, then the verdict; a build stops at the verdict.
    dry = _dry_run("qwen2.5-7b-to-1.5b.yaml", "phone-1gb", "qwen2.5-1.5b-instruct")
    assert dry.exit_code == 2
    assert "DOES NOT FIT" in dry.output and "distill per GPU, estimated" in dry.output
    assert dry.output.strip().splitlines()[-1].startswith("error:")
    line = _error_line(
        _run("build", "--profile", "phone-1gb", "--recipe",
             str(RECIPES / "qwen2.5-7b-to-1.5b.yaml"), "--teacher",
             str(CONFIGS / "qwen2.5-7b-instruct"), "--set",
             f"student.source={CONFIGS / 'qwen2.5-1.5b-instruct'}")
    )  # fmt: skip
    assert "phone-1gb allows 480 MB" in line and "pick a smaller student" in line


@pytest.mark.slow
def test_student_layers_beyond_embedded_teacher():
    line = _error_line(
        _run("build", "--profile", "phone-1gb", "--dry-run", "--set", "student.num_layers=31")
    )
    assert "exceeds the teacher's 30 layers" in line


@pytest.mark.slow
def test_eval_one_artifact_writes_its_scores(tiny_llama_gguf, tmp_path):
    out = tmp_path / "scores.json"
    args = ["--tasks", "edgekd_choice", "--limit", "2", "--set", "eval.threads=1"]
    result = _run("eval", str(tiny_llama_gguf[1]), *args, "--json", str(out))
    assert result.exit_code == 0, result.output
    assert "edgekd_choice" in result.output
    [row] = json.loads(out.read_text())["artifacts"]
    assert row["runtime"] == "llama.cpp" and row["params"] > 0
    score = row["tasks"]["edgekd_choice"]
    assert score["n"] == 2 and score["share"] is None  # no teacher to compare with


@pytest.mark.slow
def test_eval_a_build_scores_its_teacher_student_and_exports(
    tiny_teacher_dir, tiny_llama_gguf, tmp_path
):
    """A finished build's folder, laid out as the stages leave it: build.json names the
    teacher, a training stage's model/, an export's files beside its report."""
    run = tmp_path / "run"
    (run / "01-distill").mkdir(parents=True)
    (run / "04-export-gguf").mkdir()
    (run / "build.json").write_text(json.dumps({"teacher": str(tiny_teacher_dir)}))
    shutil.copytree(tiny_llama_gguf[0], run / "01-distill" / "model")
    shutil.copy(tiny_llama_gguf[1], run / "04-export-gguf" / "model-F16.gguf")
    (run / "04-export-gguf" / "report.json").write_text(json.dumps({"quant": "Q4_K_M"}))
    for stage in ("01-distill", "04-export-gguf"):
        (run / stage / ".done").write_text(json.dumps({"key": "k", "artifacts": []}))
    out = tmp_path / "scores.json"
    args = ["--tasks", "edgekd_choice", "--limit", "3", "--set", "eval.threads=1"]
    result = _run("eval", str(run), *args, "--json", str(out))
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["artifacts"]
    assert [(r["name"], r["runtime"]) for r in rows] == [
        ("teacher", "torch"),
        ("student", "torch"),
        ("student GGUF F16", "llama.cpp"),
    ]
    teacher = rows[0]["tasks"]["edgekd_choice"]["score"]
    for r in rows:
        s = r["tasks"]["edgekd_choice"]
        assert s["share"] == (s["score"] / teacher if teacher else None)
    assert rows[0]["params"] > rows[1]["params"] == rows[2]["params"]


def test_eval_bad_input_is_one_line(tmp_path, tiny_llama_gguf):
    gguf = str(tiny_llama_gguf[1])
    line = _error_line(_run("eval", gguf, "--tasks", "edgekd_choice", "--limit", "0"))
    assert "scores none" in line
    (tmp_path / "notes.txt").write_text("not a model")
    line = _error_line(_run("eval", str(tmp_path / "notes.txt"), "--tasks", "edgekd_choice"))
    assert "neither a .gguf file" in line
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_llama_gguf[1].read_bytes()[:4096])
    line = _error_line(_run("eval", str(cut), "--tasks", "edgekd_choice", "--limit", "1"))
    assert str(cut) in line
