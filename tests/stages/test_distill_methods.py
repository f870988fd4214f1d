"""The distill stage with each method of edgekd.teacher_data and edgekd.on_policy, on a tiny
teacher: sequence-level KD (greedy, sampling, beam) on regenerated user data, chain-of-thought
data, on-policy KD and self-distillation."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from edgekd import pipeline
from edgekd.config import load_profile
from edgekd.data import read_jsonl
from edgekd.on_policy import is_on_policy
from edgekd.testing import tiny_llama_config, write_chat_jsonl
from tests.stages.conftest import fast_recipe


@pytest.fixture(scope="module")
def talking_teacher(tmp_path_factory, tokenizer):
    """A tiny teacher with untied embeddings: a random tied one only repeats its last token, so
    its answers would not depend on the prompt."""
    torch.manual_seed(0)
    config = tiny_llama_config(tokenizer, num_layers=4)
    config.tie_word_embeddings = False
    path = tmp_path_factory.mktemp("talking")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "tokenizer.model").unlink(missing_ok=True)
    return path


SEQKD = ["data.regenerate=true", "data.generation.max_tokens=6", "distill.kd.alpha=0"]


def _distill(teacher, data, run, extra):
    recipe = fast_recipe(teacher, data, extra)
    assert pipeline.build(load_profile("phone-1gb"), recipe, run, ["distill"]) == {"distill": "ran"}
    return json.loads((run / "01-distill" / "report.json").read_text())


def _corpus(run):
    (path,) = (run / "cache").glob("corpus-*.jsonl")
    return read_jsonl(path)


def _replies(rows):
    return [r["messages"][1]["content"] for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy",
    [
        [],
        ["data.generation.strategy=sample", "data.generation.temperature=1.0"],
        ["data.generation.strategy=beam", "data.generation.beams=2"],
    ],
    ids=["greedy", "sample", "beam"],
)
def test_sequence_level_kd_trains_on_the_teachers_answers(
    talking_teacher, chat_jsonl, tmp_path, strategy
):
    report = _distill(talking_teacher, chat_jsonl, tmp_path / "run", [*SEQKD, *strategy])
    rows = _corpus(tmp_path / "run")
    given = read_jsonl(chat_jsonl)
    assert [r["messages"][0] for r in rows] == [g["messages"][0] for g in given]
    assert all(_replies(rows))
    assert not set(_replies(rows)) & set(_replies(given))  # every answer is the teacher's
    assert 0 < report["training"]["train_examples"] < len(rows)  # the held-out rows left out
    if strategy:  # each strategy writes its own corpus, under its own cache key
        greedy = tmp_path / "greedy"
        _distill(talking_teacher, chat_jsonl, greedy, SEQKD)
        assert _replies(_corpus(greedy)) != _replies(rows)


@pytest.mark.slow
def test_chain_of_thought_keeps_the_bare_problem_and_drops_wrong_traces(talking_teacher, tmp_path):
    data = write_chat_jsonl(tmp_path / "chat.jsonl")
    rows = read_jsonl(data)
    for i, row in enumerate(rows[:20]):  # half the rows are checkable
        row["answer"] = str(2 * i + 1)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cot = ["data.cot.enabled=true", *SEQKD]
    _distill(talking_teacher, data, tmp_path / "cot", cot)
    kept = _corpus(tmp_path / "cot")
    # A random tiny teacher never reasons its way to the right sum: only unchecked rows stay.
    assert [r["messages"][0] for r in kept] == [r["messages"][0] for r in rows[20:]]
    _distill(talking_teacher, data, tmp_path / "plain", SEQKD)
    plain = {r["messages"][0]["content"]: r for r in _corpus(tmp_path / "plain")}
    # The teacher saw the CoT instruction: its answers differ from the plain ones.
    assert all(_replies([r]) != _replies([plain[r["messages"][0]["content"]]]) for r in kept)


@pytest.mark.slow
def test_on_policy_batches_are_the_students_samples(tiny_teacher_dir, chat_jsonl, tmp_path):
    extra = ["distill.on_policy.fraction=0.5", "distill.on_policy.max_tokens=6"]
    report = _distill(tiny_teacher_dir, chat_jsonl, tmp_path / "run", extra)
    expected = sum(is_on_policy(0.5, 0, m) for m in range(4))
    assert 0 < expected < 4
    assert report["training"]["sampled_batches_this_run"] == expected


@pytest.mark.slow
def test_self_distillation_trains_on_its_own_samples(tiny_teacher_dir, chat_jsonl, tmp_path):
    run = tmp_path / "run"
    report = _distill(tiny_teacher_dir, chat_jsonl, run, ["distill.self_distill.enabled=true"])
    assert report["training"]["sampled_batches_this_run"] == 4
    before = report["quality"]["student before"]
    assert report["quality"]["student after"] != before
    student = AutoModelForCausalLM.from_pretrained(run / "01-distill" / "model")
    assert student.config.num_hidden_layers == 2
