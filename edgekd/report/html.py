"""The build report as one self-contained HTML page: inline CSS and SVG plots drawn here, no
scripts, nothing fetched from the network.

The page shows only what the build report holds; the projected device speed is drawn apart from
the measured ones and labelled as a projection.
"""

from __future__ import annotations

import math
from html import escape

from edgekd.benchmark import MIB
from edgekd.report import text
from edgekd.report.text import (
    mb,
    score_text,
    share_text,
    speculative_line,
    spread_text,
    verdict_line,
)

_PALETTE = ("#2563eb", "#ea580c", "#16a34a", "#9333ea", "#0891b2", "#be123c", "#854d0e")
_MEASURED, _LIMIT, _PROJECTION = "#2563eb", "#94a3b8", "#f59e0b"
_WEIGHTS, _KV, _RSS, _BUDGET = "#2563eb", "#93c5fd", "#111827", "#dc2626"

_CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       background: #f8fafc; color: #0f172a; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 32px 0 8px; }
.sub { color: #475569; margin: 0; }
.verdict { border-radius: 10px; padding: 16px 20px; margin: 20px 0; border: 2px solid; }
.verdict.pass { background: #f0fdf4; border-color: #16a34a; }
.verdict.fail { background: #fef2f2; border-color: #dc2626; }
.verdict.none { background: #f1f5f9; border-color: #94a3b8; }
.verdict .big { font-size: 28px; font-weight: 700; letter-spacing: .02em; }
.verdict.pass .big { color: #15803d; } .verdict.fail .big { color: #b91c1c; }
.verdict ul { margin: 8px 0 0; padding-left: 20px; }
.warn { color: #92400e; background: #fffbeb; border: 1px solid #f59e0b; padding: 8px 12px;
        border-radius: 6px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(220px, 1fr)); gap: 12px; }
.card { background: #fff; border: 1px solid #e2e8f0; border-radius: 8px; padding: 12px 14px; }
.card .v { font-size: 24px; font-weight: 700; }
.card .k { color: #475569; font-size: 12px; }
figure { background: #fff; border: 1px solid #e2e8f0; border-radius: 8px; margin: 0;
         padding: 12px; }
figcaption { color: #475569; font-size: 12px; margin-top: 6px; }
svg text { font-family: system-ui, sans-serif; fill: #334155; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; background: #fff; font-size: 12.5px; }
th, td { border-bottom: 1px solid #e2e8f0; padding: 5px 7px; text-align: right;
         white-space: nowrap; }
th { background: #f1f5f9; font-weight: 600; white-space: normal; vertical-align: bottom; }
td:first-child, th:first-child, td.l, th.l { text-align: left; }
.fit { color: #15803d; font-weight: 600; } .nofit { color: #b91c1c; font-weight: 600; }
.proj { color: #b45309; }
details { background: #fff; border: 1px solid #e2e8f0; border-radius: 8px; padding: 8px 12px;
          margin: 6px 0; }
summary { cursor: pointer; font-weight: 600; }
td.reply { white-space: normal; text-align: left; max-width: 560px; color: #334155; }
.note { color: #475569; font-size: 12px; }
"""


def _e(x) -> str:
    return escape(str(x), quote=True)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 12))
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.3g}"
    return f"{v:.2g}"


class _Frame:
    """A plot area inside an SVG: maps data to pixels and draws axes."""

    def __init__(self, x0, y0, w, h, xlim, ylim):
        self.x0, self.y0, self.w, self.h = x0, y0, w, h
        self.xlim, self.ylim = xlim, ylim

    def x(self, v: float) -> float:
        lo, hi = self.xlim
        return self.x0 + (v - lo) / (hi - lo) * self.w

    def y(self, v: float) -> float:
        lo, hi = self.ylim
        return self.y0 + self.h - (v - lo) / (hi - lo) * self.h

    def axes(self, xticks, yticks, xlabel: str = "", ylabel: str = "") -> str:
        out = [
            f'<rect x="{self.x0}" y="{self.y0}" width="{self.w}" height="{self.h}" '
            'fill="#fff" stroke="#cbd5e1"/>'
        ]
        for t in yticks:
            y = self.y(t)
            out.append(
                f'<line x1="{self.x0}" x2="{self.x0 + self.w}" y1="{y:.1f}" y2="{y:.1f}" '
                'stroke="#eef2f7"/>'
                f'<text x="{self.x0 - 6}" y="{y + 4:.1f}" text-anchor="end" '
                f'font-size="11">{_fmt(t)}</text>'
            )
        for t in xticks:
            x = self.x(t)
            out.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{self.y0}" y2="{self.y0 + self.h}" '
                'stroke="#eef2f7"/>'
                f'<text x="{x:.1f}" y="{self.y0 + self.h + 15}" text-anchor="middle" '
                f'font-size="11">{_fmt(t)}</text>'
            )
        if xlabel:
            out.append(
                f'<text x="{self.x0 + self.w / 2}" y="{self.y0 + self.h + 32}" '
                f'text-anchor="middle" font-size="12">{_e(xlabel)}</text>'
            )
        if ylabel:
            cy = self.y0 + self.h / 2
            out.append(
                f'<text x="{self.x0 - 44}" y="{cy}" text-anchor="middle" font-size="12" '
                f'transform="rotate(-90 {self.x0 - 44} {cy})">{_e(ylabel)}</text>'
            )
        return "".join(out)


def _svg(plot_id: str, width: int, height: int, body: str, title: str) -> str:
    return (
        f'<svg id="{plot_id}" class="plot" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {width} {height}" width="100%" role="img" aria-label="{_e(title)}">'
        f"<title>{_e(title)}</title>{body}</svg>"
    )


def _empty(plot_id: str, message: str) -> str:
    return _svg(
        plot_id,
        600,
        60,
        f'<text x="300" y="35" text-anchor="middle" font-size="13">{_e(message)}</text>',
        message,
    )


def _legend(items: list[tuple[str, str]], x: float, y: float, dash: dict | None = None) -> str:
    out = []
    for i, (label, colour) in enumerate(items):
        yy = y + 16 * i
        style = f' stroke-dasharray="{dash[label]}"' if dash and label in dash else ""
        out.append(
            f'<line x1="{x}" x2="{x + 18}" y1="{yy}" y2="{yy}" stroke="{colour}" '
            f'stroke-width="3"{style}/>'
            f'<text x="{x + 24}" y="{yy + 4}" font-size="12">{_e(label)}</text>'
        )
    return "".join(out)


def loss_plot(curves: dict[str, list[dict]]) -> str:
    """Training loss against step, one line per training stage."""
    series = {s: [(r["step"], r["loss"]) for r in rows] for s, rows in curves.items() if rows}
    if not series:
        return _empty("plot-loss", "no training stage recorded a loss curve")
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    xt = _nice_ticks(0, max(xs))
    yt = _nice_ticks(min(0.0, min(ys)), max(ys))
    f = _Frame(70, 20, 680, 260, (xt[0], xt[-1]), (yt[0], yt[-1]))
    body = [f.axes(xt, yt, "optimizer step", "loss (KD objective)")]
    legend = []
    for i, (stage, pts) in enumerate(series.items()):
        colour = _PALETTE[i % len(_PALETTE)]
        path = " ".join(f"{f.x(x):.1f},{f.y(y):.1f}" for x, y in pts)
        body.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2.5"/>')
        body += [
            f'<circle cx="{f.x(x):.1f}" cy="{f.y(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in pts
        ]
        legend.append((stage, colour))
    body.append(_legend(legend, 770, 40))
    return _svg("plot-loss", 900, 320, "".join(body), "training loss per stage")


def quality_plot(rows: list[dict]) -> str:
    """kld, top1 and ppl of every quality row, from the teacher (top) to the final artifact:
    one row per model, one panel per measure."""
    if not rows:
        return _empty("plot-quality", "no stage reported held-out quality")
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    colours = [_PALETTE[stages.index(r["stage"]) % len(_PALETTE)] for r in rows]
    panels = [
        ("kld", "kld, lower is better"),
        ("top1", "top1, higher is better"),
        ("ppl", "ppl, lower is better"),
    ]
    left, pw, gap, row_h, top = 300, 210, 30, 22, 36
    height = top + row_h * len(rows)
    body = []
    for i, r in enumerate(rows):
        y = top + row_h * (i + 0.5)
        body.append(
            f'<text x="{left - 10}" y="{y + 4:.1f}" text-anchor="end" font-size="11">'
            f"{_e(r['stage'])}: {_e(r['model'])}</text>"
        )
    for p, (key, label) in enumerate(panels):
        vals = [r[key] for r in rows]
        lo = 0.0 if key != "ppl" else min(vals) * 0.9
        hi = 1.0 if key == "top1" else max(vals) * 1.1 or 1.0
        xt = _nice_ticks(lo, hi, 4)
        f = _Frame(left + p * (pw + gap), top, pw, height - top, (xt[0], xt[-1]), (0, 1))
        body.append(f.axes(xt, []))
        body.append(
            f'<text x="{f.x0 + pw / 2}" y="{top - 12}" text-anchor="middle" font-size="12" '
            f'font-weight="600">{_e(label)}</text>'
        )
        pts = " ".join(f"{f.x(v):.1f},{top + row_h * (i + 0.5):.1f}" for i, v in enumerate(vals))
        body.append(f'<polyline points="{pts}" fill="none" stroke="#cbd5e1" stroke-width="1.5"/>')
        for i, (v, colour) in enumerate(zip(vals, colours, strict=True)):
            body.append(
                f'<circle cx="{f.x(v):.1f}" cy="{top + row_h * (i + 0.5):.1f}" r="4.5" '
                f'fill="{colour}"><title>{_e(rows[i]["model"])}: {key} {v:.4g}</title></circle>'
            )
    width = left + 3 * pw + 2 * gap + 20
    return _svg("plot-quality", width, height + 30, "".join(body), "held-out quality per stage")


def size_quality_plot(artifacts: list[dict]) -> str:
    """Size on disk against kld for every benchmarked artifact."""
    pts = [r for r in artifacts if r.get("quality")]
    if not pts:
        return _empty("plot-size-quality", "no artifact has a held-out quality measurement")
    xs = [r["size_bytes"] / MIB for r in pts]
    ys = [r["quality"]["kld"] for r in pts]
    xt = _nice_ticks(0, max(xs) * 1.05)
    yt = _nice_ticks(0, max(max(ys) * 1.15, 1e-3))
    f = _Frame(70, 20, 640, 280, (xt[0], xt[-1]), (yt[0], yt[-1]))
    body = [f.axes(xt, yt, "size on disk (MB)", "KL(teacher || model)")]
    # Points only on the plot, names in a keyed list beside it: artifacts of one build cluster.
    for i, (r, x, y) in enumerate(zip(pts, xs, ys, strict=True)):
        colour = _PALETTE[i % len(_PALETTE)]
        ly = 40 + 20 * i
        label = f"{r['name']}: {x:.1f} MB, kld {y:.4f}, top1 {r['quality']['top1']:.2f}"
        body.append(
            _marker(f.x(x), f.y(y), colour, r["shipped"], f"{r['name']}")
            + _marker(736, ly - 4, colour, r["shipped"], r["name"])
            + f'<text x="748" y="{ly}" font-size="11">{_e(label)}</text>'
        )
    body.append(
        f'<text x="730" y="{52 + 20 * len(pts)}" font-size="11">square: judged against the '
        "budget; circle: reference</text>"
    )
    return _svg("plot-size-quality", 1080, 340, "".join(body), "size against quality")


def mean_share(row: dict) -> float | None:
    """An artifact's mean share of the teacher's task scores (tasks the teacher scores on)."""
    shares = [t["share"] for t in (row.get("tasks") or {}).values() if t.get("share") is not None]
    return sum(shares) / len(shares) if shares else None


def retention_plot(artifacts: list[dict]) -> str:
    """The distillation literature's chart: compression ratio (teacher size / artifact size)
    against the share of the teacher's task score kept, one point per artifact, its area
    proportional to its parameter count."""
    teacher = next((r for r in artifacts if r["role"] == "teacher"), None)
    pts = [r for r in artifacts if mean_share(r) is not None]
    if teacher is None or not pts:
        return _empty("plot-retention", "no task score with a teacher to compare against")
    xs = [teacher["size_bytes"] / r["size_bytes"] for r in pts]
    ys = [100 * mean_share(r) for r in pts]
    top = max(p.get("params") or 0 for p in pts) or 1
    xt = _nice_ticks(0, max(xs) * 1.1)
    yt = _nice_ticks(0, max(110.0, max(ys) * 1.1))
    f = _Frame(70, 20, 640, 280, (xt[0], xt[-1]), (yt[0], yt[-1]))
    body = [
        f.axes(xt, yt, "compression ratio (teacher size / artifact size)", "% of teacher score"),
        f'<line x1="{f.x0}" x2="{f.x0 + f.w}" y1="{f.y(100):.1f}" y2="{f.y(100):.1f}" '
        'stroke="#94a3b8" stroke-dasharray="4 3"/>',
    ]
    for i, (r, x, y) in enumerate(zip(pts, xs, ys, strict=True)):
        colour = _PALETTE[i % len(_PALETTE)]
        params = r.get("params")
        radius = 4 + 10 * math.sqrt((params or 0) / top)
        size = "params unknown" if params is None else f"{params / 1e6:.0f}M params"
        label = f"{r['name']}: compression {x:.2f}x, {y:.0f}% of the teacher's score, {size}"
        ly = 40 + 20 * i
        body.append(
            f'<circle cx="{f.x(x):.1f}" cy="{f.y(y):.1f}" r="{radius:.1f}" fill="{colour}" '
            f'stroke="#fff"><title>{_e(label)}</title></circle>'
            f'<circle cx="736" cy="{ly - 4}" r="5" fill="{colour}"/>'
            f'<text x="748" y="{ly}" font-size="11">{_e(label)}</text>'
        )
    body.append(
        f'<text x="730" y="{52 + 20 * len(pts)}" font-size="11">area: parameter count; '
        "dashed: the teacher's score</text>"
    )
    return _svg("plot-retention", 1120, 340, "".join(body), "share of the teacher's score kept")


def _task_table(bench: dict) -> str:
    """Each task: every artifact's score with its standard error, its share of the teacher's,
    how many questions and how long it took."""
    rows = [r for r in bench["artifacts"] if r.get("tasks")]
    head = ("artifact", "runtime", "task", "metric", "score", "of teacher", "questions", "seconds")
    out = ['<div class="scroll"><table id="task-table"><thead><tr>']
    out += [f"<th>{_e(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    tasks = list(dict.fromkeys(t for r in rows for t in r["tasks"]))
    for task in tasks:
        for r in rows:
            if (s := r["tasks"].get(task)) is None:
                continue
            cells = [
                _e(r["name"]),
                _e(r["runtime"]),
                _e(task),
                _e(s["metric"]),
                score_text(s),
                share_text(s),
                str(s["n"]),
                f"{s['seconds']:.1f}",
            ]
            out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table></div>")
    st = bench["settings"]
    limit = st.get("task_limit")
    out.append(
        '<p class="note">Scored by lm-evaluation-harness through each artifact\'s own runtime; '
        "± is the harness's standard error. "
        + (f"The first {limit} questions of each task." if limit else "Every question.")
        + "</p>"
    )
    return "".join(out)


def _marker(x: float, y: float, colour: str, square: bool, title: str) -> str:
    if square:
        shape = f'<rect x="{x - 6:.1f}" y="{y - 6:.1f}" width="12" height="12" fill="{colour}">'
        return f"{shape}<title>{_e(title)}</title></rect>"
    return (
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{colour}"><title>{_e(title)}</title>'
        "</circle>"
    )


def _hbar_frame(n: int, xmax: float, left: int = 230, row: int = 34):
    xt = _nice_ticks(0, xmax)
    return _Frame(left, 30, 560, n * row, (0, xt[-1]), (0, n)), xt


def memory_plot(artifacts: list[dict], budget_mb: float, profile: str, context: int) -> str:
    """Weights + KV cache at the profile's context for each artifact, its measured peak RSS on
    this host, and the profile's budget as a line."""
    if not artifacts:
        return _empty("plot-memory", "no artifact was benchmarked")
    need = [r["budget"]["need_bytes"] / MIB for r in artifacts]
    rss = [r["memory"]["peak_rss_bytes"] / MIB for r in artifacts]
    f, xt = _hbar_frame(len(artifacts), max([*need, *rss, budget_mb]) * 1.05)
    row = f.h / len(artifacts)
    body = [f.axes(xt, [], "MB (2^20 bytes)")]
    for i, r in enumerate(artifacts):
        y = f.y0 + i * row + 6
        w_mb = r["budget"]["weights_bytes"] / MIB
        kv_mb = r["budget"]["kv_bytes"] / MIB
        body.append(
            f'<text x="{f.x0 - 8}" y="{y + 14:.1f}" text-anchor="end" font-size="12">'
            f"{_e(r['name'])}</text>"
            f'<rect x="{f.x(0):.1f}" y="{y:.1f}" width="{f.x(w_mb) - f.x(0):.1f}" height="12" '
            f'fill="{_WEIGHTS}"><title>weights {w_mb:.1f} MB</title></rect>'
            f'<rect x="{f.x(w_mb):.1f}" y="{y:.1f}" width="{f.x(w_mb + kv_mb) - f.x(w_mb):.1f}" '
            f'height="12" fill="{_KV}"><title>KV cache {kv_mb:.1f} MB at {context} tokens'
            "</title></rect>"
            f'<rect x="{f.x(0):.1f}" y="{y + 15:.1f}" width="{f.x(rss[i]) - f.x(0):.1f}" '
            f'height="5" fill="{_RSS}"><title>peak RSS on this host {rss[i]:.1f} MB</title>'
            "</rect>"
        )
    bx = f.x(budget_mb)
    body.append(
        f'<line x1="{bx:.1f}" x2="{bx:.1f}" y1="{f.y0 - 8}" y2="{f.y0 + f.h}" '
        f'stroke="{_BUDGET}" stroke-width="2.5" stroke-dasharray="6 4"/>'
        f'<text x="{bx:.1f}" y="{f.y0 - 12}" text-anchor="middle" font-size="12" '
        f'fill="{_BUDGET}">{_e(profile)} budget {budget_mb:g} MB</text>'
    )
    lx = f.x0 + f.w + 20
    body.append(
        f'<rect x="{lx}" y="40" width="14" height="10" fill="{_WEIGHTS}"/>'
        f'<text x="{lx + 20}" y="49" font-size="12">weights</text>'
        f'<rect x="{lx}" y="58" width="14" height="10" fill="{_KV}"/>'
        f'<text x="{lx + 20}" y="67" font-size="12">KV cache at {context} tokens</text>'
        f'<rect x="{lx}" y="78" width="14" height="5" fill="{_RSS}"/>'
        f'<text x="{lx + 20}" y="85" font-size="12">peak RSS, this host</text>'
    )
    return _svg(
        "plot-memory", 1010, int(f.y0 + f.h + 50), "".join(body), "memory against the budget"
    )


def speed_plot(artifacts: list[dict], profile: str) -> str:
    """Measured decode speed (median, min-max), the host's bandwidth limit and the projected
    device speed, per artifact."""
    if not artifacts:
        return _empty("plot-speed", "no artifact was benchmarked")
    top = max(
        max(
            r["speed"]["decode_tps"]["max"],
            r["bandwidth"]["host_limit_tps"],
            r["bandwidth"]["device_projection_tps"],
        )
        for r in artifacts
    )
    f, xt = _hbar_frame(len(artifacts), top * 1.05, row=46)
    row = f.h / len(artifacts)
    body = [
        '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="6" height="6" fill="#fef3c7"/>'
        f'<line x1="0" y1="0" x2="0" y2="6" stroke="{_PROJECTION}" stroke-width="3"/>'
        "</pattern></defs>",
        f.axes(xt, [], "decode tokens/s"),
    ]
    for i, r in enumerate(artifacts):
        y = f.y0 + i * row + 5
        s, b = r["speed"]["decode_tps"], r["bandwidth"]
        body.append(
            f'<text x="{f.x0 - 8}" y="{y + 20:.1f}" text-anchor="end" font-size="12">'
            f"{_e(r['name'])}</text>"
            f'<rect x="{f.x(0):.1f}" y="{y:.1f}" width="{f.x(b["host_limit_tps"]) - f.x(0):.1f}" '
            f'height="11" fill="none" stroke="{_LIMIT}" stroke-width="1.5">'
            f"<title>host bandwidth limit {b['host_limit_tps']:.0f} tok/s</title></rect>"
            f'<rect x="{f.x(0):.1f}" y="{y:.1f}" width="{f.x(s["median"]) - f.x(0):.1f}" '
            f'height="11" fill="{_MEASURED}"><title>measured median {s["median"]:.1f} tok/s'
            "</title></rect>"
            f'<line x1="{f.x(s["min"]):.1f}" x2="{f.x(s["max"]):.1f}" y1="{y + 5.5:.1f}" '
            f'y2="{y + 5.5:.1f}" stroke="#0f172a" stroke-width="1.5"/>'
            f'<rect x="{f.x(0):.1f}" y="{y + 15:.1f}" '
            f'width="{f.x(b["device_projection_tps"]) - f.x(0):.1f}" height="11" '
            f'fill="url(#hatch)" stroke="{_PROJECTION}"><title>projection for {_e(profile)}: '
            f"{b['device_projection_tps']:.0f} tok/s</title></rect>"
        )
    lx = f.x0 + f.w + 20
    body.append(
        f'<rect x="{lx}" y="40" width="14" height="10" fill="{_MEASURED}"/>'
        f'<text x="{lx + 20}" y="49" font-size="12">measured on this host</text>'
        f'<text x="{lx + 20}" y="63" font-size="11">(median, line: min-max)</text>'
        f'<rect x="{lx}" y="74" width="14" height="10" fill="none" stroke="{_LIMIT}"/>'
        f'<text x="{lx + 20}" y="83" font-size="12">host bandwidth limit</text>'
        f'<rect x="{lx}" y="96" width="14" height="10" fill="url(#hatch)" '
        f'stroke="{_PROJECTION}"/>'
        f'<text x="{lx + 20}" y="105" font-size="12">PROJECTION for {_e(profile)}</text>'
    )
    return _svg("plot-speed", 1010, int(f.y0 + f.h + 50), "".join(body), "decode speed")


def _verdict_section(report: dict) -> str:
    bench = report["bench"]
    if bench is None:
        return (
            '<section id="verdict" class="verdict none"><div class="big">NOT BENCHMARKED</div>'
            "<p>This run has no bench stage: no memory verdict.</p></section>"
        )
    shipped = [r for r in bench["artifacts"] if r["shipped"]]
    fits = bench["verdict"]["fits"]
    p = bench["profile"]
    lines = "".join(
        f"<li>{_e(verdict_line(r))} (estimate)</li>"
        + (f"<li>{_e(line)}</li>" if (line := text.capped_line(r)) else "")
        for r in shipped
    ) or ("<li>no device artifact (a format of the profile) was benchmarked</li>")
    stale = ""
    if report["bench_stale_inputs"]:
        stale = (
            '<p class="warn">The bench measured an earlier build of '
            f"{_e(', '.join(report['bench_stale_inputs']))}; run the bench stage again.</p>"
        )
    return (
        f'<section id="verdict" class="verdict {"pass" if fits else "fail"}">'
        f'<div class="big">{"PASS" if fits else "FAIL"}: {_e(p["name"])}</div>'
        f"<div>weights + KV cache at {p['context_length']} tokens against the "
        f"{p['memory_budget_mb']} MB memory budget of the profile</div>"
        f"<ul>{lines}</ul>{stale}</section>"
    )


def _cards(bench: dict) -> str:
    cards = []
    rows = {r["name"]: r for r in bench["artifacts"]}
    for name, ratio in bench["ratios"].get("decode_vs_teacher", {}).items():
        if rows[name]["shipped"]:
            cards.append((f"{ratio:.2f}x", f"decode speed, {name} / teacher (medians, this host)"))
    for r in bench["artifacts"]:
        if r["shipped"]:
            b = r["bandwidth"]
            cards.append(
                (
                    f"{100 * b['host_fraction']:.0f}%",
                    f"{r['name']}: measured decode / host bandwidth limit "
                    f"({b['host_limit_tps']:.0f} tok/s)",
                )
            )
            cards.append(
                (
                    f"{b['device_projection_tps']:.0f} tok/s",
                    f"{r['name']}: PROJECTED decode on {bench['profile']['name']} "
                    "(bandwidth / bytes per token, not measured)",
                )
            )
            em = r["exact_match"]
            if em["total"]:
                cards.append((f"{em['correct']}/{em['total']}", f"{r['name']}: exact-match"))
    spec = bench.get("speculative")
    if spec:
        cards.append(
            (
                f"{spec['mean_accepted_length']:.2f} / {spec['draft_len']}",
                f"speculative decoding: draft tokens the teacher accepts per pass "
                f"({100 * spec['acceptance_rate']:.0f}% of drafted)",
            )
        )
    host = bench["host"]
    cards.append(
        (
            f"{host['bandwidth_bps'] / 1e9:.1f} GB/s",
            f"host memory bandwidth, measured ({host['threads']} threads)",
        )
    )
    return (
        '<div class="cards" id="key-numbers">'
        + "".join(
            f'<div class="card"><div class="v">{_e(v)}</div><div class="k">{_e(k)}</div></div>'
            for v, k in cards
        )
        + "</div>"
    )


def _bench_table(bench: dict) -> str:
    head = (
        "artifact",
        "runtime",
        "size MB",
        "weights + KV MB",
        "budget",
        "peak RSS MB",
        "prompt tok/s",
        "decode tok/s",
        "TTFT ms",
        "of host limit",
        "device tok/s*",
        "kld",
        "top1",
        "ppl",
        "exact match",
    )
    out = ['<div class="scroll"><table id="bench-table"><thead><tr>']
    out += [f"<th>{_e(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for r in bench["artifacts"]:
        q, em, s, b = r["quality"], r["exact_match"], r["speed"], r["budget"]
        fit = (
            f'<span class="{"fit" if b["fits"] else "nofit"}">'
            f"{'fits' if b['fits'] else 'over'}</span>"
        )
        cells = [
            _e(r["name"]) + (" &#9632;" if r["shipped"] else ""),
            _e(r["runtime"]),
            mb(r["size_bytes"]),
            mb(b["need_bytes"]),
            fit,
            mb(r["memory"]["peak_rss_bytes"]),
            spread_text(s["prompt_tps"]),
            spread_text(s["decode_tps"]),
            spread_text(s["ttft_ms"]),
            f"{100 * r['bandwidth']['host_fraction']:.0f}%",
            f'<span class="proj">{r["bandwidth"]["device_projection_tps"]:.0f}</span>',
            "-" if q is None else f"{q['kld']:.4f}",
            "-" if q is None else f"{q['top1']:.3f}",
            "-" if q is None else f"{q['ppl']:.2f}",
            f"{em['correct']}/{em['total']}" if em["total"] else "-",
        ]
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table></div>")
    st = bench["settings"]
    out.append(
        f'<p class="note">&#9632; judged against the budget. Speeds: median (min-max) of '
        f"{st['runs']} runs after {st['warmup_runs']} warm-up, {st['prompt_tokens']} prompt "
        f"tokens then {st['decode_tokens']} decoded greedily; TTFT is prompt processing plus "
        "the first token. Peak RSS: the runtime's child process on this host (VmHWM), "
        "interpreter included. * device tok/s is a projection: "
        f"{_e(bench['artifacts'][0]['bandwidth']['device_projection_note'])}.</p>"
        if bench["artifacts"]
        else ""
    )
    return "".join(out)


def _device_section(bench: dict) -> str:
    """Host, capped host and device side by side; the device, its projection error, the remote
    path's cost and its faults."""
    found = text.side_by_side(bench)
    device = bench.get("device")
    if found is None and not device:
        return ""
    out = ["<h2>This host, under the budget's cap, and on the device</h2>"]
    if found is not None:
        cols, rows = found
        out.append('<div class="scroll"><table id="device-table"><thead><tr>')
        out += [f"<th>{_e(c)}</th>" for c in cols]
        out.append("</tr></thead><tbody>")
        out += ["<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows]
        out.append("</tbody></table></div>")
    if device:
        items = []
        if device.get("info_line"):
            items.append(f"device {device['name']}: {device['info_line']}")
        for row in device["rows"]:
            items.append(text.projection_line(row, bench["profile"]["memory_bandwidth_gbs"]))
            items.append(text.remote_line(device, row))
        items += [f"device fault: {line}" for line in text.device_faults(bench)]
        out.append("<ul>" + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>")
    return "".join(out)


def _profiles_table(verdicts: list[dict]) -> str:
    if not verdicts:
        return ""
    out = [
        "<h2>Every shipped profile</h2>",
        '<p class="note">The same artifacts, weights + KV cache at each profile\'s context '
        "length against its budget: computed from the measured sizes, not run there.</p>",
        '<table id="profiles-table"><thead><tr><th>profile</th><th>context</th>'
        '<th>budget MB</th><th class="l">artifacts</th><th>verdict</th></tr></thead><tbody>',
    ]
    for v in verdicts:
        arts = "; ".join(f"{a['artifact']}: {mb(a['need_bytes'])} MB" for a in v["artifacts"])
        out.append(
            f"<tr><td>{_e(v['profile'])}</td><td>{v['context_length']}</td>"
            f'<td>{v["budget_mb"]}</td><td class="l">{_e(arts)}</td>'
            f'<td class="{"fit" if v["fits"] else "nofit"}">'
            f"{'fits' if v['fits'] else 'does not fit'}</td></tr>"
        )
    out.append("</tbody></table>")
    return "".join(out)


def _answers(bench: dict) -> str:
    q = bench.get("questions") or {}
    out = [
        "<h2>Exact-match questions</h2>",
        f'<p class="note">{q.get("asked", 0)} shipped questions with checkable answers '
        f"({q.get('left_out_as_trained_on', 0)} left out because a student was trained on "
        f"them), answered greedily in each runtime (at most {q.get('max_tokens', '?')} tokens). "
        f"Rule: {_e(q.get('rule', ''))}.</p>",
    ]
    for r in bench["artifacts"]:
        em = r["exact_match"]
        if not em["total"]:
            continue
        out.append(
            f"<details><summary>{_e(r['name'])}: {em['correct']}/{em['total']}</summary>"
            '<table><thead><tr><th class="l">question</th><th>answer</th><th>ok</th>'
            '<th class="l">reply</th></tr></thead><tbody>'
        )
        for item in em["items"]:
            out.append(
                f'<tr><td class="l">{_e(item["prompt"])}</td><td>{_e(item["answer"])}</td>'
                f'<td class="{"fit" if item["correct"] else "nofit"}">'
                f"{'yes' if item['correct'] else 'no'}</td>"
                f'<td class="reply">{_e(item["reply"])}</td></tr>'
            )
        out.append("</tbody></table></details>")
    return "".join(out)


def _recovery(rec: dict) -> str:
    share = "n/a" if rec["recovered"] is None else f"{100 * rec['recovered']:.1f}%"
    rows = [
        ("full-precision student, kld", f"{rec['kld_full_precision']:.4f}"),
        ("Q4_K_M gap before qat_kd", f"{rec['gap_before']:.4f}"),
        ("Q4_K_M gap after qat_kd", f"{rec['gap_after']:.4f}"),
        ("recovered = 1 - after / before", share),
    ]
    if rec.get("recovered_own_weights") is not None:
        rows += [
            ("gap after, to qat_kd's own float weights", f"{rec['gap_after_own_weights']:.4f}"),
            ("recovered, own weights", f"{100 * rec['recovered_own_weights']:.1f}%"),
        ]
    body = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows)
    return (
        '<h2>Quantization-aware recovery</h2><table id="qat-recovery">'
        f"<tbody>{body}</tbody></table>"
        f'<p class="note">Measured in {_e(rec["measured_in"])}, held-out kld to the teacher.</p>'
    )


def render(report: dict) -> str:
    """The build report as a self-contained HTML page (ASCII, non-ASCII as character refs)."""
    bench = report["bench"]
    profile = report.get("profile") or {}
    name = profile.get("name", "?")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>edgekd build report: {_e(name)}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f"<h1>edgekd build report: {_e(name)}</h1>",
        f'<p class="sub">{_e(profile.get("description", ""))}</p>',
        f'<p class="sub">teacher: {_e(report.get("teacher"))}; run folder: '
        f"{_e(report.get('run_dir', ''))}</p>",
        _verdict_section(report),
    ]
    if bench is not None:
        parts.append(_cards(bench))
    parts += [
        "<h2>Training loss</h2><figure>",
        loss_plot(report["loss_curves"]),
        "<figcaption>The KD loss of each training stage, averaged over its logging window."
        "</figcaption></figure>",
        "<h2>Held-out quality, from teacher to final artifact</h2><figure>",
        quality_plot(report["quality"]),
        "<figcaption>Each stage's own measurement on the same held-out tokens, against the "
        "teacher's log-probs at temperature 1; exports measured through their runtimes."
        "</figcaption></figure>",
    ]
    if report.get("quantization"):
        items = "".join(f"<li>{_e(line)}</li>" for line in report["quantization"])
        parts.append(f'<h2>How each artifact was quantized</h2><ul id="quantization">{items}</ul>')
    if report.get("qat_recovery"):
        parts.append(_recovery(report["qat_recovery"]))
    if bench is not None:
        artifacts = bench["artifacts"]
        p = bench["profile"]
        parts += [
            "<h2>Size against quality</h2><figure>",
            size_quality_plot(artifacts),
            "<figcaption>Each artifact's size on disk and its KL divergence from the teacher, "
            "measured in its runtime by the bench.</figcaption></figure>",
            "<h2>Memory against the budget</h2><figure>",
            memory_plot(artifacts, p["memory_budget_mb"], p["name"], p["context_length"]),
            "<figcaption>The budget is for weights + KV cache at the profile's context. Peak RSS "
            "is measured on this host and includes the Python interpreter and runtime."
            "</figcaption></figure>",
            "<h2>Decode speed</h2><figure>",
            speed_plot(artifacts, p["name"]),
            "<figcaption>Measured on this host; the host limit is its measured bandwidth divided "
            "by the bytes read per token. The hatched bar is a PROJECTION for the device from "
            "the profile's bandwidth, not a measurement.</figcaption></figure>",
            "<h2>Speed, memory and accuracy</h2>",
            _bench_table(bench),
            _device_section(bench),
        ]
        if any(r.get("tasks") for r in artifacts):
            parts += [
                "<h2>Task scores against the teacher</h2><figure>",
                retention_plot(artifacts),
                "<figcaption>Each artifact's share of the teacher's lm-evaluation-harness task "
                "score (the mean over the tasks), against how many times smaller than the "
                "teacher it is on disk.</figcaption></figure>",
                _task_table(bench),
            ]
        parts += [
            _profiles_table(report["profile_verdicts"]),
            _answers(bench),
        ]
        if bench.get("speculative"):
            parts += [
                '<h2>The student as a draft model</h2><p id="speculative">',
                _e(speculative_line(bench["speculative"])),
                ". Measured by running both models: the student drafts greedily, one teacher "
                "forward verifies the draft, the longest matching prefix is accepted.</p>",
            ]
        host = bench["host"]
        parts.append(
            f'<p class="note">Host: {_e(host["cpu"])}, {host["cores"]} cores, '
            f"{host['threads']} threads used, load average {host['load_average']:.1f} at the "
            f"start; memory bandwidth {host['bandwidth_bps'] / 1e9:.1f} GB/s "
            f"({_e(host['bandwidth_note'])}). MB = 2^20 bytes.</p>"
        )
    parts.append("</main></body></html>")
    return "\n".join(parts).encode("ascii", "xmlcharrefreplace").decode("ascii")
