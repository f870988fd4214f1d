"""The build report: every finished stage's report.json gathered into one, and its terminal summary.

Nothing here measures: it arranges what the stages wrote. Budget verdicts for other profiles are
arithmetic on the measured artifacts' sizes (weights + KV cache at each profile's context), and
say so.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgekd import atomic
from edgekd.benchmark import MIB, budget_verdict
from edgekd.config import Profile, known_profiles, load_profile
from edgekd.report.html import render
from edgekd.report.text import (
    capped_line,
    device_faults,
    mb,
    projection_line,
    remote_line,
    score_text,
    share_text,
    side_by_side,
    speculative_line,
    spread_text,
    verdict_line,
)
from edgekd.rundir import BUILD_FILE, REPORT_HTML, REPORT_JSON, read_done, read_json
from edgekd.stages import SPECS
from edgekd.stages import get as spec_of


def finished_stages(run_dir: Path) -> dict[str, Path]:
    """The stage folders of a run that hold a finished stage, in stage order."""
    found = {}
    for spec in SPECS:
        folder = Path(run_dir) / spec.folder
        if read_done(folder) is not None and (folder / REPORT_JSON).is_file():
            found[spec.name] = folder
    return found


def _read_curve(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def profile_verdicts(bench: dict, profiles: dict[str, Profile]) -> list[dict]:
    """The bench's device artifacts against each profile's budget: measured weights bytes + KV
    cache bytes at that profile's context (computed, not run on the device)."""
    rows = [r for r in bench["artifacts"] if r["shipped"]] or [
        r for r in bench["artifacts"] if r["role"] == "export"
    ]
    out = []
    for name, p in profiles.items():
        checks = []
        for r in rows:
            v = budget_verdict(
                r["weights_bytes"],
                r["kv_bytes_per_token"] * p.context_length,
                p.memory_budget_mb * MIB,
            )
            checks.append({"artifact": r["name"], **v})
        out.append(
            {
                "profile": name,
                "context_length": p.context_length,
                "budget_mb": p.memory_budget_mb,
                "fits": bool(checks) and all(c["fits"] for c in checks),
                "artifacts": checks,
            }
        )
    return out


def build_report(
    identity: dict,
    stages: dict[str, dict],
    curves: dict[str, list[dict]],
    keys: dict[str, str],
    profiles: dict[str, Profile],
) -> dict:
    """One report from the stages' reports: quality from teacher to final artifact, loss curves,
    the bench (flagged stale when a stage it measured was rebuilt after it) and the verdicts."""
    quality = [
        {"stage": stage, "model": model, **q}
        for stage, report in stages.items()
        if stage != "bench"
        for model, q in report.get("quality", {}).items()
    ]
    bench = stages.get("bench")
    stale = []
    if bench is not None:
        stale = [s for s, k in bench.get("inputs", {}).items() if keys.get(s) != k]
    return {
        "profile": identity.get("profile", bench["profile"] if bench else {}),
        "teacher": identity.get("teacher"),
        "stages": stages,
        "loss_curves": curves,
        "quality": quality,
        "bench": bench,
        "bench_stale_inputs": stale,
        "profile_verdicts": profile_verdicts(bench, profiles) if bench else [],
        "qat_recovery": stages.get("qat_kd", {}).get("recovery"),
        "quantization": quantization_methods(stages),
    }


def quantization_methods(stages: dict[str, dict]) -> list[str]:
    """How each export made its artifacts, one line per artifact kind (from the stages' reports)."""
    lines = []
    if "fake_quantizer" in stages.get("qat_kd", {}):
        lines.append(f"qat_kd trained against {stages['qat_kd']['fake_quantizer']} fake quantizer")
    gguf = stages.get("export_gguf", {})
    if "method" in gguf:
        m = gguf["method"]
        line = f"GGUF {gguf['quant']}: {m['quantizer']}"
        if "imatrix" in m:
            line += (
                f", {m['imatrix']} made by {m['imatrix_made_by']} on {m['dataset']}, "
                f"{m['chunks']} chunks of {m['chunk_size']} tokens; tensors: "
                + ", ".join(f"{n} {k}" for k, n in m["tensors"].items())
            )
        lines.append(line)
    for kind, method in stages.get("export_onnx", {}).get("method", {}).items():
        if kind in stages["export_onnx"].get("quant", []):
            lines.append(f"ONNX {kind}: {method}")
    return lines


def gather(run_dir: Path) -> dict:
    """The build report of a run folder, from its finished stages."""
    run_dir = Path(run_dir)
    build_file = run_dir / BUILD_FILE
    changed = "it was changed after edgekd wrote it; rerun the build with --force"
    identity = read_json(build_file, changed) if build_file.is_file() else {}
    folders = finished_stages(run_dir)
    stages = {s: read_json(f / REPORT_JSON, changed) for s, f in folders.items()}
    curves = {
        s: _read_curve(f / "loss_curve.jsonl")
        for s, f in folders.items()
        if spec_of(s).kind == "train" and (f / "loss_curve.jsonl").is_file()
    }
    keys = {s: read_done(f)["key"] for s, f in folders.items()}
    profiles = {name: load_profile(name) for name in sorted(known_profiles())}
    report = build_report(identity, stages, curves, keys, profiles)
    report["run_dir"] = str(run_dir)
    return report


def write(run_dir: Path) -> tuple[dict, Path]:
    """Write the build's report.json and report.html; returns the report and the HTML path."""
    run_dir = Path(run_dir)
    report = gather(run_dir)
    atomic.write_json(run_dir / REPORT_JSON, report)
    html_path = run_dir / REPORT_HTML
    atomic.write_text(html_path, render(report))
    return report, html_path


# ---------------------------------------------------------------------------------------------
# Terminal


def _table(title: str, cols: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for i, col in enumerate(cols):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def bench_tables(bench: dict) -> list[Table]:
    """Two tables of a bench report: speed on this host, then memory and accuracy."""
    arts = bench["artifacts"]
    names = [("* " if r["shipped"] else "") + r["name"] for r in arts]
    speed = _table(
        f"speed on this host, {bench['host']['threads']} threads: median (min-max)",
        ["artifact", "runtime", "prompt tok/s", "decode tok/s", "TTFT ms", "of BW limit"],
        [
            [
                n,
                r["runtime"],
                spread_text(r["speed"]["prompt_tps"]),
                spread_text(r["speed"]["decode_tps"]),
                spread_text(r["speed"]["ttft_ms"]),
                f"{100 * r['bandwidth']['host_fraction']:.0f}%",
            ]
            for n, r in zip(names, arts, strict=True)
        ],
    )
    rows = []
    for n, r in zip(names, arts, strict=True):
        q, em = r["quality"], r["exact_match"]
        rows.append(
            [
                n,
                mb(r["size_bytes"]),
                mb(r["budget"]["need_bytes"]),
                mb(r["memory"]["peak_rss_bytes"]),
                "-" if q is None else f"{q['kld']:.4f}",
                "-" if q is None else f"{q['top1']:.3f}",
                "-" if q is None else f"{q['ppl']:.2f}",
                f"{em['correct']}/{em['total']}" if em["total"] else "-",
            ]
        )
    memory = _table(
        "memory (MB) and accuracy",
        ["artifact", "disk", "weights+KV", "peak RSS", "kld", "top1", "ppl", "exact"],
        rows,
    )
    tables = [speed, memory]
    if any(r.get("tasks") for r in arts):
        tables.append(task_table(arts))
    return tables


def task_table(rows: list[dict]) -> Table:
    """lm-evaluation-harness task scores: one line per artifact and task."""
    return _table(
        "task scores (lm-evaluation-harness; ± its standard error)",
        ["artifact", "runtime", "task", "metric", "score", "of teacher", "n", "seconds"],
        [
            [
                r["name"],
                r["runtime"],
                task,
                s["metric"],
                score_text(s),
                share_text(s),
                str(s["n"]),
                f"{s['seconds']:.1f}",
            ]
            for r in rows
            for task, s in (r.get("tasks") or {}).items()
        ],
    )


def side_by_side_table(bench: dict) -> Table | None:
    """Each device artifact on this host, under the budget's cap, and on the device."""
    found = side_by_side(bench)
    if found is None:
        return None
    cols, rows = found
    return _table("host, capped host and device, side by side: median (min-max)", cols, rows)


def print_device(bench: dict, console: Console) -> None:
    """The side-by-side table, the device, its projection error and the remote path's cost."""
    table = side_by_side_table(bench)
    if table is not None:
        console.print(table)
    device = bench.get("device")
    if not device:
        return
    if device.get("info_line"):
        console.print(
            f"device {device['name']}: {device['info_line']}, {device['threads']} threads",
            highlight=False,
        )
    bandwidth = bench["profile"]["memory_bandwidth_gbs"]
    for row in device["rows"]:
        console.print(projection_line(row, bandwidth), highlight=False)
        console.print(remote_line(device, row), highlight=False)
    for line in device_faults(bench):
        console.print(f"[red]device fault:[/] {line}", highlight=False, soft_wrap=True)


def print_bench(bench: dict, console: Console) -> None:
    """Verdict lines, the table, the ratios and the host, for one bench report."""
    p = bench["profile"]
    for r in bench["artifacts"]:
        if r["shipped"]:
            colour = "green" if r["budget"]["fits"] else "red"
            console.print(f"[{colour}]{verdict_line(r)} (estimate)[/]", highlight=False)
            if line := capped_line(r):
                fits = (r.get("capped") or {}).get("fits")
                colour = "green" if fits else "red" if fits is False else "yellow"
                console.print(f"[{colour}]{line}[/]", highlight=False)
    if not any(r["shipped"] for r in bench["artifacts"]):
        console.print("no device artifact (GGUF/ONNX in the profile's formats) was judged")
    for table in bench_tables(bench):
        console.print(table)
    print_device(bench, console)
    if bench.get("speculative"):
        console.print(speculative_line(bench["speculative"]), highlight=False)
    host = bench["host"]
    console.print(
        f"host: {host['cpu']}, {host['cores']} cores, {host['threads']} threads, memory "
        f"bandwidth {host['bandwidth_bps'] / 1e9:.1f} GB/s ({host['bandwidth_note']}), "
        f"load average {host['load_average']:.1f} at the start",
        highlight=False,
    )
    teacher_ratio = bench["ratios"].get("decode_vs_teacher", {})
    for r in bench["artifacts"]:
        if r["shipped"]:
            b = r["bandwidth"]
            vs = teacher_ratio.get(r["name"])
            console.print(
                f"{r['name']}: decode {'' if vs is None else f'{vs:.2f}x the teacher, '}"
                f"{100 * b['host_fraction']:.0f}% of this host's bandwidth limit "
                f"({b['host_limit_tps']:.0f} tok/s); projection for {p['name']}: "
                f"{b['device_projection_tps']:.0f} tok/s",
                highlight=False,
            )
    console.print(
        f"* judged against {p['name']}'s {p['memory_budget_mb']} MB budget. Speeds: "
        f"{bench['settings']['runs']} runs of {bench['settings']['prompt_tokens']} prompt + "
        f"{bench['settings']['decode_tokens']} decoded tokens. A projection is the profile's "
        f"{p['memory_bandwidth_gbs']:g} GB/s over the bytes read per token, not a measurement.",
        highlight=False,
    )


def recovery_line(rec: dict) -> str:
    """qat_kd's effect on the exported Q4_K_M model, in one line."""
    share = "n/a (no gap to recover)" if rec["recovered"] is None else f"{rec['recovered']:.1%}"
    line = (
        f"qat_kd recovered {share} of the Q4_K_M quantization gap in kld ({rec['measured_in']}): "
        f"gap {rec['gap_before']:.4f} before, {rec['gap_after']:.4f} after, full-precision "
        f"student {rec['kld_full_precision']:.4f}"
    )
    if rec.get("recovered_own_weights") is not None:
        line += (
            f"; against its own float weights the gap is {rec['gap_after_own_weights']:.4f} "
            f"({rec['recovered_own_weights']:.1%} recovered)"
        )
    return line


def print_summary(report: dict, console: Console, html_path: Path | None = None) -> None:
    """The end-of-build summary: verdict, bench table, other profiles, the HTML path."""
    bench = report["bench"]
    for line in report.get("quantization", []):
        console.print(line, highlight=False)
    if report.get("qat_recovery"):
        console.print(recovery_line(report["qat_recovery"]), highlight=False)
    if bench is None:
        console.print("No bench stage in this run: no speed, memory or budget verdict.")
    else:
        if report["bench_stale_inputs"]:
            console.print(
                "[yellow]warning:[/] the bench measured an earlier build of "
                f"{', '.join(report['bench_stale_inputs'])}; run the bench stage again"
            )
        print_bench(bench, console)
        fits = [
            f"{v['profile']} {'fits' if v['fits'] else 'does NOT fit'}"
            for v in report["profile_verdicts"]
        ]
        console.print(
            "shipped profiles (weights + KV cache at each profile's context, computed): "
            + ", ".join(fits),
            highlight=False,
        )
    if html_path is not None:
        console.print(f"HTML report: {html_path}", highlight=False, soft_wrap=True)
