import json
import re
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer

from edgekd.data import (
    IGNORE,
    TokenizedExample,
    collate,
    default_prompts,
    fingerprint,
    heldout_mask,
    load_corpus,
    pack,
    read_jsonl,
    split_heldout,
    tokenize_rows,
    write_jsonl_atomic,
)
from edgekd.errors import EdgekdError


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def chat(*turns):
    roles = ["user", "assistant"]
    return {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}


# --- loading ---


def test_load_jsonl_text_and_chat(tmp_path):
    rows = [{"text": "hello world"}, {**chat("hi", "hello"), "category": "x"}]
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(r) for r in rows[:1]] + [""])
    path.write_text(path.read_text() + json.dumps(rows[1]) + "\n")
    assert load_corpus(str(path)) == rows


@pytest.mark.parametrize(
    "bad, expect",
    [
        ('{"text": "ok"', "malformed JSON"),
        ('{"prompt": "no text"}', "missing both 'text' and 'messages'"),
        ('{"text": 3}', "'text' must be a string"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "messages[0]"),
        ('{"messages": [{"role": "user", "content": 5}]}', "messages[0]"),
        ("[1, 2]", "expected"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, bad, expect):
    path = write_lines(tmp_path / "c.jsonl", ['{"text": "fine"}', "", bad])
    with pytest.raises(EdgekdError) as e:
        load_corpus(str(path))
    msg = str(e.value)
    assert f"{path}:3:" in msg and expect in msg and "\n" not in msg


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(EdgekdError, match="no such file"):
        load_corpus(str(tmp_path / "nope.jsonl"))
    empty = write_lines(tmp_path / "e.jsonl", ["", "  "])
    with pytest.raises(EdgekdError, match=re.escape(f"{empty}: the file holds no examples")):
        load_corpus(str(empty))
    (tmp_path / "d").mkdir()
    with pytest.raises(EdgekdError, match="folder has no"):
        load_corpus(str(tmp_path / "d"))
    with pytest.raises(EdgekdError, match="unsupported"):
        load_corpus(str(write_lines(tmp_path / "x.csv", ["a,b"])))


def test_text_files_and_folders(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    write_lines(d / "a.txt", ["First para", "still first.", "", "", "Second para.", ""])
    (d / "sub" / "b.md").write_text("# Title\r\n\r\nBody text.")
    write_lines(d / "ignored.csv", ["x"])
    assert load_corpus(str(d / "a.txt")) == [
        {"text": "First para\nstill first."},
        {"text": "Second para."},
    ]
    assert [r["text"] for r in load_corpus(str(d))] == [
        "First para\nstill first.",
        "Second para.",
        "# Title",
        "Body text.",
    ]


def test_hf_name_not_on_this_machine_is_one_line(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # Offline, as this machine is: the name resolves neither locally nor in the hub's cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EdgekdError, match="'someone/some-dataset' could not be loaded"):
        load_corpus("someone/some-dataset")


def test_jsonl_roundtrip_and_fingerprint(tmp_path):
    rows = [{"text": "é"}, chat("a", "b")]
    path = tmp_path / "out" / "rows.jsonl"
    write_jsonl_atomic(path, rows)
    assert read_jsonl(path) == rows
    assert [p.name for p in path.parent.iterdir()] == ["rows.jsonl"]
    assert fingerprint(rows) == fingerprint([dict(reversed(r.items())) for r in rows])
    assert fingerprint(rows) != fingerprint(rows[::-1])
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint(rows))


# --- held-out split ---


def test_heldout_split_is_stable_and_disjoint():
    rows = [{"text": f"example {i}"} for i in range(400)]
    train, held = split_heldout(rows, 0.1, max_heldout=1000)
    assert 20 < len(held) < 60 and len(train) + len(held) == 400
    assert not {r["text"] for r in train} & {r["text"] for r in held}
    train_r, held_r = split_heldout(rows[::-1], 0.1, max_heldout=1000)
    assert sorted(map(str, held_r)) == sorted(map(str, held))
    mask = heldout_mask(rows, 0.1)
    assert heldout_mask(rows[::-1], 0.1) == mask[::-1]
    assert held == [r for r, m in zip(rows, mask, strict=True) if m]


def test_heldout_split_keys_on_the_prompt_not_the_answer():
    # Teacher-written corpora answer the same prompts differently (sampled, CoT): each must hold
    # out the same prompts, and a prompt's rows all land on one side.
    prompts = [f"question {i}" for i in range(300)]
    greedy = [chat(p, f"greedy answer to {p}") for p in prompts]
    sampled = [chat(p, f"a sampled answer {i}") for i, p in enumerate(prompts)]
    assert heldout_mask(greedy, 0.1) == heldout_mask(sampled, 0.1)
    assert any(heldout_mask(greedy, 0.1))
    train, held = split_heldout(greedy + sampled, 0.1, max_heldout=1000)
    held_prompts = {r["messages"][0]["content"] for r in held}
    assert len(held) == 2 * len(held_prompts)
    assert not held_prompts & {r["messages"][0]["content"] for r in train}


def test_heldout_cap_drops_extra_rows_from_both():
    rows = [{"text": f"example {i}"} for i in range(200)]
    train, held = split_heldout(rows, 0.3, max_heldout=5)
    _, held_r = split_heldout(rows[::-1], 0.3, max_heldout=5)
    assert len(held) == 5 and sorted(map(str, held_r)) == sorted(map(str, held))
    assert len(train) == sum(not m for m in heldout_mask(rows, 0.3)) < 200 - 5
    assert not {r["text"] for r in train} & {r["text"] for r in held}


def test_heldout_edge_fractions(chat_jsonl):
    rows = load_corpus(str(chat_jsonl))
    assert split_heldout(rows, 0.0, 10) == (rows, [])
    train, held = split_heldout(rows[:3], 0.01, 10)
    assert len(held) == 1 and len(train) == 2


# --- tokenization ---


# ChatML's end-of-turn token. Not tokenizer.eos_token: transformers' GGUF loader reports
# <|im_start|> there, though the GGUF says <|im_end|>.
END = "<|im_end|>"


def targets(ex):
    return [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE]


def test_chat_rows_score_only_assistant_tokens(tokenizer):
    row = chat("What is 2 plus 3?", "2 plus 3 is 5.")
    (ex,) = tokenize_rows([row], tokenizer, max_len=512)
    assert tokenizer.decode(targets(ex)) == "2 plus 3 is 5." + END
    full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
    assert tokenizer.decode(ex.input_ids) == full
    assert all(lab in (IGNORE, t) for t, lab in zip(ex.input_ids, ex.labels, strict=True))
    assert ex.labels[: len(ex.labels) // 2] == [IGNORE] * (len(ex.labels) // 2)


def test_multi_turn_chat_with_system(tokenizer):
    row = chat("Hi!", "Hello, how can I help?", "Name a color.", "Blue")
    row["messages"].insert(0, {"role": "system", "content": "Be brief."})
    (ex,) = tokenize_rows([row], tokenizer, max_len=512)
    assert tokenizer.decode(targets(ex)) == f"Hello, how can I help?{END}Blue{END}"
    spans = sum(
        1 for i, lab in enumerate(ex.labels) if lab != IGNORE and ex.labels[i - 1] == IGNORE
    )
    assert spans == 2


def test_text_rows_truncation_and_dropping(tokenizer):
    rows = [{"text": "The quick brown fox jumps over the lazy dog."}, chat("x " * 50, "y")]
    long_ex, *rest = tokenize_rows(rows, tokenizer, max_len=512)
    assert long_ex.labels == long_ex.input_ids and long_ex.input_ids[-1] == tokenizer.eos_token_id
    assert len(rest) == 1
    short = tokenize_rows(rows, tokenizer, max_len=8)
    assert len(short) == 1 and short[0].input_ids == long_ex.input_ids[:8]


def test_chat_rows_need_a_chat_template(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = None
    assert tokenize_rows([{"text": "fine"}], tok, max_len=16)
    with pytest.raises(EdgekdError, match="no chat template"):
        tokenize_rows([chat("a", "b")], tok, max_len=16)


def test_collate_pads_right():
    exs = [TokenizedExample([5, 6, 7], [IGNORE, 6, 7]), TokenizedExample([8], [8])]
    batch = collate(exs, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["input_ids"].dtype == torch.long


def test_pack_keeps_labels_aligned():
    exs = [
        TokenizedExample([1, 2, 3], [IGNORE, 2, 3]),
        TokenizedExample([4, 5], [4, 5]),
        TokenizedExample([6, 7, 8, 9], [IGNORE, IGNORE, 8, 9]),
        TokenizedExample([10], [10]),
    ]
    packed = pack(exs, max_len=5)
    assert [p.input_ids for p in packed] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    # Each example's first token is never predicted from the previous example.
    assert [p.labels for p in packed] == [
        [IGNORE, 2, 3, IGNORE, 5],
        [IGNORE, IGNORE, 8, 9, IGNORE],
    ]
    too_long = pack([TokenizedExample([1] * 7, [1] * 7)], max_len=4)
    assert [len(p.input_ids) for p in too_long] == [4]


# --- shipped prompt set ---

ARITHMETIC = [
    (r"has (\d+) \w+ and buys (\d+) more", lambda a, b: a + b),
    (r"has (\d+) \w+ and gives (\d+) to a friend", lambda a, b: a - b),
    (r"(\d+) boxes with (\d+) \w+ in each box", lambda a, b: a * b),
    (r"shares (\d+) \w+ equally among (\d+) friends", lambda a, b: a // b),
    (r"at (\d+) kilometers per hour for (\d+) hours", lambda a, b: a * b),
    (r"buys (\d+) notebooks that cost (\d+) dollars each", lambda a, b: a * b),
    (r"had (\d+) \w+\. It sold (\d+) in the morning and (\d+)", lambda a, b, c: a - b - c),
    (r"reads (\d+) pages on Monday, (\d+) pages on Tuesday and (\d+)", lambda a, b, c: a + b + c),
]


def test_prompt_set_shape():
    rows = default_prompts()
    prompts = [r["prompt"] for r in rows]
    assert len(rows) >= 320 and len(set(prompts)) == len(prompts)
    assert all(isinstance(p, str) and len(p) > 10 for p in prompts)
    counts = Counter(r["category"] for r in rows)
    expected = {"explanation", "story", "list", "howto", "reasoning", "arithmetic", "factual"}
    assert set(counts) == expected and min(counts.values()) >= 30
    assert sum("answer" in r for r in rows if r["category"] == "factual") >= 30


def test_prompt_set_arithmetic_answers_are_correct():
    rows = [r for r in default_prompts() if r["category"] == "arithmetic"]
    assert len(rows) >= 50
    for r in rows:
        hits = [(m, f) for pat, f in ARITHMETIC if (m := re.search(pat, r["prompt"]))]
        assert len(hits) == 1, r["prompt"]
        match, f = hits[0]
        expected = f(*map(int, match.groups()))
        assert expected >= 0 and r["answer"] == str(expected), r["prompt"]


def test_prompt_set_reasoning_answers_are_correct():
    checked = 0
    for r in default_prompts():
        p = r["prompt"]
        if m := re.fullmatch(r"What number comes next in the sequence ([\d, ]+)\?", p):
            seq = [int(x) for x in m.group(1).split(", ")]
            assert r["answer"] == str(2 * seq[-1] - seq[-2]), p
        elif m := re.fullmatch(r"Which number is larger, (\d+) or (\d+)\?", p):
            assert r["answer"] == str(max(map(int, m.groups()))), p
        elif m := re.fullmatch(
            r"(\w+) is taller than (\w+)\. \2 is taller than (\w+)\. "
            r"Who is the (shortest|tallest)\?",
            p,
        ):
            assert r["answer"] == (m[3] if m[4] == "shortest" else m[1]), p
        else:
            assert "answer" not in r or r["category"] != "reasoning", p
            continue
        checked += 1
    assert checked == 30


UNSAFE_TEMPLATES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__['os'].system('touch pwned') }}",
    "{% for m in messages %}{{ m.update({'content': 'x'}) }}{% endfor %}",  # mutating the input
]


@pytest.mark.parametrize("template", UNSAFE_TEMPLATES)
def test_chat_template_runs_in_transformers_sandbox(tokenizer, template, tmp_path, monkeypatch):
    from copy import deepcopy

    from jinja2.exceptions import SecurityError, UndefinedError

    from edgekd.data import render_chat

    monkeypatch.chdir(tmp_path)
    tok = deepcopy(tokenizer)
    tok.chat_template = template
    messages = [{"role": "user", "content": "hi"}]
    # transformers 4.57 itself stops the template (ImmutableSandboxedEnvironment) ...
    with pytest.raises((SecurityError, UndefinedError)):
        tok.apply_chat_template(messages, tokenize=False)
    # ... and edgekd says so in one line that names the tokenizer.
    with pytest.raises(EdgekdError, match="chat template of tokenizer"):
        render_chat(tok, messages, add_generation_prompt=False)
    assert not (tmp_path / "pwned").exists()
    assert messages == [{"role": "user", "content": "hi"}]
