"""Every distillation method of edgekd on the same student, data and token budget: one table of
held-out kld, top1, ppl, exact-match answer accuracy and wall time.

    python bench/compare_methods.py [--methods ce,cot,...] [--steps 12] [--set k=v ...]

Each method is one distill stage (`--set` overrides) in <out>/<method>/, all sharing one cache
(the teacher's answers and held-out log-probs) and starting from the same pruned student, with the
same steps, batch size and sequence length. Every student is then measured by this script on one
held-out slice (that of the shipped corpus answered greedily, against the teacher's log-probs at
temperature 1), so methods that change the training answers (sampling, CoT) are compared on the
same tokens, and answers the same checkable shipped questions, none of which any method trained
on. Reuses a corpus already in export/<profile>/cache when there is one.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from edgekd import benchmark, data, evaluate, models, pipeline
from edgekd.config import load_profile, load_recipe
from edgekd.context import Context
from edgekd.errors import EdgekdError
from edgekd.formats.hf_torch import HfTorch
from edgekd.losses import DIVERGENCES

METHODS: dict[str, list[str]] = {
    **{d: [f"distill.kd.divergence={d}"] for d in DIVERGENCES},
    # On the shipped corpus the answers are the teacher's greedy ones: CE alone is seqKD (greedy).
    "ce": ["distill.kd.alpha=0"],
    "seqkd_sample": [
        "distill.kd.alpha=0",
        "data.generation.strategy=sample",
        "data.generation.temperature=1.0",
    ],
    "cot": ["distill.kd.alpha=0", "data.cot.enabled=true"],
    "gkd": ["distill.on_policy.fraction=0.5"],
    "self_distill": ["distill.self_distill.enabled=true"],
    "feature": ["distill.feature.weight=1.0"],
    "attention": ["distill.attention.weight=1.0", "distill.attention.value_weight=1.0"],
    "relation": ["distill.relation.weight=1.0"],
    "logit_cache": ["distill.teacher_logits=cache", "logit_cache.top_k=64"],
}
# Beam search runs the teacher in transformers over every prompt: minutes more on a CPU.
OPTIONAL = {
    "seqkd_beam": ["distill.kd.alpha=0", "data.generation.strategy=beam", "data.generation.beams=4"]
}


def _budget(steps: int) -> list[str]:
    return [
        f"distill.max_steps={steps}",
        "distill.batch_size=4",
        f"distill.log_every={steps}",
        "data.max_seq_len=128",
        "data.max_heldout=12",
        "distill.on_policy.max_tokens=48",
    ]


def _run_dir(path: Path, cache: Path) -> Path:
    """A run folder whose cache is the shared one."""
    path.mkdir(parents=True, exist_ok=True)
    if not (path / "cache").exists():
        (path / "cache").symlink_to(cache.resolve())
    return path


def _trained_prompts(ctx: Context) -> set[str]:
    s = ctx.recipe.data
    train, _ = data.split_heldout(ctx.rows, s.heldout_fraction, s.max_heldout)
    return {m["content"] for r in train for m in r.get("messages", []) if m["role"] == "user"}


def _accuracy(model, tokenizer, questions: list[dict], max_tokens: int) -> float:
    replies = HfTorch.from_model(model, tokenizer).chat(
        [[{"role": "user", "content": q["prompt"]}] for q in questions], max_tokens=max_tokens
    )
    right = [
        benchmark.exact_match(r, str(q["answer"])) for r, q in zip(replies, questions, strict=True)
    ]
    return sum(right) / len(right)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated; " + ", ".join([*METHODS, *OPTIONAL]),
    )
    ap.add_argument("--profile", default="phone-1gb")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--answer-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("export/compare-methods"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    known = {**METHODS, **OPTIONAL}
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := [m for m in names if m not in known]:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(known)}")
    profile = load_profile(args.profile)
    base = [*args.overrides, *_budget(args.steps)]
    cache = args.out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    for found in (Path("export") / profile.name / "cache").glob("corpus-*.jsonl"):
        if not (cache / found.name).exists():
            shutil.copy2(found, cache / found.name)

    # The reference: the shipped corpus answered greedily, its held-out slice and teacher log-probs.
    ref = Context(_run_dir(args.out / "reference", cache), profile, load_recipe(None, base))
    heldout, reference = ref.heldout, ref.reference
    start_dir = args.out / "student-start"
    if not (start_dir / "config.json").is_file():
        # The pruned teacher every method starts from, its layers chosen as the distill stage
        # does (one throwaway step).
        probe = _run_dir(args.out / "probe", cache)
        pipeline.build(
            profile, load_recipe(None, [*base, "distill.max_steps=1"]), probe, ["distill"]
        )
        keep = json.loads((probe / "01-distill" / "report.json").read_text())["student"]
        student = models.prune_layers(ref.teacher, keep["kept_layers"])
        models.save_model(student, ref.tokenizer, start_dir)
        shutil.rmtree(probe)
    common = [*base, f"student.source={start_dir.resolve()}"]

    results: dict[str, dict] = {}
    trained: set[str] = set()
    for name in names:
        run = _run_dir(args.out / name, cache)
        try:  # the methods of another branch fail on unknown keys until it is merged
            recipe = load_recipe(None, [*common, *known[name]])
            pipeline.build(profile, recipe, run, ["distill"])
        except EdgekdError as e:
            results[name] = {"error": str(e).splitlines()[0]}
            continue
        report = json.loads((run / "01-distill" / "report.json").read_text())
        trained |= _trained_prompts(Context(run, profile, recipe))
        # The stage's own time (teacher answers, training, its evaluations), also when reused.
        results[name] = {"stage_s": report["seconds"], "training": report["training"]}

    checkable = [r for r in data.default_prompts() if r.get("answer") is not None]
    questions = benchmark.pick_questions(checkable, args.questions, exclude=trained)
    rows = {"start (pruned, untrained)": start_dir}
    rows.update(
        {n: args.out / n / "01-distill" / "model" for n in names if "error" not in results[n]}
    )
    for label, folder in rows.items():
        model = models.load_model(models.resolve_source(str(folder), role="student"))
        q = evaluate.evaluate_torch(model, heldout, reference).as_dict()
        acc = _accuracy(model, ref.tokenizer, questions, args.answer_tokens) if questions else None
        results.setdefault(label, {}).update({"quality": q, "accuracy": acc})

    lines = [
        f"held-out: {heldout.num_tokens} tokens of the shipped corpus (teacher's greedy answers), "
        f"against the teacher at T=1; accuracy: exact match on {len(questions)} checkable shipped "
        f"questions no method trained on, greedy, {args.answer_tokens} tokens; budget: "
        f"{args.steps} steps x 4 sequences x <= 128 tokens; profile {profile.name}",
        "",
        "| method | kld | top1 | ppl | accuracy | tokens trained | train s | stage s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label in [*[k for k in rows if k not in names], *names]:
        r = results[label]
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error']} | | | | | | |")
            continue
        q, t = r["quality"], r.get("training")
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.0f}%"
        lines.append(
            f"| {label} | {q['kld']:.4f} | {q['top1']:.3f} | {q['ppl']:.2f} | {acc} | "
            + (
                f"{t['tokens_this_run']} | {t['seconds_this_run']:.0f} | {r['stage_s']:.0f} |"
                if t
                else "- | - | - |"
            )
        )
    table = "\n".join(lines)
    print("\n" + table)
    (args.out / "methods.md").write_text(table + "\n")
    (args.out / "methods.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwritten: {args.out / 'methods.md'}, {args.out / 'methods.json'}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
