"""Served teacher against in-process teacher: the logit cache filled from llama-cpp-python's
OpenAI-compatible server (the embedded SmolLM2-135M GGUF on the loopback) or from the teacher in
this process, the same distill run on each (same corpus, student, steps and seed), and the
server's generation speed with one and with several requests in flight.

    OMP_WAIT_POLICY=PASSIVE python bench/served_teacher.py [--prompts 32] [--steps 20]
        [--max-tokens 48] [--concurrency 4] [--threads 2]

Both students are scored against the in-process teacher's full-vocabulary held-out log-probs
(the served build's own reference is rebuilt from the server's top-k and is printed beside it).
The student is the teacher's first two thirds of layers, saved once and used by both runs. Small on
purpose (a subset of the shipped prompts, few steps) to finish in about 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from edgekd import data, models
from edgekd.config import load_profile, load_recipe
from edgekd.context import Context
from edgekd.effective import resolve
from edgekd.evaluate import evaluate_torch
from edgekd.logit_cache import LogitCache
from edgekd.models import embedded_teacher_gguf
from edgekd.testing import llama_server, set_args

ALIAS = "smollm2-135m"


def context(run: Path, sets: list[str]) -> Context:
    profile = load_profile("phone-1gb")
    recipe = load_recipe(None, sets)
    return Context(run, profile, recipe, resolve(profile, recipe, ["distill"]))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def distill(run: Path, teacher: str, common: list[str], cache: Path, corpus: Path) -> dict:
    """`edgekd build --stages distill` reading `cache`; its report."""
    sets = [*common, f"logit_cache.path={cache}", "distill.teacher_logits=cache"]
    cmd = [sys.executable, "-m", "edgekd.cli", "build", "--profile", "phone-1gb", "--teacher",
           teacher, "--data", str(corpus), "--out", str(run), "--stages", "distill",
           *set_args(sets)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    return json.loads((run / "01-distill" / "report.json").read_text())


def agreement(a: Path, b: Path) -> tuple[float, float]:
    """Between two cache folders of one corpus: the share of positions with the same top token,
    and the mean |difference| of the log-probs both list for the same token id."""
    ta, tb = LogitCache.load(a).t, LogitCache.load(b).t
    same_top = (ta["ids"][:, 0] == tb["ids"][:, 0]).float().mean().item()
    diffs = []
    rows = zip(ta["ids"], ta["logprobs"], tb["ids"], tb["logprobs"], strict=True)
    for ids_a, lp_a, ids_b, lp_b in rows:
        other = dict(zip(ids_b.tolist(), lp_b.float().tolist(), strict=True))
        mine = zip(ids_a.tolist(), lp_a.float().tolist(), strict=True)
        # Empty slots and the label-only rows' padding sit at the fp16 floor: no log-prob given.
        diffs += [abs(v - other[i]) for i, v in mine if v > -1e4 and other.get(i, -1e5) > -1e4]
    return same_top, sum(diffs) / max(len(diffs), 1)


def tokens_per_s(ctx: Context, prompts: list[dict], concurrency: int, max_tokens: int) -> float:
    """Completion tokens per wall-clock second, `concurrency` chat requests in flight."""
    client = ctx.served_teacher.client()

    def ask(p: dict) -> int:
        r = client.chat.completions.create(
            model=ALIAS,
            messages=[{"role": "user", "content": p["prompt"]}],
            max_tokens=max_tokens,
            temperature=0,
        )
        return r.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        n = sum(pool.map(ask, prompts))
    return n / (time.perf_counter() - start)


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="edgekd-served-bench-"))
    try:
        measure(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # two runs, a student and three caches: ~1 GB


def measure(root: Path) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed-prompts", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gguf = embedded_teacher_gguf()
    common = [
        f"data.num_prompts={args.prompts}",
        f"data.generation.max_tokens={args.max_tokens}",
        f"distill.max_steps={args.steps}",
        "distill.batch_size=4",
    ]
    local = context(root / "local", common)

    # One corpus for both: the shipped prompts answered by the teacher in process (llama.cpp).
    rows, gen_s = timed(lambda: local.rows)
    corpus = root / "corpus.jsonl"
    data.write_jsonl_atomic(corpus, rows)
    # One student for both: the teacher's first two thirds of layers.
    teacher = local.teacher
    keep = list(range(round(teacher.config.num_hidden_layers * 2 / 3)))
    student_dir = root / "student"
    models.save_model(models.prune_layers(teacher, keep).float(), local.tokenizer, student_dir)
    both = [*common, f"student.source={student_dir}", f"data.source={corpus}"]

    local = context(root / "local", both)
    local_cache = root / "cache-local"
    _, local_fill = timed(lambda: local.write_logit_cache(local_cache))
    reference = local.reference

    with llama_server(gguf, alias=ALIAS, n_ctx=2048, threads=args.threads) as url:
        remote = context(
            root / "served", [*both, f"teacher.source={url}", f"teacher.model={ALIAS}"]
        )
        remote_cache = root / "cache-served"
        _, served_fill = timed(lambda: remote.write_logit_cache(remote_cache))
        # The server answers the prompts itself: one pass (each answer with its top-k log-probs)
        # against chat answers scored in a second pass; answers and cache timed together.
        served_sets = [*common, f"student.source={student_dir}", f"teacher.source={url}",
                       f"teacher.model={ALIAS}"]  # fmt: skip
        fills, answered = {}, {}
        for name, extra in (("one pass", []), ("two passes", ["teacher.one_pass=false"])):
            ctx = context(root / f"answers-{name.replace(' ', '-')}", [*served_sets, *extra])
            cache = root / f"cache-{name.replace(' ', '-')}"
            _, fills[name] = timed(lambda ctx=ctx, cache=cache: ctx.write_logit_cache(cache))
            answered[name] = (ctx, cache)
        one_pass_corpus = root / "corpus-one-pass.jsonl"
        data.write_jsonl_atomic(one_pass_corpus, answered["one pass"][0].rows)
        prompts = data.default_prompts()[-args.speed_prompts :]
        one = tokens_per_s(remote, prompts, 1, args.max_tokens)
        many = tokens_per_s(remote, prompts, args.concurrency, args.max_tokens)
        with_corpus = [s for s in both if not s.startswith("data.source=")]
        runs = {
            "in-process": distill(root / "run-local", "embedded", both, local_cache, corpus),
            "served": distill(root / "run-served", url, [*both, f"teacher.model={ALIAS}"],
                              remote_cache, corpus),
            "served, one pass": distill(root / "run-one-pass", url,
                                        [*with_corpus, f"teacher.model={ALIAS}"],
                                        answered["one pass"][1], one_pass_corpus),
            "served, two passes": distill(root / "run-two-passes", url,
                                          [*with_corpus, f"teacher.model={ALIAS}"],
                                          answered["two passes"][1], one_pass_corpus),
        }  # fmt: skip

    rows_out = []
    folders = {
        "in-process": root / "run-local",
        "served": root / "run-served",
        "served, one pass": root / "run-one-pass",
        "served, two passes": root / "run-two-passes",
    }
    for name, report in runs.items():
        trained = folders[name] / "01-distill" / "model"
        student = models.load_model(models.resolve_source(str(trained), role="student"))
        kld = evaluate_torch(student, local.heldout, reference).kld
        own = report["quality"]["student after"]["kld"]
        rows_out.append((name, kld, own))
    gap = abs(rows_out[1][1] - rows_out[0][1]) / rows_out[0][1]
    gap_one = abs(rows_out[2][1] - rows_out[3][1]) / rows_out[3][1]
    same_top, mean_diff = agreement(local_cache, remote_cache)
    one_ctx, two_ctx = answered["one pass"][0], answered["two passes"][0]
    same_answers = one_ctx.rows == two_ctx.rows
    examples = len(local.train_examples)
    print(f"embedded teacher {gguf.name}; {args.prompts} shipped prompts ({examples} training "
          f"examples), {args.max_tokens}-token answers, distill {args.steps} steps, batch 4, "
          f"seed 0, top_k {local.recipe.logit_cache.top_k}; {args.threads} threads")  # fmt: skip
    print(
        "| cache filled by | held-out kld (vs in-process full reference) | kld vs own reference "
        "| time to fill the cache |"
    )
    print("|---|---|---|---|")
    times = {
        "in-process": f"{local_fill:.1f} s",
        "served": f"{served_fill:.1f} s",
        "served, one pass": f"{fills['one pass']:.1f} s with the answers",
        "served, two passes": f"{fills['two passes']:.1f} s with the answers",
    }
    for name, kld, own in rows_out:
        print(f"| {name} | {kld:.4f} | {own:.4f} | {times[name]} |")
    print(
        f"\nheld-out kld gap: {100 * gap:.1f}% of the in-process run's (served, second pass on "
        "the in-process corpus); one pass against two passes on the server's own answers: "
        f"{100 * gap_one:.1f}% (all students scored on the in-process corpus's held-out rows)"
    )
    print(
        f"served answers and their cache: {fills['one pass']:.1f} s in one pass, "
        f"{fills['two passes']:.1f} s as chat answers then a second pass "
        f"(same answers both ways: {same_answers})"
    )
    if same_answers:
        top, diff = agreement(answered["one pass"][1], answered["two passes"][1])
        print(
            f"one pass against two passes: same top token at {100 * top:.1f}% of positions, "
            f"log-probs of the same ids differ by {diff:.4f} on average"
        )
    print(
        f"the two caches: same top token at {100 * same_top:.1f}% of positions; log-probs of the "
        f"same token ids differ by {mean_diff:.3f} on average (llama.cpp computes the Q4_1 "
        "weights itself; in process they are dequantized to fp32)"
    )
    print(f"in-process teacher answers (llama.cpp, batched): {gen_s:.1f} s, {args.prompts} prompts")
    print(
        f"served generation: {one:.1f} tokens/s with 1 request in flight, {many:.1f} tokens/s "
        f"with {args.concurrency} ({args.speed_prompts} prompts, {args.max_tokens} tokens max)"
    )


if __name__ == "__main__":
    main()
