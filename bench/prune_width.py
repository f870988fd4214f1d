"""Depth, width or both? The embedded teacher pruned three ways to the same parameter count, each
healed with the same distill budget: one table of held-out kld before and after healing, Q4_K_M
size and llama.cpp decode speed.

    nice python bench/prune_width.py [--steps 40] [--out export/prune-width] [--set k=v ...]

Each method is one `distill` build (student.prune=depth|width|depth_width, the
default distill settings unless --steps or --set say otherwise) in <out>/run/, one after the other
(their reports are kept as <out>/<method>.json), so every student is scored on the same held-out
slice against the same teacher log-probs; its student is then written to GGUF and quantized
to Q4_K_M by edgekd's exporter in <out>/gguf/<method>/. The target is the default depth student's
size (student.layer_fraction of the teacher's layers), so the three differ only in how they got
there. Decode speed is the median of a few timed runs in a child process (benchmark.measure) on
this host: compare the rows with each other, not with a phone.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from edgekd import benchmark, pipeline
from edgekd.config import load_profile, load_recipe
from edgekd.formats.gguf import quantize_gguf, write_gguf
from edgekd.testing import TOKEN_IDS

MB = 1024 * 1024
QUANT = "Q4_K_M"


def _decode_tps(gguf: Path, threads: int) -> float:
    job = benchmark.Job(
        runtime="llama.cpp",
        path=str(gguf),
        threads=threads,
        n_ctx=256,
        prompt=TOKEN_IDS,
        decode_tokens=64,
        runs=3,
        warmup_runs=1,
        questions=[],
        answer_max_tokens=0,
        speed_only=True,
    )
    with tempfile.TemporaryDirectory() as scratch:
        measured = benchmark.measure(job, Path(scratch))
    speed = benchmark.speed_summary(
        measured["ttft_s"], measured["decode_s"], len(job.prompt), job.decode_tokens
    )
    return speed["decode_tps"]["median"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="width,depth_width,depth")
    ap.add_argument("--profile", default="phone-1gb")
    ap.add_argument("--steps", type=int, default=None, help="distill.max_steps (default: config)")
    # One thread: on a shared host, llama.cpp's threads waiting on each other swamp the measure.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("export/prune-width"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    profile = load_profile(args.profile)
    base = [*args.overrides, "qlora.enabled=false", "qat_kd.enabled=false"]
    if args.steps is not None:
        base.append(f"distill.max_steps={args.steps}")
    # One run folder: the teacher's answers and held-out log-probs in its cache are made once,
    # and each method's distill (another key) replaces the last one's after it is measured.
    run = args.out / "run"

    rows = {}
    for method in args.methods.split(","):
        recipe = load_recipe(None, [*base, f"student.prune={method}"])
        pipeline.build(profile, recipe, run, ["distill"])
        distill = json.loads((run / "01-distill" / "report.json").read_text())
        student = distill["student"]
        quality = distill["quality"]
        # edgekd's own GGUF writer and llama.cpp's quantizer, outside the run folder.
        scratch = args.out / "gguf" / method
        scratch.mkdir(parents=True, exist_ok=True)
        f16 = write_gguf(run / "01-distill" / "model", scratch / "model-F16.gguf")
        gguf = quantize_gguf(f16, scratch / f"model-{QUANT}.gguf", QUANT, threads=args.threads)
        rows[method] = {
            "shape": student["shape"],
            "params": student["params"],
            "kld_before": quality["student before"]["kld"],
            "kld_after": quality["student after"]["kld"],
            "top1_after": quality["student after"]["top1"],
            "gguf_mb": gguf.stat().st_size / MB,
            "decode_tps": _decode_tps(gguf, args.threads),
        }
        (args.out / f"{method}.json").write_text(json.dumps(distill))
        print(json.dumps({method: rows[method]}), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))

    print(
        "\n| method | shape (layers, hidden, intermediate, heads) | params | held-out kld before "
        "healing | after | top1 after | Q4_K_M size | decode tok/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for method, r in rows.items():
        s = r["shape"]
        print(
            f"| {method} | {s['layers']}, {s['hidden']}, {s['intermediate']}, {s['heads']} | "
            f"{r['params'] / 1e6:.1f}M | {r['kld_before']:.3f} | {r['kld_after']:.3f} | "
            f"{r['top1_after']:.3f} | {r['gguf_mb']:.1f} MB | "
            f"{r['decode_tps']:.0f} |"
        )


if __name__ == "__main__":
    main()
