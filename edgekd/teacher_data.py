"""Training answers written by the teacher: sequence-level KD and chain-of-thought distillation.

Sequence-level KD (Kim & Rush) is a data choice: the teacher answers the prompts (greedy, sampling
or beam search) and the student trains on those answers. Chain-of-thought distillation asks the
teacher to reason step by step, keeps only traces whose final answer is right where the row says
what is right ("answer"), and trains the student on the bare problem followed by the trace, so
the student learns to reason without being asked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgekd import data
from edgekd.benchmark import exact_match
from edgekd.config import DataSettings, TeacherGenerationSettings
from edgekd.console import console
from edgekd.errors import EdgekdError

if TYPE_CHECKING:
    from edgekd.context import Context

# Keys hashed into a corpus cache name since the first version; the others of
# TeacherGenerationSettings join the key only when they differ from their defaults, so a default
# corpus keeps the name (and the cache) it had before they existed.
_FIRST_KEYS = ("gen_max_tokens", "gen_temperature", "gen_seed")


def generation_key(settings: DataSettings) -> dict:
    """The settings that decide the teacher's answers, for the corpus cache key."""
    key = settings.model_dump(include=set(_FIRST_KEYS))
    defaults = TeacherGenerationSettings()
    changed = {
        name: getattr(settings, name)
        for name in TeacherGenerationSettings.model_fields
        if name not in _FIRST_KEYS and getattr(settings, name) != getattr(defaults, name)
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


def _generate(ctx: Context, prompts: list[dict]) -> list[dict]:
    s = ctx.recipe.data
    if ctx.teacher_source.kind == "gguf" and s.gen_strategy != "beam":
        return data.generate_with_llama_cpp(
            ctx.teacher_source.path,
            prompts,
            max_tokens=s.gen_max_tokens,
            seed=s.gen_seed,
            n_threads=ctx.threads,
            temperature=s.gen_temperature,
            parallel=s.gen_parallel,
        )
    # Beam search runs in transformers, on the GGUF teacher's dequantized weights if need be.
    return data.generate_with_transformers(
        ctx.teacher,
        ctx.tokenizer,
        prompts,
        max_tokens=s.gen_max_tokens,
        seed=s.gen_seed,
        temperature=s.gen_temperature,
        batch_size=8,
        num_beams=s.gen_beams if s.gen_strategy == "beam" else 1,
    )


def teacher_rows(ctx: Context, prompts: list[dict]) -> list[dict]:
    """Chat rows of the prompts answered by the teacher as data.gen_* and data.cot_* say."""
    s = ctx.recipe.data
    if not s.cot:
        return _generate(ctx, prompts)
    answered = _generate(ctx, with_instruction(prompts, s.cot_instruction))
    for row, prompt in zip(answered, prompts, strict=True):
        row["messages"][0]["content"] = prompt["prompt"]  # the student sees the bare problem
    if not s.cot_filter:
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
            "set data.cot_filter=false or use a stronger teacher"
        )
    return kept
