"""Generate edgekd/assets/prompts.jsonl, the default prompt set, from templates x topic lists.

Deterministic (fixed seed): running it again rewrites the same file. Run from the repo root:

    python scripts/make_prompts.py

Each line is {"prompt", "category"} plus "answer" for checkable items (arithmetic answers are
computed here, factual answers are hand-checked constants).
"""

import json
import random
from pathlib import Path

SEED = 20240601
OUT = Path(__file__).resolve().parent.parent / "edgekd" / "assets" / "prompts.jsonl"

NAMES = [
    "Tom",
    "Anna",
    "Ravi",
    "Mei",
    "Lucas",
    "Sara",
    "Omar",
    "Nina",
    "Jack",
    "Leila",
    "Ken",
    "Eva",
]
ITEMS = [
    "apples",
    "marbles",
    "stickers",
    "books",
    "pencils",
    "cookies",
    "cards",
    "stamps",
    "shells",
]

EXPLAIN_TOPICS = [
    "photosynthesis",
    "gravity",
    "the water cycle",
    "how vaccines work",
    "inflation",
    "how a rainbow forms",
    "why the sky is blue",
    "what DNA is",
    "how the internet works",
    "what a black hole is",
    "how batteries store energy",
    "why we have seasons",
    "how airplanes stay in the air",
    "what an atom is",
    "how the heart pumps blood",
    "what compound interest is",
    "how a refrigerator keeps food cold",
    "what an eclipse is",
    "how bees make honey",
    "what a computer program is",
    "why ice floats on water",
    "how sound travels",
    "what a volcano is",
    "how tides work",
    "what machine learning is",
    "how recycling helps the environment",
    "what a democracy is",
    "why leaves change color",
    "how muscles grow stronger",
    "what electricity is",
]
EXPLAIN_TEMPLATES = [
    "Explain {t} in simple terms.",
    "Can you explain {t} to a ten-year-old?",
    "Give a short explanation of {t}.",
    "In two or three sentences, explain {t}.",
]

STORY_CHARACTERS = [
    "a lonely robot",
    "a brave little mouse",
    "a young wizard",
    "an old lighthouse keeper",
    "a curious cat",
    "a girl able to talk to birds",
    "a dragon afraid of fire",
    "a lost astronaut",
    "a clumsy knight",
    "a friendly ghost",
    "a boy with a magic map",
    "a tired baker",
    "a talking tree",
    "a penguin dreaming of flight",
    "a detective dog",
]
STORY_EVENTS = [
    "finds a hidden door",
    "makes an unexpected friend",
    "gets lost in a big city",
    "discovers a secret garden",
    "has to solve a mystery before sunset",
    "learns to be patient",
]
STORY_TEMPLATES = [
    "Write a short story about {t}.",
    "Tell me a bedtime story about {t}.",
    "Write a five-sentence story about {t}.",
]

LIST_THINGS = [
    "fruits that are high in vitamin C",
    "ways to save water at home",
    "animals that live in the ocean",
    "tips for studying better",
    "healthy breakfast ideas",
    "countries in South America",
    "things to pack for a camping trip",
    "ways to reduce stress",
    "musical instruments",
    "hobbies you can do indoors",
    "benefits of regular exercise",
    "vegetables that grow quickly",
    "ways to be kind to others",
    "board games for families",
    "things to do on a rainy day",
    "common kitchen tools",
    "sources of renewable energy",
    "ways to improve sleep",
    "birds that cannot fly",
    "questions to ask at a job interview",
    "safety rules for swimming",
    "ways to learn a new language",
    "uses for baking soda",
    "signs of spring",
]
LIST_TEMPLATES = ["List five {t}.", "Name three {t}.", "Give me a short list of {t}."]

HOWTO_TASKS = [
    "boil an egg",
    "change a flat bicycle tire",
    "plant a tree",
    "write a thank-you note",
    "make a cup of tea",
    "start a vegetable garden",
    "clean a laptop keyboard",
    "prepare for a job interview",
    "make a paper airplane",
    "learn to juggle",
    "organize a small closet",
    "make a simple budget",
    "brew coffee with a French press",
    "wash a wool sweater",
    "care for a houseplant",
    "make pancakes",
    "tie a tie",
    "back up files on a computer",
    "train a puppy to sit",
    "write a good email subject line",
    "memorize a short poem",
    "set up a fish tank",
    "bake bread at home",
    "fold a fitted sheet",
]
HOWTO_TEMPLATES = [
    "How do I {t}?",
    "Give step-by-step instructions to {t}.",
    "What is the easiest way to {t}?",
]

OPEN_REASONING = [
    "Why might a store sell the same product at different prices in different cities?",
    "If you could only bring three items to a desert island, what would you choose and why?",
    "Is it better to study for one long session or several short ones? Explain your reasoning.",
    "A farmer needs to cross a river with a wolf, a goat and a cabbage. How can he do it?",
    "Why do we see lightning before we hear thunder?",
    "What are the pros and cons of working from home?",
    "Why is it a good idea to read the instructions before assembling furniture?",
    "If a plant is not growing well, what could be the possible reasons?",
    "Why do people wear light-colored clothes in summer?",
    "What would happen if everyone in a city used a bicycle instead of a car?",
    "Why does a metal spoon feel colder than a wooden spoon at the same temperature?",
    "How would you decide which of two job offers to accept?",
    "Why is it important to wash your hands before eating?",
    "If a bus is always late in the morning, what could the city do about it?",
    "Why might a heavy ship float while a small stone sinks?",
]

CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Germany", "Berlin"),
    ("Spain", "Madrid"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Australia", "Canberra"),
    ("Russia", "Moscow"),
    ("China", "Beijing"),
    ("Kenya", "Nairobi"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Greece", "Athens"),
    ("Portugal", "Lisbon"),
    ("Ireland", "Dublin"),
    ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
    ("Thailand", "Bangkok"),
    ("South Korea", "Seoul"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Hungary", "Budapest"),
    ("Cuba", "Havana"),
]
FACTS = [
    ("How many days are in a week?", "7"),
    ("How many months are in a year?", "12"),
    ("How many hours are in a day?", "24"),
    ("How many minutes are in an hour?", "60"),
    ("How many seconds are in a minute?", "60"),
    ("How many legs does a spider have?", "8"),
    ("How many legs does an insect have?", "6"),
    ("How many sides does a triangle have?", "3"),
    ("How many sides does a hexagon have?", "6"),
    ("How many sides does an octagon have?", "8"),
    ("How many continents are there on Earth?", "7"),
    ("How many planets are in our solar system?", "8"),
    ("How many days are in a leap year?", "366"),
    ("How many centimeters are in a meter?", "100"),
    ("How many grams are in a kilogram?", "1000"),
    ("How many letters are in the English alphabet?", "26"),
    ("At what temperature in degrees Celsius does water freeze at sea level?", "0"),
    ("At what temperature in degrees Celsius does water boil at sea level?", "100"),
    ("Which planet is closest to the Sun?", "Mercury"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("What is the chemical symbol for gold?", "Au"),
    ("What is the chemical formula of water?", "H2O"),
    ("What color do you get when you mix blue and yellow paint?", "green"),
    ("Who wrote the play Romeo and Juliet?", "William Shakespeare"),
]
CAPITAL_TEMPLATES = ["What is the capital of {c}?", "Which city is the capital of {c}?"]


def arithmetic(rng: random.Random) -> list[dict]:
    """Word problems whose answers are computed here (8 templates, distinct operands)."""

    def add(n, it):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        p = f"{n} has {a} {it} and buys {b} more. How many {it} does {n} have now?"
        return p, a + b

    def sub(n, it):
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 1)
        p = f"{n} has {a} {it} and gives {b} to a friend. How many {it} does {n} have left?"
        return p, a - b

    def mul(n, it):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        p = f"There are {a} boxes with {b} {it} in each box. How many {it} are there in total?"
        return p, a * b

    def div(n, it):
        each, k = rng.randint(2, 12), rng.randint(2, 9)
        p = (
            f"{n} shares {each * k} {it} equally among {k} friends. "
            f"How many {it} does each friend get?"
        )
        return p, each

    def speed(n, it):
        v, h = rng.choice([40, 50, 60, 70, 80, 90, 100, 120]), rng.randint(2, 6)
        p = (
            f"A train travels at {v} kilometers per hour for {h} hours. "
            "How many kilometers does it travel?"
        )
        return p, v * h

    def price(n, it):
        k, c = rng.randint(2, 9), rng.randint(2, 15)
        p = f"{n} buys {k} notebooks that cost {c} dollars each. How many dollars does {n} spend?"
        return p, k * c

    def sold(n, it):
        a = rng.randint(30, 90)
        b = rng.randint(1, a // 2)
        c = rng.randint(1, a - b - 1)
        p = (
            f"A shop had {a} {it}. It sold {b} in the morning and {c} in the afternoon. "
            f"How many {it} are left?"
        )
        return p, a - b - c

    def pages(n, it):
        a, b, c = rng.randint(5, 40), rng.randint(5, 40), rng.randint(5, 40)
        p = (
            f"{n} reads {a} pages on Monday, {b} pages on Tuesday and {c} pages on Wednesday. "
            f"How many pages did {n} read in total?"
        )
        return p, a + b + c

    makers = [add, sub, mul, div, speed, price, sold, pages]
    rows, seen = [], set()
    while len(rows) < 64:
        make = makers[len(rows) % len(makers)]
        prompt, answer = make(rng.choice(NAMES), rng.choice(ITEMS))
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "category": "arithmetic", "answer": str(answer)})
    return rows


def reasoning(rng: random.Random) -> list[dict]:
    """Open reasoning questions plus checkable ones (ordering, sequences, comparisons)."""
    rows = [{"prompt": p, "category": "reasoning"} for p in OPEN_REASONING]
    for _ in range(10):
        a, b, c = rng.sample(NAMES, 3)
        ask_short = rng.random() < 0.5
        prompt = (
            f"{a} is taller than {b}. {b} is taller than {c}. "
            f"Who is the {'shortest' if ask_short else 'tallest'}?"
        )
        rows.append({"prompt": prompt, "category": "reasoning", "answer": c if ask_short else a})
    for _ in range(10):
        start, step = rng.randint(1, 20), rng.randint(2, 9)
        seq = [start + i * step for i in range(4)]
        prompt = f"What number comes next in the sequence {', '.join(map(str, seq))}?"
        rows.append({"prompt": prompt, "category": "reasoning", "answer": str(start + 4 * step)})
    for _ in range(10):
        x, y = rng.sample(range(10, 100), 2)
        prompt = f"Which number is larger, {x} or {y}?"
        rows.append({"prompt": prompt, "category": "reasoning", "answer": str(max(x, y))})
    return rows


def crossed(category: str, templates: list[str], topics: list[str], n: int, rng) -> list[dict]:
    """n distinct prompts sampled from every template x topic pair."""
    pairs = [(t, x) for t in templates for x in topics]
    return [{"prompt": t.format(t=x), "category": category} for t, x in rng.sample(pairs, n)]


def build() -> list[dict]:
    rng = random.Random(SEED)
    rows = []
    rows += crossed("explanation", EXPLAIN_TEMPLATES, EXPLAIN_TOPICS, 50, rng)
    stories = [f"{c} who {e}" for c in STORY_CHARACTERS for e in STORY_EVENTS]
    rows += crossed("story", STORY_TEMPLATES, stories, 45, rng)
    rows += crossed("list", LIST_TEMPLATES, LIST_THINGS, 45, rng)
    rows += crossed("howto", HOWTO_TEMPLATES, HOWTO_TASKS, 45, rng)
    rows += reasoning(rng)
    rows += arithmetic(rng)
    rows += [
        {"prompt": t.format(c=country), "category": "factual", "answer": capital}
        for (country, capital), t in zip(
            CAPITALS, rng.choices(CAPITAL_TEMPLATES, k=len(CAPITALS)), strict=True
        )
    ]
    rows += [{"prompt": p, "category": "factual", "answer": a} for p, a in FACTS]
    prompts = [r["prompt"] for r in rows]
    assert len(set(prompts)) == len(prompts), "duplicate prompts"
    return rows


def main() -> None:
    rows = build()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["category"]] = counts.get(r["category"], 0) + 1
    print(f"wrote {len(rows)} prompts to {OUT}: {counts}")


if __name__ == "__main__":
    main()
