"""The shipped evaluation tasks: reproducible, never trained on, with principled wrong choices,
and loadable by lm-evaluation-harness with no network."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from edgekd import data, tasks
from edgekd.tasks.questions import QUESTIONS

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_tasks.py"


def _rows() -> list[dict]:
    return [json.loads(line) for line in QUESTIONS.read_text().splitlines()]


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^\w ]", " ", text.lower()).split())


def test_the_generator_writes_the_shipped_file(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("make_tasks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build() == _rows()


def test_no_question_is_a_prompt_of_the_corpus():
    """The default corpus is the teacher's answers to the shipped prompts; its training and
    held-out splits hold those prompts' user turns and nothing else of ours."""
    prompts = data.default_prompts()
    corpus = [{"messages": [{"role": "user", "content": r["prompt"]}]} for r in prompts]
    train, heldout = data.split_heldout(corpus, 0.1, 64)
    seen = {_normal(m["content"]) for row in train + heldout for m in row["messages"]}
    seen |= {_normal(r["prompt"]) for r in prompts}
    questions = {_normal(r["question"]) for r in _rows()}
    assert not questions & seen
    # nor one inside the other (a prompt that quotes a question, or the reverse)
    assert not any(q in p or p in q for q in questions for p in seen)


def test_choices_are_the_answer_and_its_neighbours():
    rows = _rows()
    assert len(rows) >= 250 and {r["split"] for r in rows} == {"test", "dev"}
    assert {r["category"] for r in rows} == {"arithmetic", "reasoning", "factual"}
    for r in rows:
        choices = r["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4, r
        assert choices[r["label"]] == r["answer"], r
        if r["answer"].isdigit() and "smaller" not in r["question"]:
            answer = int(r["answer"])
            near = max(10, answer // 10 * 2)
            assert all(abs(int(c) - answer) <= near for c in choices), r
        if "smaller" in r["question"]:  # the two numbers compared, and one past each
            assert set(re.findall(r"\d+", r["question"])) <= set(choices), r
        if r["category"] == "reasoning" and "older" in r["question"]:
            people = set(re.findall(r"[A-Z][a-z]+", r["question"].split(" Who")[0]))
            assert people <= set(choices), r  # the puzzle's three people are among the choices


@pytest.mark.slow
def test_the_harness_loads_both_shipped_tasks_offline():
    from edgekd import harness

    assert tasks.SHIPPED == ("edgekd_answer", "edgekd_choice")
    loaded = harness.task_manager(tasks.SHIPPED).load(list(tasks.SHIPPED))["tasks"]
    rows = _rows()
    for name in tasks.SHIPPED:
        task = loaded[name]
        assert len(task.test_docs()) == sum(r["split"] == "test" for r in rows)
        assert len(task.fewshot_docs()) == sum(r["split"] == "dev" for r in rows)
