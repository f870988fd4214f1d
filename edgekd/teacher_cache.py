"""`edgekd teacher-cache`: the teacher's logit cache for a corpus, written where the teacher is
(beside its server, or with its weights) and copied to the machine that trains.

The folder holds the shards and manifest of `logit_cache.write_dir` and the corpus they score
(`corpus.jsonl`: the user's rows, or the prompts with the teacher's answers) and, in
`reference/`, the teacher's top-k log-probs at the held-out positions, so the training machine
reads the same rows with `--data OUT/corpus.jsonl --set logit_cache.path=OUT` and measures
held-out kld without the teacher.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from edgekd import data, logit_cache, models, served
from edgekd.config import Recipe, load_profile
from edgekd.console import console
from edgekd.context import Context
from edgekd.effective import resolve
from edgekd.errors import EdgekdError, EdgekdWarning
from edgekd.preflight import sample_sequences

CORPUS = "corpus.jsonl"
# The answers journal and scratch files, inside the output folder so a rerun resumes.
WORK = ".work"
# The logit cache does not depend on the device: any shipped profile gives the context its shape.
_PROFILE = "phone-1gb"


def _check(recipe: Recipe, ctx: Context) -> None:
    """One line before any work: the teacher reachable, serving the model, able to give log-probs
    for the student's tokens."""
    src = ctx.teacher_source
    if src.kind != "served":
        models.check_weights(src, allow_pickle=recipe.teacher.allow_pickle, role="teacher")
        return
    if recipe.student.source is None:
        raise EdgekdError(
            f"the teacher is a {src.describe()}: set student.source (--set student.source=MODEL) "
            "so the cache holds the student's token ids"
        )
    teacher = ctx.served_teacher
    teacher.check_model()
    found = ctx.served_probe
    if not found.same_tokenizer:
        raise EdgekdError(
            f"the {src.describe()} tokenizes differently from student {recipe.student.source} "
            f"(compared through {found.how}): a logit cache needs one tokenizer; train on the "
            "teacher's answers alone instead (distill.kd.alpha=0)"
        )
    if not found.prompt_logprobs:
        raise EdgekdError(found.lines(teacher.where)[0])
    if found.pairing_unknown:
        tok = ctx.tokenizer
        served.check_bos(found, tok, sample_sequences(recipe, tok), teacher.where)
    answers = recipe.data.source is None or recipe.data.regenerate
    top_k = recipe.logit_cache.top_k
    for line in found.lines(teacher.where, answers, top_k=top_k, settings=recipe.teacher):
        warnings.warn(line, EdgekdWarning, stacklevel=2)


def write_cache(recipe: Recipe, out: Path) -> Path:
    """Answer the corpus if need be, score it with the teacher and write the cache to `out`."""
    profile = load_profile(_PROFILE)
    ctx = Context(
        run_dir=out / WORK,
        profile=profile,
        recipe=recipe,
        effective=resolve(profile, recipe, ["distill"]),
    )
    _check(recipe, ctx)
    if (out / logit_cache.CACHE_MANIFEST).exists():
        logit_cache.remove_dir(out)
    data.write_jsonl_atomic(out / CORPUS, ctx.rows)
    # The reference first: a folder whose top manifest exists is whole.
    ctx.write_reference(out / logit_cache.REFERENCE_DIR)
    ctx.write_logit_cache(out)
    manifest = logit_cache.read_manifest(out)
    console.print(
        f"wrote {len(manifest['shards'])} shards ({manifest['examples']} examples, top "
        f"{manifest['top_k']}), the held-out reference and {logit_cache.CACHE_MANIFEST} to "
        f"{out}, teacher "
        f"{ctx.teacher_source.describe()}; train with: --data {out / CORPUS} "
        f"--set logit_cache.path={out}",
        highlight=False,
        soft_wrap=True,
    )
    return out
