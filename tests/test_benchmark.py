"""Measurements of one artifact: the child process, the verdict and projection arithmetic, and
`edgekd bench` (each runtime's own steps and byte counts are tested in tests/formats)."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekd import benchmark
from edgekd.benchmark import Artifact
from edgekd.cli import app
from edgekd.config import BenchSettings, load_profile
from edgekd.errors import EdgekdError
from edgekd.formats.runtime import TokenCost
from edgekd.testing import TOKEN_IDS


@pytest.mark.parametrize(
    ("reply", "answer", "ok"),
    [
        ("Leila spends 3 x 14 = 42 dollars.", "42", True),
        ("The answer is 42, not 41.", "42", False),  # the last number is the answer
        ("She has 1,000 cards.", "1000", True),
        ("No number here.", "7", False),
        ("It is 8.0 legs", "8", True),
        ("The capital of France is paris.", "Paris", True),
        ("Parisian food is good.", "Paris", False),
        ("Written by William  Shakespeare in 1597.", "William Shakespeare", True),
        ("Shakespeare wrote it.", "William Shakespeare", False),
    ],
)
def test_exact_match(reply, answer, ok):
    assert benchmark.exact_match(reply, answer) is ok


def test_pick_questions_alternates_categories_and_skips_trained():
    rows = [
        {"prompt": "a1", "category": "a", "answer": "1"},
        {"prompt": "a2", "category": "a", "answer": "2"},
        {"prompt": "a3", "category": "a", "answer": "3"},
        {"prompt": "open", "category": "b"},
        {"prompt": "b1", "category": "b", "answer": "x"},
        {"prompt": "c1", "category": "c", "answer": "y"},
    ]
    picked = [r["prompt"] for r in benchmark.pick_questions(rows, 4)]
    assert picked == ["a1", "b1", "c1", "a2"]
    picked = [r["prompt"] for r in benchmark.pick_questions(rows, 10, exclude={"a1", "c1"})]
    assert picked == ["a2", "b1", "a3"]
    assert benchmark.pick_questions(rows, 0) == []


def test_prompt_ids_has_the_exact_length():
    assert benchmark.prompt_ids([[1, 2], [3]], 7) == [1, 2, 3, 1, 2, 3, 1]
    assert benchmark.prompt_ids([[1, 2, 3, 4]], 2) == [1, 2]
    with pytest.raises(EdgekdError, match="no tokens"):
        benchmark.prompt_ids([[]], 4)


def test_speed_summary():
    s = benchmark.speed_summary([0.5, 0.25, 1.0], [2.0, 1.0, 4.0], n_prompt=100, n_decode=20)
    assert s["prompt_tps"] == {"median": 200.0, "min": 100.0, "max": 400.0, "n": 3}
    assert s["decode_tps"]["median"] == 10.0 and s["decode_tps"]["max"] == 20.0
    assert s["ttft_ms"]["median"] == 500.0


def test_budget_verdict_says_by_how_much():
    ok = benchmark.budget_verdict(300, 50, 400)
    assert ok["fits"] and ok["margin_bytes"] == 50 and ok["need_bytes"] == 350
    over = benchmark.budget_verdict(380, 50, 400)
    assert not over["fits"] and over["margin_bytes"] == -30


def _rss(key: str) -> int:
    return benchmark.rss_bytes(key)


@pytest.mark.slow
def test_child_measures_speed_memory_and_answers(tiny_llama_gguf, tmp_path):
    _, gguf_path = tiny_llama_gguf
    questions = [{"prompt": "What is 2 plus 2?", "category": "arithmetic", "answer": "4"}]
    job = benchmark.Job(
        runtime="llama.cpp",
        path=str(gguf_path),
        threads=1,
        n_ctx=128,
        prompt=TOKEN_IDS * 2,
        decode_tokens=6,
        runs=3,
        warmup_runs=1,
        questions=questions,
        answer_max_tokens=5,
    )
    out = benchmark.measure(job, tmp_path / "scratch")
    assert len(out["ttft_s"]) == len(out["decode_s"]) == 3
    assert all(t > 0 for t in out["ttft_s"] + out["decode_s"])
    assert out["baseline_rss_bytes"] < out["peak_rss_bytes"]
    # The child's own peak, not this (torch-laden) process's carried over an exec.
    assert out["peak_rss_bytes"] < _rss("VmHWM")
    assert out["quality"] is None
    item = out["exact_match"]["items"][0]
    assert out["exact_match"]["total"] == 1 and isinstance(item["reply"], str)
    assert item["correct"] == benchmark.exact_match(item["reply"], "4")


def test_child_failure_is_one_clear_error(tmp_path):
    job = benchmark.Job("llama.cpp", str(tmp_path / "missing.gguf"), 1, 64, [1, 2], 1, 1, 0, [], 1)
    with pytest.raises(EdgekdError, match=r"benchmark of .*missing\.gguf \(llama\.cpp\) failed"):
        benchmark.measure(job, tmp_path)


def test_artifact_row_arithmetic():
    profile = load_profile("phone-1gb")
    cost = TokenCost(
        weights_bytes=50 * 2**20, weights_read_bytes=40_000_000, kv_bytes_per_position=10_000
    )
    measured = {
        "ttft_s": [0.1, 0.2, 0.4],
        "decode_s": [1.0, 2.0, 0.5],
        "baseline_rss_bytes": 10,
        "peak_rss_bytes": 20,
        "load_s": 0.1,
        "quality": None,
        "exact_match": {"correct": 1, "total": 4, "items": []},
    }
    row = benchmark.artifact_row(
        Artifact("m", "llama.cpp", Path("m.gguf"), shipped=True),
        cost=cost,
        measured=measured,
        profile=profile,
        threads=2,
        host_bandwidth_bps=20e9,
        prompt_tokens=100,
        decode_tokens=21,
        size_bytes=123,
    )
    b = row["bandwidth"]
    assert b["at_tokens"] == 110 and b["bytes_per_token"] == 40_000_000 + 110 * 10_000
    assert b["host_limit_tps"] == pytest.approx(20e9 / 41_100_000)
    assert b["host_fraction"] == pytest.approx(21 / b["host_limit_tps"])
    gbs = profile.memory_bandwidth_gbs
    assert b["device_projection_tps"] == pytest.approx(gbs * 1e9 / 41_100_000)
    assert "projection" in b["device_projection_note"]
    assert f"{gbs:g} GB/s divided by the 41.1 MB" in b["device_projection_note"]
    v = row["budget"]
    budget, ctx = profile.memory_budget_mb * 2**20, profile.context_length
    assert v["kv_bytes"] == 10_000 * ctx and v["budget_bytes"] == budget
    assert v["fits"] and v["margin_bytes"] == budget - 50 * 2**20 - 10_000 * ctx
    assert row["exact_match"]["accuracy"] == 0.25

    teacher = {**row, "name": "t", "role": "teacher", "shipped": False}
    teacher["speed"] = {**row["speed"], "decode_tps": {**row["speed"]["decode_tps"], "median": 7}}
    host = benchmark.host_info(2, 20e9, 16)
    report = benchmark.bench_report(profile, BenchSettings(), host, [teacher, row], {})
    assert report["ratios"]["decode_vs_teacher"] == {"m": pytest.approx(21 / 7)}
    assert report["verdict"] == {"fits": True, "judged": ["m"]}


def test_host_bandwidth_is_plausible():
    bps = benchmark.host_bandwidth(16, threads=1, repeats=2)
    assert 1e8 < bps < 5e12


def test_bench_threads():
    assert benchmark.bench_threads(4, 3) == 3
    assert 1 <= benchmark.bench_threads(64, None) <= 64
    assert benchmark.bench_threads(1, None) == 1


@pytest.mark.slow
def test_bench_command_on_a_gguf(tiny_llama_gguf, tmp_path):
    _, gguf_path = tiny_llama_gguf
    out = tmp_path / "bench.json"
    sets = [
        "bench.runs=2",
        "bench.warmup_runs=0",
        "bench.prompt_tokens=16",
        "bench.decode_tokens=4",
        "bench.questions=1",
        "bench.answer_max_tokens=4",
        "bench.threads=1",
        "bench.bandwidth_mib=16",
    ]
    args = ["bench", str(gguf_path), "--profile", "phone-1gb", "--json", str(out)]
    result = CliRunner().invoke(app, args + [a for s in sets for a in ("--set", s)])
    assert result.exit_code == 0, result.output
    assert "PASS model-F16.gguf" in result.output and "projection" in result.output
    report = json.loads(out.read_text())
    (row,) = report["artifacts"]
    assert row["runtime"] == "llama.cpp" and row["quality"] is None
    assert row["speed"]["decode_tps"]["n"] == 2 and row["exact_match"]["total"] == 1
    assert report["verdict"]["fits"]


def test_bench_command_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(
        app, ["bench", str(tmp_path / "nope.gguf"), "--profile", "phone-1gb"]
    )
    assert result.exit_code == 2 and "does not exist" in result.output
    result = CliRunner().invoke(app, ["bench", str(tmp_path), "--profile", "phone-1gb"])
    assert result.exit_code == 2 and "neither a .gguf" in result.output
