"""The HTML build report: verdict, plots, labels and escaping, and a real render in headless
Chromium whose screenshot must show the verdict banner, the plots and the budget line."""

import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from rich.console import Console

from edgekd import benchmark, harness
from edgekd.benchmark import Artifact
from edgekd.config import BenchSettings, load_profile
from edgekd.formats.runtime import TokenCost
from edgekd.report import html, summary

CHROMIUM = Path("/usr/bin/chromium")
PLOTS = (
    "plot-loss",
    "plot-quality",
    "plot-size-quality",
    "plot-memory",
    "plot-speed",
    "plot-retention",
)
MB = 2**20


def _row(name, role, weights_mb, decode_s, shipped, kld):
    """A report row through the real arithmetic, from made-up child measurements."""
    profile = load_profile("phone-1gb")
    cost = TokenCost(int(weights_mb * MB), int(weights_mb * MB * 0.95), 15_360)
    measured = {
        "ttft_s": [0.30, 0.25, 0.40],
        "decode_s": decode_s,
        "baseline_rss_bytes": 40 * MB,
        "peak_rss_bytes": int((weights_mb + 120) * MB),
        "load_s": 0.2,
        "quality": {"ppl": 9.0 + 10 * kld, "kld": kld, "top1": 1 - kld, "tokens": 900},
        "exact_match": {
            "correct": 1,
            "total": 2,
            "items": [
                {
                    "prompt": "What is 2 plus 3?",
                    "answer": "5",
                    "reply": "2 + 3 = 5",
                    "correct": True,
                },
                {
                    "prompt": "Capital of Peru?",
                    "answer": "Lima",
                    "reply": "Cusco",
                    "correct": False,
                },
            ],
        },
    }
    return benchmark.artifact_row(
        Artifact(name, "llama.cpp", Path(__file__), role=role, shipped=shipped),
        cost=cost,
        measured=measured,
        profile=profile,
        threads=2,
        host_bandwidth_bps=20e9,
        prompt_tokens=128,
        decode_tokens=32,
        size_bytes=cost.weights_bytes,
    )


def _with_tasks(rows: list[dict], scores: list[float], params: list[int]) -> list[dict]:
    """Task scores on each row (one task, stderr and time made up), shares by the real rule."""
    for row, score, n in zip(rows, scores, params, strict=True):
        row["params"] = n
        row["tasks"] = {
            "edgekd_choice": harness.TaskScore(
                "edgekd_choice", "acc", score, 0.05, 20, 3.0
            ).as_dict()
        }
    harness.add_shares(rows)
    return rows


def _report(student_mb=60.0, with_bench=True, name="student GGUF Q4_K_M"):
    profile = load_profile("phone-1gb")
    curve = [{"step": s, "loss": 3.0 / s, "kd": 2.5 / s, "ce": 4.0 / s} for s in range(1, 11)]
    stages = {
        "distill": {
            "quality": {
                "teacher": {"ppl": 9.0, "kld": 0.0, "top1": 1.0, "tokens": 900},
                "student before": {"ppl": 30.0, "kld": 1.2, "top1": 0.55, "tokens": 900},
                "student after": {"ppl": 12.0, "kld": 0.3, "top1": 0.8, "tokens": 900},
            }
        },
        "export_gguf": {
            "quality": {
                "gguf Q4_K_M (llama.cpp)": {"ppl": 13.0, "kld": 0.4, "top1": 0.77, "tokens": 900}
            }
        },
    }
    keys = {"distill": "k1", "export_gguf": "k2"}
    if with_bench:
        rows = [
            _row("teacher GGUF", "teacher", 94.0, [1.0, 1.1, 0.9], False, 0.0005),
            _row(name, "export", student_mb, [0.5, 0.6, 0.45], True, 0.4),
        ]
        _with_tasks(rows, [0.5, 0.4], [135_000_000, 60_000_000])
        host = benchmark.host_info(2, 20e9, 256)
        questions = benchmark.questions_note(2, 144, 30, 40)
        bench = benchmark.bench_report(profile, BenchSettings(), host, rows, questions)
        stages["bench"] = {**bench, "inputs": dict(keys)}
        keys["bench"] = "k3"
    profiles = {n: load_profile(n) for n in ("phone-1gb", "phone-4gb")}
    identity = {"profile": profile.model_dump(mode="json"), "teacher": "embedded"}
    return summary.build_report(identity, stages, {"distill": curve}, keys, profiles)


class _Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: dict[str, dict] = {}
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if "id" in attrs:
            self.ids[attrs["id"]] = {"tag": tag, **attrs}

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Elements:
    parser = _Elements()
    parser.feed(page)
    return parser


def test_page_has_the_verdict_the_plots_and_nothing_external():
    page = html.render(_report())
    els = _parse(page)
    assert els.ids["verdict"]["class"] == "verdict pass"
    text = " ".join(" ".join(els.text).split())
    assert "PASS: phone-1gb" in text
    ctx = load_profile("phone-1gb").context_length
    kv = 15_360 * ctx / MB
    assert (
        f"PASS student GGUF Q4_K_M: weights 60.0 MB + KV cache {kv:.1f} MB at {ctx} tokens" in text
    )
    for plot in PLOTS:
        assert els.ids[plot]["tag"] == "svg"
    assert els.ids["bench-table"]["tag"] == "table"
    assert "script" not in els.tags and "link" not in els.tags and "img" not in els.tags
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert page.isascii()
    # the budget line and the projection are drawn and labelled
    assert f"phone-1gb budget {load_profile('phone-1gb').memory_budget_mb} MB" in text
    assert "PROJECTION for phone-1gb" in text
    # the task table: each artifact's score with its stderr and its share of the teacher's
    assert els.ids["task-table"]["tag"] == "table"
    assert "0.400 ± 0.050" in text and "80%" in text
    assert "compression 1.57x, 80% of the teacher's score, 60M params" in text
    # ratios measured in this report: student 2 runs faster than the teacher's median
    assert "2.00x" in text and "decode speed, student GGUF Q4_K_M / teacher" in text


def test_failing_artifact_says_by_how_much():
    p = load_profile("phone-1gb")
    kv = 15_360 * p.context_length / MB
    page = html.render(_report(student_mb=p.memory_budget_mb + 20 - kv))
    els = _parse(page)
    assert els.ids["verdict"]["class"] == "verdict fail"
    text = " ".join(" ".join(els.text).split())
    assert "FAIL: phone-1gb" in text
    budget = p.memory_budget_mb
    assert f"= {budget + 20:.1f} MB of the {budget:.1f} MB budget, over by 20.0 MB" in text
    assert "does not fit" in text  # the profiles table: phone-1gb does not fit


def test_page_without_a_bench_still_shows_training_and_quality():
    page = html.render(_report(with_bench=False))
    els = _parse(page)
    assert els.ids["verdict"]["class"] == "verdict none"
    assert "plot-loss" in els.ids and "plot-quality" in els.ids
    assert "plot-memory" not in els.ids


def test_names_and_replies_are_escaped():
    page = html.render(_report(name="<b>evil</b> & co"))
    assert "<b>evil</b>" not in page
    assert "&lt;b&gt;evil&lt;/b&gt; &amp; co" in page


def test_stale_bench_is_flagged():
    report = _report()
    stale = summary.build_report(
        {"profile": report["profile"], "teacher": "embedded"},
        {**report["stages"]},
        report["loss_curves"],
        {"distill": "rebuilt", "export_gguf": "k2", "bench": "k3"},
        {},
    )
    assert stale["bench_stale_inputs"] == ["distill"]
    assert "measured an earlier build of distill" in html.render(stale)


def test_qat_recovery_is_shown_in_page_and_terminal():
    report = _report()
    recovery = {
        "measured_in": "llama.cpp",
        "kld_full_precision": 0.3,
        "gap_before": 0.2,
        "gap_after": 0.05,
        "recovered": 0.75,
        "gap_after_own_weights": 0.1,
        "recovered_own_weights": 0.5,
    }
    stages = {**report["stages"], "qat_kd": {"stage": "qat_kd", "recovery": recovery}}
    with_qat = summary.build_report(
        {"profile": report["profile"], "teacher": "embedded"},
        stages,
        report["loss_curves"],
        {"distill": "k1", "export_gguf": "k2", "bench": "k3", "qat_kd": "k4"},
        {},
    )
    assert with_qat["qat_recovery"] == recovery
    els = _parse(html.render(with_qat))
    assert els.ids["qat-recovery"]["tag"] == "table"
    assert "75.0%" in " ".join(els.text) and "50.0%" in " ".join(els.text)
    line = summary.recovery_line(recovery)
    assert "recovered 75.0% of the Q4_K_M quantization gap" in line
    assert "own float weights the gap is 0.1000 (50.0% recovered)" in line
    assert "qat-recovery" not in _parse(html.render(report)).ids


def test_report_says_how_each_artifact_was_quantized():
    report = _report()
    stages = {
        **report["stages"],
        "qat_kd": {"fake_quantizer": "llama.cpp's imatrix-weighted search"},
        "export_gguf": {
            "quant": "Q4_K_M",
            "method": {
                "quantizer": "edgekd's importance-weighted search (llama.cpp's imatrix path)",
                "imatrix": "imatrix.gguf",
                "imatrix_made_by": "export_gguf (its input model)",
                "dataset": "chat.jsonl (training split)",
                "chunks": 12,
                "chunk_size": 512,
                "tensors": {"imatrix": 140, "llama.cpp": 1},
            },
        },
        "export_onnx": {
            "quant": ["int4"],
            "method": {"int4": "onnxruntime MatMulNBits hqq", "int8": "unused"},
        },
    }
    built = summary.build_report(
        {"profile": report["profile"], "teacher": "embedded"}, stages, {}, {}, {}
    )
    lines = built["quantization"]
    assert lines[0] == "qat_kd trained against llama.cpp's imatrix-weighted search fake quantizer"
    assert "made by export_gguf (its input model) on chat.jsonl (training split)" in lines[1]
    assert lines[1].endswith("140 imatrix, 1 llama.cpp")
    assert lines[2:] == ["ONNX int4: onnxruntime MatMulNBits hqq"]  # int8 was not exported
    els = _parse(html.render(built))
    assert els.ids["quantization"]["tag"] == "ul"
    assert "quantization" not in _parse(html.render(report)).ids


def test_nice_ticks_cover_the_range():
    ticks = html._nice_ticks(0, 0.0073)
    assert ticks[0] == 0 and ticks[-1] >= 0.0073 and len(ticks) <= 7
    assert html._nice_ticks(5, 5)[-1] > 5


def _png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Width, height and RGB(A) rows of an 8-bit non-interlaced PNG (what Chromium writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and interlace == 0 and colour in (2, 6)
            bpp = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride = zlib.decompress(idat), width * bpp
    rows, prev = [], bytes(stride)
    for y in range(height):
        kind, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(r[i] for i in range(len(r)) if i % bpp < 3) for r in rows]


def _has_colour(rows: list[bytes], rgb: tuple[int, int, int], y0: int = 0, y1: int | None = None):
    needle = bytes(rgb)
    return sum(1 for row in rows[y0:y1] for i in range(0, len(row), 3) if row[i : i + 3] == needle)


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_chromium_renders_verdict_and_plots(tmp_path):
    page = tmp_path / "report.html"
    page.write_text(html.render(_report()))
    shot = tmp_path / "shot.png"
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",  # tests may run as root in CI containers
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,2600",
        "--force-device-scale-factor=0.5",  # a 640 x 1300 image: quicker to decode here
        f"--screenshot={shot}",
        page.as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), done.stderr[-2000:]
    width, height, rows = _png_pixels(shot)
    assert (width, height) == (640, 1300)
    # not blank: many distinct colours, and ink (neither white nor the page's background)
    sample = [row[i : i + 3] for row in rows[::4] for i in range(0, len(row), 12)]
    assert len(set(sample)) > 20
    ink = sum(p not in (b"\xff\xff\xff", b"\xf8\xfa\xfc") for p in sample)
    assert ink > 0.05 * len(sample)
    # the green PASS banner's border near the top, plot lines in blue, the red budget line
    assert _has_colour(rows, (0x16, 0xA3, 0x4A), 0, 200) > 50
    assert _has_colour(rows, (0x25, 0x63, 0xEB)) > 200
    assert _has_colour(rows, (0xDC, 0x26, 0x26)) > 10


def test_retention_plot_without_a_teacher_score_says_so():
    report = _report()
    for row in report["bench"]["artifacts"]:
        row["tasks"]["edgekd_choice"]["share"] = None
    els = _parse(html.render(report))
    assert "no task score with a teacher" in " ".join(els.text)
    assert "task-table" in els.ids


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_chromium_renders_the_retention_chart(tmp_path):
    """The chart alone in a page: the teacher's point (first colour) at 100% and the student's
    (second colour), drawn as filled circles."""
    artifacts = _report()["bench"]["artifacts"]
    page = tmp_path / "chart.html"
    page.write_text(f"<!DOCTYPE html><html><body>{html.retention_plot(artifacts)}</body></html>")
    shot = tmp_path / "chart.png"
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1120,360",
        f"--screenshot={shot}",
        page.as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), done.stderr[-2000:]
    _, _, rows = _png_pixels(shot)
    teacher, student = (0x25, 0x63, 0xEB), (0xEA, 0x58, 0x0C)
    # a filled point of radius 14 (the teacher, most parameters) and a smaller one
    assert _has_colour(rows, teacher) > 300
    assert _has_colour(rows, student) > 100


def test_speculative_acceptance_in_the_page_and_the_terminal():
    report = _report()
    assert "speculative" not in _parse(html.render(report)).ids
    report["bench"]["speculative"] = {
        "draft_len": 4,
        "prompts": 8,
        "max_new_tokens": 32,
        "rounds": 100,
        "drafted": 400,
        "accepted": 250,
        "acceptance_rate": 0.625,
        "mean_accepted_length": 2.5,
        "tokens_per_target_forward": 3.5,
        "note": "both models in torch",
    }
    els = _parse(html.render(report))
    text = " ".join(" ".join(els.text).split())
    assert "speculative" in els.ids
    assert "2.50 / 4" in text and "62% of drafted tokens accepted" in text
    assert "3.50 tokens per teacher pass" in text
    console = Console(record=True, width=300)
    summary.print_bench(report["bench"], console)
    assert "mean accepted length 2.50 of 4" in console.export_text()
