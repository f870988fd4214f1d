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
    """What the remote path cost for one artifact: the copy and the runner's start."""
    r = row["remote"]
    copy = (
        "already on the device (same sha256), not copied"
        if r["copy_s"] is None
        else f"copied {r['copy_bytes'] / 1e6:.1f} MB in {r['copy_s']:.1f} s"
    )
    return (
        f"{row['name']} to {device['name']}: {copy}; runner, job and held-out slice sent in "
        f"{r['setup_s']:.1f} s; the run took {r['run_s']:.1f} s there (model load "
        f"{r['load_s']:.2f} s)"
    )
