"""Generate edgekd/tasks/questions.jsonl, the questions of edgekd's shipped evaluation tasks.

Deterministic (fixed seed): running it again rewrites the same file. Run from the repo root:

    python scripts/make_tasks.py

The questions are of the kinds the default prompt set checks (arithmetic, reasoning, factual;
see make_prompts.py) but worded otherwise, so that none is a prompt of the default corpus: they
are never trained on (tests/test_tasks.py checks it). Each line is {"split", "category",
"question", "answer", "choices", "label"}: the multiple-choice task scores `choices` (the answer
at `label`), the exact-match task compares a generated answer to `answer`. Wrong choices are the
answer's neighbours: nearby numbers for arithmetic and sequences, the other people of a
puzzle, other capitals or answers of the same type for facts. `split` is "test" (scored) or
"dev" (the few-shot examples).
"""

import json
import random
from pathlib import Path

from make_prompts import CAPITALS, ITEMS, NAMES

SEED = 20251129
OUT = Path(__file__).resolve().parent.parent / "edgekd" / "tasks" / "questions.jsonl"
N_CHOICES = 4
DEV = 12  # few-shot examples, drawn first

MORE_CAPITALS = [
    ("Mexico", "Mexico City"),
    ("India", "New Delhi"),
    ("Turkey", "Ankara"),
    ("the Netherlands", "Amsterdam"),
    ("Belgium", "Brussels"),
    ("Switzerland", "Bern"),
    ("Chile", "Santiago"),
    ("Colombia", "Bogota"),
    ("Vietnam", "Hanoi"),
    ("Indonesia", "Jakarta"),
    ("the Philippines", "Manila"),
    ("Morocco", "Rabat"),
    ("Nigeria", "Abuja"),
    ("Iceland", "Reykjavik"),
    ("New Zealand", "Wellington"),
    ("the Czech Republic", "Prague"),
    ("Romania", "Bucharest"),
    ("Pakistan", "Islamabad"),
    ("Saudi Arabia", "Riyadh"),
    ("Ethiopia", "Addis Ababa"),
    ("Venezuela", "Caracas"),
    ("Scotland", "Edinburgh"),
    ("Wales", "Cardiff"),
    ("Croatia", "Zagreb"),
]
CAPITAL_TEMPLATES = ["Name the capital city of {c}.", "The capital of {c} is which city?"]
# (question, answer, answers of the same type to draw wrong choices from)
NUMBER_FACTS = [
    ("A spider walks on how many legs?", 8),
    ("An insect walks on how many legs?", 6),
    ("A week lasts how many days?", 7),
    ("A year has how many months?", 12),
    ("A day lasts how many hours?", 24),
    ("An hour lasts how many minutes?", 60),
    ("A square has how many sides?", 4),
    ("A pentagon has how many sides?", 5),
    ("A triangle has how many corners?", 3),
    ("A meter is how many centimeters?", 100),
    ("A kilogram is how many grams?", 1000),
    ("A dozen eggs is how many eggs?", 12),
    ("A regular year has how many days?", 365),
    ("The English alphabet has how many letters?", 26),
    ("A standard piano has how many keys?", 88),
    ("A chess board has how many squares?", 64),
]
PLANETS = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]
WORD_FACTS = [
    ("Which planet is known as the Red Planet?", "Mars", PLANETS),
    ("Which planet has the most famous rings?", "Saturn", PLANETS),
    ("Which planet is the largest in the solar system?", "Jupiter", PLANETS),
    ("Which planet do we live on?", "Earth", PLANETS),
    (
        "Which gas do plants take in from the air to make food?",
        "carbon dioxide",
        ["oxygen", "nitrogen", "carbon dioxide", "helium"],
    ),
    (
        "Which gas do people need to breathe to live?",
        "oxygen",
        ["oxygen", "nitrogen", "carbon dioxide", "helium"],
    ),
    ("What is frozen water called?", "ice", ["ice", "steam", "fog", "rain"]),
    ("What color is the sky on a clear day?", "blue", ["blue", "green", "red", "yellow"]),
    ("What color are ripe bananas?", "yellow", ["blue", "green", "red", "yellow"]),
    (
        "Which animal is known as the king of the jungle?",
        "lion",
        ["lion", "tiger", "elephant", "zebra"],
    ),
    (
        "Which is the largest ocean on Earth?",
        "Pacific",
        ["Pacific", "Atlantic", "Indian", "Arctic"],
    ),
    ("What do bees make?", "honey", ["honey", "milk", "silk", "wax paper"]),
]


def _numbers_near(answer: int, rng: random.Random, step: int = 1) -> list[str]:
    """The answer and three different positive numbers near it (off by a step or two, or ten)."""
    near = {answer + d for d in (-2 * step, -step, step, 2 * step, -10, 10)} - {answer}
    wrong = rng.sample(sorted(n for n in near if n > 0), N_CHOICES - 1)
    return [str(n) for n in [answer, *wrong]]


def _shuffled(question: str, category: str, answer: str, choices: list[str], rng) -> dict:
    rng.shuffle(choices)
    return {
        "category": category,
        "question": question,
        "answer": answer,
        "choices": choices,
        "label": choices.index(answer),
    }


def arithmetic(rng: random.Random, n: int) -> list[dict]:
    """Word problems worded unlike the default prompts, answers computed here."""

    def add(name, it):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        q = f"{name} collects {a} {it} on Monday and {b} on Tuesday. How many {it} in all?"
        return q, a + b

    def sub(name, it):
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 1)
        return f"{name} had {a} {it} and lost {b}. How many {it} are left?", a - b

    def mul(name, it):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"Each of {a} bags holds {b} {it}. How many {it} are in the bags?", a * b

    def div(name, it):
        each, k = rng.randint(2, 12), rng.randint(2, 9)
        q = f"{each * k} {it} are packed into {k} equal boxes. How many {it} go in each box?"
        return q, each

    def speed(name, it):
        v, h = rng.choice([30, 40, 50, 60, 70, 80, 90]), rng.randint(2, 6)
        return f"A car drives {v} kilometers each hour. How many kilometers in {h} hours?", v * h

    def price(name, it):
        k, c = rng.randint(2, 9), rng.randint(2, 15)
        return f"One ticket costs {c} dollars. How many dollars do {k} tickets cost?", k * c

    makers = [add, sub, mul, div, speed, price]
    rows, seen = [], set()
    while len(rows) < n:
        q, answer = makers[len(rows) % len(makers)](rng.choice(NAMES), rng.choice(ITEMS))
        if q not in seen:
            seen.add(q)
            rows.append(_shuffled(q, "arithmetic", str(answer), _numbers_near(answer, rng), rng))
    return rows


def reasoning(rng: random.Random, n: int) -> list[dict]:
    """Age orderings (the choices are the puzzle's people and one other), sequences (nearby
    numbers), comparisons (the two numbers and two near them)."""
    rows, seen = [], set()
    while len(rows) < n:
        kind = len(rows) % 3
        if kind == 0:
            a, b, c, other = rng.sample(NAMES, 4)
            young = rng.random() < 0.5
            who = "youngest" if young else "oldest"
            q = f"{a} is older than {b}. {b} is older than {c}. Who is the {who}?"
            answer, choices = (c if young else a), [a, b, c, other]
        elif kind == 1:
            start, step = rng.randint(1, 30), rng.randint(2, 11)
            seq = ", ".join(str(start + i * step) for i in range(4))
            q = f"Continue the pattern: {seq}. What is the next number?"
            answer = str(start + 4 * step)
            choices = _numbers_near(start + 4 * step, rng)
        else:
            x, y = rng.sample(range(10, 100), 2)
            q = f"Which number is smaller, {x} or {y}?"
            answer = str(min(x, y))
            choices = [str(x), str(y), *rng.sample([str(max(x, y) + 1), str(min(x, y) - 1)], 2)]
        if q not in seen:
            seen.add(q)
            rows.append(_shuffled(q, "reasoning", answer, choices, rng))
    return rows


def factual(rng: random.Random) -> list[dict]:
    """Capitals (wrong choices: other capitals), counts (nearby numbers) and facts whose wrong
    choices are answers of the same type."""
    capitals = CAPITALS + MORE_CAPITALS
    cities = [city for _, city in capitals]
    rows = []
    for country, city in capitals:
        q = rng.choice(CAPITAL_TEMPLATES).format(c=country)
        wrong = rng.sample([c for c in cities if c != city], N_CHOICES - 1)
        rows.append(_shuffled(q, "factual", city, [city, *wrong], rng))
    for q, answer in NUMBER_FACTS:
        step = max(1, answer // 10)
        rows.append(_shuffled(q, "factual", str(answer), _numbers_near(answer, rng, step), rng))
    for q, answer, kind in WORD_FACTS:
        wrong = rng.sample([k for k in kind if k != answer], N_CHOICES - 1)
        rows.append(_shuffled(q, "factual", answer, [answer, *wrong], rng))
    return rows


def build() -> list[dict]:
    rng = random.Random(SEED)
    rows = arithmetic(rng, 120) + reasoning(rng, 90) + factual(rng)
    rng.shuffle(rows)
    questions = [r["question"] for r in rows]
    assert len(set(questions)) == len(questions), "duplicate questions"
    return [{"split": "dev" if i < DEV else "test", **r} for i, r in enumerate(rows)]


def main() -> None:
    rows = build()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["split"]] = counts.get(r["split"], 0) + 1
    print(f"wrote {len(rows)} questions to {OUT}: {counts}")


if __name__ == "__main__":
    main()
