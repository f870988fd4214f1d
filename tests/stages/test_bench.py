"""The bench stage on a tiny build: every artifact measured in its own runtime, the verdict, the
build report and its HTML page, `edgekd report`, and a bench made stale by a rebuilt stage."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from edgekd import pipeline
from edgekd.cli import app
from edgekd.config import load_profile
from edgekd.errors import EdgekdError
from edgekd.report import summary
from tests.stages.conftest import fast_recipe

STAGES = ["distill", "export_gguf", "export_onnx", "bench"]
SMALL = [
    "qlora.enabled=false",
    "qat_kd.enabled=false",
    "eval.threads=1",
    "bench.runs=2",
    "bench.artifacts=all",
    "bench.warmup_runs=0",
    "bench.prompt_tokens=24",
    "bench.decode_tokens=4",
    "bench.questions=2",
    "bench.answer_max_tokens=4",
    "bench.threads=1",
    "bench.bandwidth_mib=16",
    "bench.speculative.prompts=2",
    "bench.speculative.max_tokens=6",
    "bench.task_limit=2",
]


def _build(teacher, data, run, extra=(), stages=STAGES[1:]):
    recipe = fast_recipe(teacher, data, [*SMALL, *extra])
    return pipeline.build(load_profile("phone-1gb"), recipe, run, list(stages))


@pytest.fixture(scope="module")
def built(distilled_run, tiny_teacher_dir, tmp_path_factory):
    """The shared distilled run, exported and benchmarked once for this module."""
    source, data = distilled_run
    run = tmp_path_factory.mktemp("bench") / "run"
    shutil.copytree(source, run)
    return run, data, _build(tiny_teacher_dir, data, run)


@pytest.mark.slow
def test_bench_measures_every_artifact(built):
    run, _, outcome = built
    assert outcome["bench"] == "ran"
    report = json.loads((run / "06-bench" / "report.json").read_text())
    rows = {r["name"]: r for r in report["artifacts"]}
    expected = {
        "teacher": "torch",
        "student": "torch",
        "student GGUF F16": "llama.cpp",
        "student GGUF Q4_K_M": "llama.cpp",
        "student ONNX fp32": "onnxruntime",
        "student ONNX int4": "onnxruntime",
    }
    if (run / "05-export-onnx" / "genai-int4").is_dir():
        expected["student ONNX genai-int4"] = "onnxruntime-genai"
    assert {n: r["runtime"] for n, r in rows.items()} == expected
    assert [n for n, r in rows.items() if r["shipped"]] == [
        "student GGUF Q4_K_M",
        "student ONNX int4",
    ]
    for r in rows.values():
        assert r["speed"]["decode_tps"]["n"] == 2 and r["speed"]["prompt_tokens"] == 24
        assert r["memory"]["peak_rss_bytes"] > r["memory"]["baseline_rss_bytes"] > 0
        assert r["exact_match"]["total"] == 2
        assert r["budget"]["context_length"] == load_profile("phone-1gb").context_length
        assert r["threads"] == 1
        assert r["size_bytes"] >= r["weights_bytes"] > 0
        # the shipped harness tasks on every artifact, with its share of the teacher's score
        assert set(r["tasks"]) == {"edgekd_choice", "edgekd_answer"}
        for task, s in r["tasks"].items():
            assert s["n"] == 2 and s["seconds"] > 0 and 0 <= s["score"] <= 1, (task, s)
            teacher = rows["teacher"]["tasks"][task]["score"]
            assert s["share"] == (s["score"] / teacher if teacher > 0 else None)
        assert r["params"] is None or r["params"] > 0
    spec = report["speculative"]
    assert spec["draft_len"] == 4 and spec["prompts"] == 2 and spec["rounds"] >= 2
    assert 0 <= spec["acceptance_rate"] <= 1
    assert spec["mean_accepted_length"] == pytest.approx(4 * spec["acceptance_rate"])
    # The teacher against its own reference; the full-precision student in torch and in its
    # exact exports agree with each other.
    assert rows["teacher"]["quality"]["kld"] < 1e-3
    student = rows["student"]["quality"]
    for name in ("student GGUF F16", "student ONNX fp32"):
        assert rows[name]["quality"]["kld"] == pytest.approx(student["kld"], rel=0.05, abs=2e-3)
    assert rows["student GGUF Q4_K_M"]["size_bytes"] < rows["student GGUF F16"]["size_bytes"]
    assert rows["student ONNX int4"]["size_bytes"] < rows["student ONNX fp32"]["size_bytes"]
    # The teacher is a folder outside the run; exports are shown relative to the run folder.
    assert rows["student GGUF Q4_K_M"]["path"] == "04-export-gguf/model-Q4_K_M.gguf"
    assert report["verdict"]["fits"]
    assert set(report["ratios"]["decode_vs_teacher"]) == set(rows) - {"teacher"}
    assert set(report["inputs"]) == {"distill", "export_gguf", "export_onnx"}
    assert report["questions"]["asked"] == 2
    # An export's held-out scores are the ones its stage measured on the same slice, reported
    # rather than measured again; what no stage scored (the teacher, the student) bench measures.
    for stage, name, key in (
        ("04-export-gguf", "student GGUF Q4_K_M", "gguf Q4_K_M (llama.cpp)"),
        ("05-export-onnx", "student ONNX int4", "onnx int4 (onnxruntime)"),
    ):
        scored = json.loads((run / stage / "report.json").read_text())["quality"][key]
        assert rows[name]["quality"] == scored
        assert rows[name]["quality_from"] == stage[3:].replace("-", "_")
    assert "quality_from" not in rows["student"] and rows["student"]["quality"]["tokens"] > 0
    # The stage's quality rows are the bench's own measurements.
    assert (
        report["quality"]["student ONNX int4 (onnxruntime)"] == rows["student ONNX int4"]["quality"]
    )
    assert not list((run / "06-bench").glob("scratch-*"))


@pytest.mark.slow
def test_build_report_and_html(built):
    run, _, _ = built
    report = json.loads((run / "report.json").read_text())
    assert set(report["stages"]) == set(STAGES)
    assert report["bench_stale_inputs"] == []
    assert [q["model"] for q in report["quality"]][:3] == [
        "teacher",
        "student before",
        "student after",
    ]
    assert report["loss_curves"]["distill"][-1]["step"] == 4
    verdicts = {v["profile"]: v for v in report["profile_verdicts"]}
    assert set(verdicts) == {"phone-1gb", "phone-4gb", "sbc-8gb", "laptop-cpu"}
    assert all(v["fits"] for v in verdicts.values())  # a tiny model fits everywhere
    page = (run / "report.html").read_text()
    assert 'id="verdict" class="verdict pass"' in page
    for plot in ("plot-loss", "plot-quality", "plot-size-quality", "plot-memory", "plot-speed"):
        assert f'<svg id="{plot}"' in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "<script" not in page


@pytest.mark.slow
def test_report_command_prints_the_summary(built):
    run, _, _ = built
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "PASS student GGUF Q4_K_M" in out and "PASS student ONNX int4" in out
    assert f"HTML report: {run / 'report.html'}" in out
    assert "projection for phone-1gb" in out


def test_report_command_refuses_a_folder_without_a_build(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "holds no edgekd build" in result.output


@pytest.mark.slow
def test_rebuilt_stage_makes_the_bench_stale(built, tiny_teacher_dir, tmp_path):
    run, corpus, _ = built
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    _build(tiny_teacher_dir, corpus, copy, ["distill.lr=1e-3"], stages=["distill"])
    report = summary.gather(copy)
    assert report["bench_stale_inputs"] == ["distill"]
    page = (copy / "report.html").read_text()
    assert "measured an earlier build of distill" in page


@pytest.mark.slow
def test_bench_refuses_a_prompt_longer_than_the_context(built, tiny_teacher_dir, tmp_path):
    run, corpus, _ = built
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ctx = load_profile("phone-1gb").context_length
    longer = [f"bench.prompt_tokens={ctx - 8}", "bench.decode_tokens=16"]
    with pytest.raises(EdgekdError, match=rf"bench.prompt_tokens \({ctx - 8}\) .* context_length"):
        _build(tiny_teacher_dir, corpus, copy, longer, stages=["bench"])
