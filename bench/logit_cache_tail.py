"""How far a top-k logit cache is from the live teacher: KL(true || rebuilt) and the tail's mass,
per temperature and k, on the embedded teacher's first training examples.

    python bench/logit_cache_tail.py [--examples 4] [--set k=v ...]

Rebuilds compared: 'bounded' (what edgekd trains on, logit_cache.dense_logprobs), 'flat' (the rest
mass spread evenly at T = 1, then tempered) and 'exact tail mass' (the true tempered tail mass,
spread evenly: the best any top-k + flat-tail rebuild can do). Needs the corpus of a build with the
same data settings (bench/logit_cache.py makes it in export/<profile>-logits-cache).
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import torch

from edgekd.config import load_profile, load_recipe
from edgekd.context import Context
from edgekd.data import collate
from edgekd.effective import resolve
from edgekd.logit_cache import dense_logprobs, top_k_entries, trained_positions

SMALL = ["data.num_prompts=96", "data.generation.max_tokens=64"]


def _kl(true: torch.Tensor, rebuilt: torch.Tensor) -> float:
    return (true.exp() * (true - rebuilt)).sum(-1).mean().item()


def _tail_mass(logprobs: torch.Tensor, ids: torch.Tensor) -> float:
    return 1 - logprobs.exp().gather(-1, ids.long()).sum(-1).mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="phone-1gb")
    ap.add_argument("--examples", type=int, default=4)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    profile = load_profile(args.profile)
    run = Path("export") / f"{profile.name}-logits-tail"
    shared = Path("export") / f"{profile.name}-logits-cache"
    if shared.exists():
        shutil.copytree(shared, run / "cache", dirs_exist_ok=True)
    recipe = load_recipe(None, [*SMALL, *args.overrides])
    ctx = Context(run, profile, recipe, resolve(profile, recipe, ["distill"]))
    examples = ctx.train_examples[: args.examples]
    batch = collate(examples, 0)
    with torch.no_grad():
        logits = ctx.teacher(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    rows = torch.cat([logits[i, trained_positions(e.labels)] for i, e in enumerate(examples)])
    vocab = rows.shape[-1]
    print(f"{len(rows)} positions; KL(true || rebuilt) in nats, mean over positions")
    print(f"{'T':>4}{'k':>5}{'bounded':>9}{'flat':>9}{'exact':>9}   tail mass: true bounded flat")
    for t in (1.0, 2.0, 4.0):
        true = (rows / t).log_softmax(-1)
        for k in (8, 64, 256):
            ids, logprobs, rest = top_k_entries(rows, k)
            bounded = (dense_logprobs(ids, logprobs, rest, vocab, t) / t).log_softmax(-1)
            flat = (dense_logprobs(ids, logprobs, rest, vocab, 1.0) / t).log_softmax(-1)
            top = true.gather(-1, ids.long())
            tail = true.scatter(-1, ids.long(), float("-inf")).logsumexp(-1)
            exact = (tail - math.log(vocab - k))[:, None].expand(-1, vocab).clone()
            exact.scatter_(-1, ids.long(), top)

            masses = " ".join(f"{_tail_mass(q, ids):.3f}" for q in (true, bounded, flat))
            kls = "".join(f"{_kl(true, q):>9.4f}" for q in (bounded, flat, exact))
            print(f"{t:>4}{k:>5}{kls}   {masses}")


if __name__ == "__main__":
    main()
