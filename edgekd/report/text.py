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


def score_text(s: dict) -> str:
    """A task score with the harness's standard error: '0.412 ± 0.030'."""
    err = s.get("stderr")
    return f"{s['score']:.3f}" + ("" if err is None else f" ± {err:.3f}")


def share_text(s: dict) -> str:
    """The share of the teacher's score kept, as a percentage ('-' without one)."""
    return "-" if s.get("share") is None else f"{100 * s['share']:.0f}%"
