"""The distill recipe swept at equal training budget: temperature, alpha, learning rate, its
schedule and the batch size, each arm training the same pruned student on the same teacher
answers for the same number of examples (so the same tokens and, batch size aside, the same
time).

    python bench/recipe_sweep.py CORPUS [--examples 160] [--arms 0,1,...] [--json out.json]

CORPUS is a corpus of the teacher's answers, e.g. the default build's
`export/phone-1gb/cache/corpus-*.jsonl`. Each arm is `edgekd build --stages distill` in its own
run folder under --out, in its own process (its wall time and peak memory are its own); the
held-out slice and the teacher reference are the default build's. Prints one row per arm:
steps, tokens, seconds, and the held-out kld, top1 and ppl of the student after distill.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

# name -> distill overrides; every arm starts from the same "plain" loop and changes one thing.
PLAIN = {
    "batch_size": 1,
    "lr": 5e-5,
    "lr_schedule": "constant",
    "warmup_ratio": 0.0,
    "kd.temperature": 1.0,
    "kd.alpha": 1.0,
}
ARMS = {
    "previous default (bs 4, lr 2e-4 cosine, T 2, alpha 0.9)": {
        "batch_size": 4,
        "lr": 2e-4,
        "lr_schedule": "cosine",
        "warmup_ratio": 0.05,
        "kd.temperature": 2.0,
        "kd.alpha": 0.9,
    },
    "plain (bs 1, lr 5e-5 constant, T 1, alpha 1)": PLAIN,
    "plain, lr 2.5e-5": {**PLAIN, "lr": 2.5e-5},
    "plain, lr 1e-4": {**PLAIN, "lr": 1e-4},
    "plain, lr 1e-4 cosine, warmup 0.05": {
        **PLAIN,
        "lr": 1e-4,
        "lr_schedule": "cosine",
        "warmup_ratio": 0.05,
    },
    "plain, T 2": {**PLAIN, "kd.temperature": 2.0},
    "plain, alpha 0.9": {**PLAIN, "kd.alpha": 0.9},
    "plain, bs 4, lr 2e-4": {**PLAIN, "batch_size": 4, "lr": 2e-4},
}


def run_arm(name: str, distill: dict, corpus: Path, out: Path, examples: int) -> dict:
    """One arm as its own `edgekd build --stages distill`: its report and its own costs."""
    steps = math.ceil(examples / distill["batch_size"])
    sets = [f"distill.{k}={v}" for k, v in {**distill, "max_steps": steps}.items()]
    cmd = [sys.executable, "-m", "edgekd.cli", "build", "--profile", "phone-1gb"]
    cmd += ["--data", str(corpus), "--out", str(out), "--stages", "distill"]
    for s in sets:
        cmd += ["--set", s]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    report = json.loads((out / "01-distill" / "report.json").read_text())
    training = report["training"]
    return {
        "arm": name,
        "settings": distill,
        "steps": steps,
        "train_tokens": training["tokens_this_run"],
        "train_seconds": training["seconds_this_run"],
        "stage_seconds": round(seconds, 1),
        "cpu_seconds": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime),
        **{f"before_{k}": v for k, v in report["quality"]["student before"].items()},
        **report["quality"]["student after"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--examples", type=int, default=160, help="training examples per arm")
    ap.add_argument("--out", type=Path, default=Path("export/recipe-sweep"))
    ap.add_argument("--arms", help="comma-separated arm numbers to run (default: all)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    for i, (name, distill) in enumerate(ARMS.items()):
        if args.arms and str(i) not in args.arms.split(","):
            continue
        row = run_arm(name, distill, args.corpus.resolve(), args.out / f"arm-{i}", args.examples)
        rows.append(row)
        print(
            f"{name:58} steps {row['steps']:4} tokens {row['train_tokens']:6} "
            f"train {row['train_seconds']:7.1f}s  kld {row['kld']:.4f}  top1 {row['top1']:.4f}  "
            f"ppl {row['ppl']:.3f}",
            flush=True,
        )
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
