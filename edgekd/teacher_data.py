"""Training answers written by the teacher: sequence-level KD and chain-of-thought distillation.

Sequence-level KD (Kim & Rush) is a data choice: the teacher answers the prompts (greedy, sampling
or beam search) and the student trains on those answers. Chain-of-thought distillation asks the
teacher to reason step by step, keeps only traces whose final answer is right where the row says
what is right ("answer"), and trains the student on the bare problem followed by the trace, so
the student learns to reason without being asked.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edgekd import data, served
from edgekd.benchmark import exact_match
from edgekd.config import DataSettings, settings_hash
from edgekd.console import console
from edgekd.errors import EdgekdError
from edgekd.formats.hf_torch import HfTorch
from edgekd.formats.registry import open_runtime

if TYPE_CHECKING:
    from edgekd.context import Context


def _answer_settings(settings: DataSettings) -> dict:
    """The settings that decide the teacher's answers, under the names the corpus cache keys
    have always used (so an existing corpus keeps its name and its cache)."""
    g, cot = settings.generation, settings.cot
    return {
        "gen_max_tokens": g.max_tokens,
        "gen_temperature": g.temperature,
        "gen_seed": g.seed,
        "gen_strategy": g.strategy,
        "gen_beams": g.beams,
        "regenerate": settings.regenerate,
        "cot": cot.enabled,
        "cot_instruction": cot.instruction,
        "cot_filter": cot.filter,
    }


# Hashed into every corpus cache name since the first version; the other answer settings join the
# key only when they differ from their defaults, so a default corpus keeps its first name.
_FIRST_KEYS = ("gen_max_tokens", "gen_temperature", "gen_seed")


def generation_key(settings: DataSettings) -> dict:
    """The settings that decide the teacher's answers, for the corpus cache key."""
    current, defaults = _answer_settings(settings), _answer_settings(DataSettings())
    key = {name: current[name] for name in _FIRST_KEYS}
    changed = {
        name: value
        for name, value in current.items()
        if name not in _FIRST_KEYS and value != defaults[name]
    }
    if changed:
        key["generation"] = changed
    return key


def prompt_rows(rows: list[dict], source: str) -> list[dict]:
    """{"prompt", ...} rows from a user corpus of single-exchange chat rows (a user turn, then an
    assistant turn or nothing), keeping their other keys ("answer" makes a row checkable)."""
    prompts = []
    for i, row in enumerate(rows):
        turns = row.get("messages") or []
        roles = [m["role"] for m in turns]
        if roles not in (["user"], ["user", "assistant"]):
            raise EdgekdError(
                f"{source}: row {i + 1} is not one user turn (plus an optional assistant turn), "
                "so the teacher cannot answer it again; set data.regenerate=false or give "
                '{"messages": [{"role": "user", ...}, ...]} rows'
            )
        extra = {k: v for k, v in row.items() if k != "messages"}
        prompts.append({"prompt": turns[0]["content"], **extra})
    return prompts


def with_instruction(prompts: list[dict], instruction: str) -> list[dict]:
    """The prompts with the CoT instruction after each problem."""
    return [{**p, "prompt": f"{p['prompt']}\n\n{instruction}"} for p in prompts]


def final_reply(row: dict) -> str:
    """The last assistant turn of a chat row."""
    return [m["content"] for m in row["messages"] if m["role"] == "assistant"][-1]


def keep_correct(rows: list[dict]) -> tuple[list[dict], dict]:
    """Rows without an "answer", and rows whose reply has it by the bench's exact-match rule;
    plus counts of the checkable rows kept and dropped."""
    kept, right, wrong = [], 0, 0
    for row in rows:
        if row.get("answer") is None:
            kept.append(row)
        elif exact_match(final_reply(row), str(row["answer"])):
            kept.append(row)
            right += 1
        else:
            wrong += 1
    return kept, {"checkable": right + wrong, "right": right, "dropped": wrong}


def answered_row(prompt_row: dict, answer: str) -> dict:
    """A chat row from a prompt row and the teacher's answer, keeping the other keys."""
    row = {
        "messages": [
            {"role": "user", "content": prompt_row["prompt"]},
            {"role": "assistant", "content": answer.strip()},
        ]
    }
    row.update({k: v for k, v in prompt_row.items() if k != "prompt"})
    return row


def worth_answering(
    prompts: list[dict], settings: DataSettings, train_examples: int | None
) -> list[dict]:
    """The prompts a build uses, in their order: the held-out slice's (the one the whole set
    gives, so it stays put whatever the training length) and, of the rest, the `train_examples`
    with the lowest split hash (every one when None). The shipped prompts come grouped by
    category; the hash picks across all of them."""
    if train_examples is None:
        return prompts
    rows = [answered_row(p, "") for p in prompts]
    train, heldout = data.split_indices(rows, settings.heldout_fraction, settings.max_heldout)
    keep = set(heldout) | set(data.by_hash(rows, train)[:train_examples])
    return [p for i, p in enumerate(prompts) if i in keep]


def answers_journal(ctx: Context) -> Path:
    """Where the served teacher's answers (and the log-probs they came with) are journaled."""
    key = settings_hash(ctx.teacher_key, generation_key(ctx.recipe.data))
    return ctx.cache_path(f"answers-{key[:16]}.jsonl")


def one_pass_answers(ctx: Context) -> list[dict]:
    """The served teacher's answers that came with their log-probs (none where the corpus is the
    user's own, or was answered otherwise)."""
    s = ctx.recipe.data
    if not ctx.is_served or (s.source is not None and not s.regenerate):
        return []
    rows = served.read_journal(answers_journal(ctx), None).values()
    return [row for row in rows if row.get("tops")]


def answered_by_llama_cpp(ctx: Context) -> bool:
    """Whether the teacher's answers come from a GGUF file decoded by llama.cpp (no beams)."""
    return ctx.teacher_source.kind == "gguf" and ctx.recipe.data.generation.strategy != "beam"


def _generate(ctx: Context, prompts: list[dict]) -> list[dict]:
    g = ctx.recipe.data.generation
    beams = g.beams if g.strategy == "beam" else 1
    conversations = [[{"role": "user", "content": p["prompt"]}] for p in prompts]
    if ctx.is_served:
        teacher = ctx.served_teacher
        console.print(
            f"teacher: {len(prompts)} answers from {teacher.where} "
            f"({ctx.recipe.teacher.concurrency} requests at once)",
            highlight=False,
        )
        top_k = ctx.recipe.logit_cache.top_k
        rendered = None
        if ctx.served_probe.one_pass(ctx.recipe.teacher, top_k):
            # The student's own rendering of each prompt: the answer's log-probs are then those of
            # the context it trains in.
            rendered = []
            for c in conversations:
                ids = data.render_ids(ctx.tokenizer, c, add_generation_prompt=True)
                rendered.append((ids, served.decode(ctx.tokenizer, ids)))
        answers = teacher.generate(
            conversations,
            max_tokens=g.max_tokens,
            temperature=g.temperature,
            seed=g.seed,
            journal=answers_journal(ctx),
            rendered=rendered,
            top_k=top_k,
        )
        return [answered_row(p, a) for p, a in zip(prompts, answers, strict=True)]
    if answered_by_llama_cpp(ctx):
        teacher = open_runtime(ctx.teacher_source.path, threads=ctx.threads)
        parallel = g.parallel
    else:
        # Beam search runs in transformers, on the GGUF teacher's dequantized weights if need be.
        teacher, parallel = HfTorch.from_model(ctx.teacher, ctx.tokenizer), 8
    answers = teacher.generate(
        conversations,
        max_tokens=g.max_tokens,
        temperature=g.temperature,
        seed=g.seed,
        parallel=parallel,
        beams=beams,
    )
    return [answered_row(p, a) for p, a in zip(prompts, answers, strict=True)]


def teacher_rows(ctx: Context, prompts: list[dict]) -> list[dict]:
    """Chat rows of the prompts answered by the teacher as data.generation and data.cot say."""
    cot = ctx.recipe.data.cot
    if not cot.enabled:
        return _generate(ctx, prompts)
    answered = _generate(ctx, with_instruction(prompts, cot.instruction))
    for row, prompt in zip(answered, prompts, strict=True):
        row["messages"][0]["content"] = prompt["prompt"]  # the student sees the bare problem
    if not cot.filter:
        return answered
    kept, counts = keep_correct(answered)
    console.print(
        f"chain of thought: kept {counts['right']} of {counts['checkable']} checkable traces "
        f"(final answer right), {len(kept)} rows in all",
        highlight=False,
    )
    if not kept:
        raise EdgekdError(
            "data.cot: every teacher trace had a wrong final answer and no row is left; "
            "set data.cot.filter=false or use a stronger teacher"
        )
    return kept
