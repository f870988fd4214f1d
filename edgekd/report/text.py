"""The phrases a build report is written in, shared by the terminal summary and the HTML page."""

from __future__ import annotations

from edgekd.benchmark import MIB


def mb(n: float) -> str:
    return f"{n / MIB:.1f}"


def _num(x: float) -> str:
    return f"{x:.1f}" if abs(x) < 100 else f"{x:.0f}"


def spread_text(s: dict) -> str:
    """'median (min-max)' of a spread."""
    return f"{_num(s['median'])} ({_num(s['min'])}-{_num(s['max'])})"


def verdict_line(row: dict) -> str:
    """'PASS/FAIL name: weights + KV = need of budget, margin' for one artifact."""
    b = row["budget"]
    margin = b["margin_bytes"]
    how = f"{mb(margin)} MB to spare" if margin >= 0 else f"over by {mb(-margin)} MB"
    return (
        f"{'PASS' if b['fits'] else 'FAIL'} {row['name']}: weights {mb(b['weights_bytes'])} MB "
        f"+ KV cache {mb(b['kv_bytes'])} MB at {b['context_length']} tokens = "
        f"{mb(b['need_bytes'])} MB of the {mb(b['budget_bytes'])} MB budget, {how}"
    )


def speculative_line(spec: dict) -> str:
    """One sentence on the student as a speculative-decoding draft model for the teacher."""
    k = spec["draft_len"]
    return (
        f"speculative decoding, student drafting {k} tokens for the teacher (greedy, "
        f"{spec['prompts']} held-out prompts, {spec['rounds']} teacher passes, {spec['note']}): "
        f"{100 * spec['acceptance_rate']:.0f}% of drafted tokens accepted, mean accepted length "
        f"{spec['mean_accepted_length']:.2f} of {k}, {spec['tokens_per_target_forward']:.2f} "
        "tokens per teacher pass"
    )


def capped_line(row: dict) -> str | None:
    """The memory verdict measured under the budget's own cap, for one artifact (None: not run)."""
    c = row.get("capped")
    if c is None:
        return None
    cap, name = f"{c['cap_bytes'] / MIB:.0f} MB", row["name"]
    if c["method"] is None:
        return (
            f"NO CAP {name}: no memory cap could be set on this host ({c['how']}); the verdict "
            "above is an estimate"
        )
    how = f"{c['method']}, {c['threads']} threads"
    if "error" in c:
        return f"CAP ERROR {name}: under the {cap} cap ({how}): {c['error']}"
    if c["killed"]:
        peak = "" if c["peak_bytes"] is None else f" at {mb(c['peak_bytes'])} MB"
        return f"FAIL {name} was killed{peak}: over the {cap} cap (measured, {how})"
    verdict = "PASS" if c["fits"] else "FAIL"
    return (
        f"{verdict} {name} ran within the {cap} cap (peak {mb(c['peak_bytes'])} MB, resident "
        f"{mb(c['peak_rss_bytes'])} MB; measured, {how})"
    )


def projection_line(row: dict, bandwidth_gbs: float) -> str:
    """The device's measured decode speed against the profile's projection, and the bandwidth
    that would have projected it."""
    measured = row["speed"]["decode_tps"]["median"]
    b = row["bandwidth"]
    effective = measured * b["bytes_per_token"] / 1e9
    return (
        f"{row['name']} on {row['measured_on']}: decode {measured:.1f} tok/s measured, "
        f"{b['device_projection_tps']:.1f} tok/s projected from the profile's "
        f"{bandwidth_gbs:g} GB/s (projection {100 * row['projection_error']:+.0f}%); "
        f"memory_bandwidth_gbs: {effective:.2f} would have projected the measurement"
    )


def remote_line(device: dict, row: dict) -> str:
    """What the remote path cost for one artifact: the copies and the runner's start."""
    r = row["remote"]
    copy = (
        "already on the device (same sha256), not copied"
        if r["copy_s"] is None
        else f"copied {r['copy_bytes'] / 1e6:.1f} MB in {r['copy_s']:.1f} s"
    )
    if r.get("heldout_copy_s") is not None:
        held = (
            f"; held-out slice copied ({r['heldout_copy_bytes'] / 1e6:.1f} MB in "
            f"{r['heldout_copy_s']:.1f} s, kept there for the next artifacts)"
        )
    else:
        held = ""
    load = "" if r.get("load_s") is None else f" (model load {r['load_s']:.2f} s)"
    missing = row.get("not_measured")
    return (
        f"{row['name']} to {device['name']}: {copy}{held}; runner and job sent in "
        f"{r['setup_s']:.1f} s; the run took {r['run_s']:.1f} s there{load}"
        + (f"; not measured by llama-bench: {', '.join(missing)} (-)" if missing else "")
    )


def device_faults(bench: dict) -> list[str]:
    """What kept the device from measuring, one line each (none without a device)."""
    device = bench.get("device") or {}
    lines = [device["error"]] if device.get("error") else []
    return lines + [f"{name}: {line}" for name, line in device.get("errors", {}).items()]


def _side_row(where: str, r: dict, speed: dict, peak: int | None) -> list[str]:
    q, em = r.get("quality"), r.get("exact_match")
    return [
        f"{r['name']}, {where}",
        spread_text(speed["prompt_tps"]),
        spread_text(speed["decode_tps"]),
        spread_text(speed["ttft_ms"]),
        "-" if peak is None else mb(peak),
        "-" if q is None else f"{q['kld']:.4f}",
        "-" if q is None else f"{q['top1']:.3f}",
        "-" if q is None else f"{q['ppl']:.2f}",
        f"{em['correct']}/{em['total']}" if em and em["total"] else "-",
    ]


def side_by_side(bench: dict) -> tuple[list[str], list[list[str]]] | None:
    """Columns and rows: each device artifact on this host, under the budget's cap and on the
    device (None: neither a capped nor a device run)."""
    device = bench.get("device") or {}
    on_device = {r["name"]: r for r in device.get("rows", [])}
    rows, extra = [], False
    for r in bench["artifacts"]:
        if not r["shipped"]:
            continue
        rows.append(_side_row("this host", r, r["speed"], r["memory"]["peak_rss_bytes"]))
        c = r.get("capped") or {}
        if "speed" in c:
            where = f"this host, {c['cap_bytes'] / MIB:.0f} MB cap"
            rows.append(_side_row(where, {"name": r["name"]}, c["speed"], c["peak_bytes"]))
            extra = True
        if r["name"] in on_device:
            d = on_device[r["name"]]
            rows.append(_side_row(d["measured_on"], d, d["speed"], d["memory"]["peak_rss_bytes"]))
            extra = True
    if not extra:
        return None
    cols = ["artifact, measured on", "prompt tok/s", "decode tok/s", "TTFT ms", "peak MB"]
    return [*cols, "kld", "top1", "ppl", "exact"], rows


def score_text(s: dict) -> str:
    """A task score with the harness's standard error: '0.412 ± 0.030'."""
    err = s.get("stderr")
    return f"{s['score']:.3f}" + ("" if err is None else f" ± {err:.3f}")


def share_text(s: dict) -> str:
    """The share of the teacher's score kept, as a percentage ('-' without one)."""
    return "-" if s.get("share") is None else f"{100 * s['share']:.0f}%"
