"""Teacher-written answers: the corpus cache key, prompts from user rows, the CoT instruction
and answer filter."""

import pytest

from edgekd import data
from edgekd.config import DataSettings, GenerationSettings
from edgekd.errors import EdgekdError
from edgekd.teacher_data import (
    answered_row,
    generation_key,
    keep_correct,
    prompt_rows,
    with_instruction,
    worth_answering,
)


def _chat(user, reply=None, **extra):
    msgs = [{"role": "user", "content": user}]
    if reply is not None:
        msgs.append({"role": "assistant", "content": reply})
    return {"messages": msgs, **extra}


def test_generation_key_keeps_the_old_default_and_names_every_change():
    default = generation_key(DataSettings())
    assert default == {"gen_max_tokens": 128, "gen_temperature": 0.0, "gen_seed": 0}
    keys = [
        generation_key(DataSettings.model_validate(kw))
        for kw in (
            {},
            {"generation": {"strategy": "sample", "temperature": 0.8}},
            {"generation": {"strategy": "beam"}},
            {"generation": {"strategy": "beam", "beams": 2}},
            {"cot": {"enabled": True}},
            {"cot": {"enabled": True, "filter": False}},
            {"cot": {"enabled": True, "instruction": "Reason first."}},
        )
    ]
    assert len({repr(k) for k in keys}) == len(keys)
    # A changed setting keeps the name it had in the cache key before settings were nested.
    assert keys[2] == default | {"generation": {"gen_strategy": "beam"}}
    # Settings that do not change what the teacher writes leave the key alone.
    same = DataSettings.model_validate({"max_seq_len": 64, "generation": {"parallel": 4}})
    assert generation_key(same) == default


def test_strategy_and_temperature_must_agree():
    with pytest.raises(ValueError, match="set strategy to 'sample'"):
        GenerationSettings(temperature=0.7)
    with pytest.raises(ValueError, match="needs temperature > 0"):
        GenerationSettings(strategy="sample")


def test_prompt_rows_from_user_chat_rows():
    rows = [_chat("What is 2 plus 2?", "5", answer="4"), _chat("Tell a story.")]
    assert prompt_rows(rows, "d.jsonl") == [
        {"prompt": "What is 2 plus 2?", "answer": "4"},
        {"prompt": "Tell a story."},
    ]
    with pytest.raises(EdgekdError, match=r"d.jsonl: row 2 .*data.regenerate=false"):
        prompt_rows([rows[0], {"text": "plain"}], "d.jsonl")
    system = {"messages": [{"role": "system", "content": "x"}, *rows[1]["messages"]]}
    with pytest.raises(EdgekdError, match="row 1"):
        prompt_rows([system], "d.jsonl")


def test_cot_instruction_and_answer_filter():
    assert with_instruction([{"prompt": "2+2?", "answer": "4"}], "Think.") == [
        {"prompt": "2+2?\n\nThink.", "answer": "4"}
    ]
    rows = [
        _chat("What is 12 plus 30?", "12 + 30 = 42. The answer is 42.", answer=42),
        _chat("What is 7 times 6?", "7 times 6 is 42, so 43.", answer="42"),
        _chat("Who is the tallest?", "First, Mei is taller than Ravi. So Mei.", answer="Mei"),
        _chat("Tell a story.", "Once upon a time."),
    ]
    kept, counts = keep_correct(rows)
    assert kept == [rows[0], rows[2], rows[3]]
    assert counts == {"checkable": 3, "right": 2, "dropped": 1}


def test_only_the_prompts_a_build_uses_are_answered():
    shipped, settings = data.default_prompts(), DataSettings()

    def slices(prompts):
        rows = [answered_row(p, "answer") for p in prompts]
        return data.split_heldout(rows, settings.heldout_fraction, settings.max_heldout)

    assert worth_answering(shipped, settings, None) == shipped
    picked = worth_answering(shipped, settings, 100)
    train, heldout = slices(picked)
    # The held-out slice is the whole set's, whatever the training length; then exactly the
    # examples training draws, from every category (the shipped file is grouped by category).
    assert heldout == slices(shipped)[1] and len(train) == 100
    assert {p["category"] for p in picked} == {p["category"] for p in shipped}
    # A longer training answers a superset: the answers already written stay useful.
    longer = worth_answering(shipped, settings, 150)
    assert all(p in longer for p in picked)
    assert worth_answering(shipped, settings, 10_000) != shipped  # unused held-out rows skipped
