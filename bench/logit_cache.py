"""The teacher logit cache against the live teacher: time and memory per training step, the cache's
build time and size, and the held-out quality of students distilled from each.

    python bench/logit_cache.py [--top-k 64] [--temperature 2 --temperature 1] [--steps 8]

Quality: the distill stage of the default build (embedded teacher, pruned student) on a small
budget, per temperature once with distill.teacher_logits=live and once per top-k with =cache, all
from one cached corpus (export/<profile>-logits-*/). Step cost: the same KD step (student forward,
backward, AdamW) in a fresh process per arm, fed by the live teacher or by the cache; peak RSS is
the process's high-water mark (so it includes the teacher's weights when the arm loads them), time
the median.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import statistics
import time
from pathlib import Path

from edgekd.benchmark import rss_bytes

SMALL = [
    "data.num_prompts=96",
    "data.generation.max_tokens=64",
    "student.calibration_examples=4",
    "distill.max_steps=24",
    "distill.batch_size=4",
    "distill.log_every=4",
]


def _step_cost(arm: str, student_dir: str, cache_path: str | None, examples, steps, queue) -> None:
    """In a fresh process: median seconds per KD step and the peak RSS (MiB)."""
    import torch

    from edgekd import logit_cache, models
    from edgekd.data import collate
    from edgekd.losses import Divergence, kd_loss, shift_for_next_token

    student = models.load_model(models.resolve_source(student_dir, role="student"))
    student.train()
    teacher = cache = None
    if cache_path is None:
        teacher = models.load_model(models.resolve_source("embedded", role="teacher"))
        teacher.requires_grad_(False)
    else:
        cache = logit_cache.LogitCache.load(Path(cache_path))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    times = []
    for step in range(steps + 1):  # the first step warms up and is not timed
        idx = [(4 * step + i) % len(examples) for i in range(4)]
        batch = collate([examples[i] for i in idx], 0)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        start = time.perf_counter()
        if teacher is not None:
            with torch.no_grad():
                t_logits, _ = shift_for_next_token(teacher(**inputs).logits, batch["labels"])
        else:
            t_logits = cache.teacher_logits(idx, batch["input_ids"].shape[1], "cpu", 2.0)
        s_logits, labels = shift_for_next_token(student(**inputs).logits, batch["labels"])
        loss = kd_loss(
            s_logits,
            t_logits,
            labels,
            temperature=2.0,
            alpha=0.9,
            divergence=Divergence("forward_kl", skew_alpha=0.1, jsd_beta=0.5),
        ).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step:
            times.append(time.perf_counter() - start)
    rss = rss_bytes("VmHWM") / 2**20
    queue.put({"arm": arm, "s_per_step": statistics.median(times), "peak_rss_mib": rss})


def main() -> None:
    from edgekd import pipeline
    from edgekd.config import load_profile, load_recipe
    from edgekd.context import Context
    from edgekd.effective import resolve

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="phone-1gb")
    ap.add_argument("--top-k", dest="ks", type=int, action="append", default=[])
    ap.add_argument("--temperature", dest="temps", type=float, action="append", default=[])
    ap.add_argument("--steps", type=int, default=8, help="timed KD steps per arm")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    ks, temps = args.ks or [64], args.temps or [2.0, 1.0]
    profile = load_profile(args.profile)
    base = Path("export") / f"{profile.name}-logits"
    arms = []
    for t in temps:
        arms.append((f"live T={t}", [f"distill.kd.temperature={t}"]))
        for k in ks:
            on = ["distill.teacher_logits=cache", f"logit_cache.top_k={k}"]
            arms.append((f"cache k={k} T={t}", [*on, f"distill.kd.temperature={t}"]))
    shared = base.with_name(f"{base.name}-cache")  # corpus, reference and logit caches, once
    reports, caches = {}, {}
    for name, extra in arms:
        run = base.with_name(f"{base.name}-{name.replace(' ', '').replace('=', '')}")
        if shared.exists():
            shutil.copytree(shared, run / "cache", dirs_exist_ok=True)
        recipe = load_recipe(None, [*SMALL, *args.overrides, *extra])
        if "cache" in name:
            k = recipe.logit_cache.top_k
            ctx = Context(run, profile, recipe, resolve(profile, recipe, ["distill"]))
            start = time.perf_counter()
            cache = ctx.logit_cache
            if k not in caches:
                path = max(
                    (run / "cache").glob("logits-*/manifest.json"), key=lambda p: p.stat().st_mtime
                )
                caches[k] = (
                    path.parent,
                    cache.nbytes(),
                    time.perf_counter() - start,
                    len(cache.t["log_rest"]),
                )
        pipeline.build(profile, recipe, run, ["distill"])
        shutil.copytree(run / "cache", shared, dirs_exist_ok=True)
        reports[name] = json.loads((run / "01-distill" / "report.json").read_text())

    first = reports[arms[0][0]]
    print(f"\nquality: held-out slice of {first['quality']['teacher']['tokens']} tokens, "
          f"{' '.join(SMALL)}")  # fmt: skip
    before = first["quality"]["student before"]
    print(f"{'arm':18}{'kld':>9}{'top1':>8}{'ppl':>10}{'train s':>9}")
    print(
        f"{'pruned, untrained':18}{before['kld']:>9.4f}{before['top1']:>8.3f}{before['ppl']:>10.3f}"
    )
    for name, _ in arms:
        q = reports[name]["quality"]["student after"]
        sec = reports[name]["training"]["seconds_this_run"]
        print(f"{name:18}{q['kld']:>9.4f}{q['top1']:>8.3f}{q['ppl']:>10.3f}{sec:>9.1f}")
    for k, (_, nbytes, seconds, positions) in caches.items():
        size = (
            f"{nbytes / 2**20:.2f} MiB for {positions} positions ({nbytes / positions:.0f} B each)"
        )
        print(
            f"cache k={k}: built in {seconds:.1f} s (a teacher pass over the training set), {size}"
        )

    live_run = base.with_name(f"{base.name}-{arms[0][0].replace(' ', '').replace('=', '')}")
    student_dir = str(live_run / "01-distill" / "model")
    recipe = load_recipe(None, [*SMALL, *args.overrides])
    ctx = Context(live_run, profile, recipe, resolve(profile, recipe, ["distill"]))
    examples = ctx.train_examples
    spawn = mp.get_context("spawn")
    print(f"\nstep cost: batch 4, {args.steps} timed steps, median; fresh process per arm")
    print(f"{'arm':18}{'s/step':>9}{'peak RSS MiB':>14}")
    for name, cache_path in [
        ("live", None),
        *((f"cache k={k}", str(c[0])) for k, c in caches.items()),
    ]:
        queue = spawn.Queue()
        work = (name, student_dir, cache_path, examples, args.steps, queue)
        proc = spawn.Process(target=_step_cost, args=work)
        proc.start()
        row = queue.get()
        proc.join()
        print(f"{name:18}{row['s_per_step']:>9.3f}{row['peak_rss_mib']:>14.0f}")


if __name__ == "__main__":
    main()
