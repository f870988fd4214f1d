"""Corpora -> tokenized examples: loading, the shipped prompts, teacher answers, held-out split,
chat-template masking, collation and packing.

A row is {"text": str} or {"messages": [{"role", "content"}, ...]}; other keys ("category",
"answer") ride along untouched.
"""

import hashlib
import importlib.resources
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from edgekd import chat_template
from edgekd.atomic import atomic_path
from edgekd.errors import EdgekdError
from edgekd.tokens import common_prefix, special_ids

IGNORE = -100
TEXT_SUFFIXES = (".txt", ".md")
CORPUS_SUFFIXES = (".jsonl", *TEXT_SUFFIXES)
ROLES = ("system", "user", "assistant")
HF_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
ROW_SHAPE = (
    '{"text": str} or {"messages": [{"role": "system|user|assistant", "content": str}, ...]}'
)


def _read_text(path: Path) -> str:
    """The file as text; bytes that are not UTF-8, or a NUL (binary content), are an error naming
    the file, the line and the byte offset."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = e.start
        why = f"not UTF-8 text (byte {bad} is {raw[bad : bad + 1]!r})"
    else:
        bad = raw.find(b"\0")
        if bad < 0:
            return text
        why = f"binary content (a NUL byte at byte {bad})"
    line = raw.count(b"\n", 0, bad) + 1
    raise EdgekdError(f"{path}:{line}: {why}; pass a UTF-8 text file")


def _parsed_lines(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed JSON) for each non-blank line; malformed JSON names file and line."""
    parsed = []
    for n, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            parsed.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise EdgekdError(f"{path}:{n}: malformed JSON ({e.msg}); fix the line") from e
    return parsed


def read_jsonl(path: Path) -> list[dict]:
    """JSON objects, one per non-blank line; a bad line is an error naming file and line."""
    path = Path(path)
    rows = []
    for n, row in _parsed_lines(path):
        if not isinstance(row, dict):
            raise EdgekdError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """Write rows as JSONL under a temporary name, fsync, then rename over path."""
    with atomic_path(Path(path)) as tmp, tmp.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _row_problem(row: dict) -> str | None:
    """What is wrong with a corpus row, or None if it is valid."""
    if isinstance(row.get("text"), str):
        return None
    msgs = row.get("messages")
    if "text" not in row and msgs is None:
        return f"missing both 'text' and 'messages'; expected {ROW_SHAPE}"
    if "text" in row:
        return f"'text' must be a string, got {type(row['text']).__name__}"
    if not isinstance(msgs, list) or not msgs:
        return f"'messages' must be a non-empty list; expected {ROW_SHAPE}"
    for i, m in enumerate(msgs):
        if not (
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
        ):
            return f"messages[{i}] is {json.dumps(m)[:80]}; expected {ROW_SHAPE}"
    return None


def _load_jsonl_corpus(path: Path) -> list[dict]:
    rows = []
    for n, row in _parsed_lines(path):
        problem = _row_problem(row) if isinstance(row, dict) else f"expected {ROW_SHAPE}"
        if problem:
            raise EdgekdError(f"{path}:{n}: {problem}")
        rows.append(row)
    return rows


def _load_text(path: Path) -> list[dict]:
    # One example per blank-line-separated block: paragraphs keep their meaning, and pack()
    # joins short ones back into full-length sequences.
    text = _read_text(path).replace("\r\n", "\n")
    blocks = [b.strip() for b in text.split("\n\n")]
    return [{"text": b} for b in blocks if b]


def _load_file(path: Path) -> list[dict]:
    if path.suffix not in CORPUS_SUFFIXES:
        raise EdgekdError(f"{path}: unsupported corpus file type; use {', '.join(CORPUS_SUFFIXES)}")
    rows = _load_jsonl_corpus(path) if path.suffix == ".jsonl" else _load_text(path)
    if not rows:
        raise EdgekdError(f"{path}: the file holds no examples; add some or point --data elsewhere")
    return rows


def _load_hf_dataset(name: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:
        raise EdgekdError(f"Hugging Face dataset {name!r} could not be loaded: {e}") from e
    column = next((c for c in ("messages", "text") if c in ds.column_names), None)
    if column is None:
        raise EdgekdError(
            f"Hugging Face dataset {name!r} has columns {ds.column_names}; "
            "it needs a 'text' or 'messages' column"
        )
    rows = [{column: value} for value in ds[column]]
    for i, row in enumerate(rows):
        if problem := _row_problem(row):
            raise EdgekdError(f"Hugging Face dataset {name!r}, row {i}: {problem}")
    return rows


def load_corpus(source: str) -> list[dict]:
    """Corpus rows from a .jsonl file, a .txt/.md file, a folder of those, or a HF dataset name.

    JSONL lines are {"text": ...} or {"messages": [...]}. Text files give one {"text"} row per
    blank-line-separated paragraph block. A folder is read recursively in sorted path order.
    A source that is not an existing path and does not look like one is taken as a Hugging Face
    dataset name ("name" or "owner/name", split "train").
    """
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in CORPUS_SUFFIXES)
        if not files:
            raise EdgekdError(f"{path}: folder has no {', '.join(CORPUS_SUFFIXES)} files")
        return [row for f in files for row in _load_file(f)]
    if path.is_file():
        return _load_file(path)
    if not HF_NAME.fullmatch(source) or path.suffix in (*CORPUS_SUFFIXES, ".json"):
        raise EdgekdError(f"{source}: no such file or folder; check the --data path")
    return _load_hf_dataset(source)


def default_prompts() -> list[dict]:
    """The shipped prompt set: {"prompt", "category"} rows, with "answer" on checkable ones."""
    res = importlib.resources.files("edgekd") / "assets" / "prompts.jsonl"
    with importlib.resources.as_file(res) as path:
        return read_jsonl(path)


def _tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def render_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool, tokenize=False):
    """The tokenizer's chat template applied to `messages` (text, or ids with tokenize=True), as
    transformers' apply_chat_template renders it, but within chat_template's limits: a template
    that loops, builds without end or reaches for Python internals is an EdgekdError naming the
    tokenizer and the limit.
    """
    require_chat_template(tokenizer)
    name = f"tokenizer {_tokenizer_name(tokenizer)!r}"
    try:
        template = tokenizer.get_chat_template()
    except ValueError as err:  # several named templates and no default
        raise EdgekdError(f"{name}: {err}") from None
    text = chat_template.render(
        template,
        name,
        messages=messages,
        tools=None,
        documents=None,
        add_generation_prompt=add_generation_prompt,
        **tokenizer.special_tokens_map,
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"] if tokenize else text


def require_chat_template(tokenizer) -> None:
    """EdgekdError unless the tokenizer has a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        name = _tokenizer_name(tokenizer)
        raise EdgekdError(
            f"tokenizer {name!r} has no chat template, so chat rows cannot be formatted; "
            "use a tokenizer with a chat_template or a corpus of {'text': ...} rows"
        )


def _canonical(row: dict) -> bytes:
    return json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


# The held-out rule's name, part of every stage key: a run built under an earlier rule (which
# hashed whole rows) is rebuilt rather than reused with a slice it may have trained on.
HELDOUT_RULE = "sha256-of-prompt"


def _split_key(row: dict) -> dict:
    """What decides a row's side of the split: a chat row's non-assistant turns, else the row.

    Teacher-written corpora (greedy, sampled, beam, CoT) answer the same prompts differently; keyed
    on the prompt, each holds out the same prompts, so methods are compared on the same slice and
    a prompt never trains one arm while another is scored on it.
    """
    if isinstance(row.get("messages"), list):
        return {"messages": [m for m in row["messages"] if m.get("role") != "assistant"]}
    return row


def _hash_score(row: dict) -> float:
    """A stable number in [0, 1) from the row's split key."""
    digest = hashlib.sha256(_canonical(_split_key(row))).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def heldout_mask(rows: list[dict], fraction: float) -> list[bool]:
    """True for rows in the held-out slice: sha256 of the canonical JSON of the row's prompt (its
    non-assistant turns; a text row whole) below fraction.

    Depends only on each row's content, never its position. If fraction > 0 and no row of a
    corpus with at least two rows qualifies, the row with the lowest hash is held out, so small
    corpora still get an evaluation slice.
    """
    scores = [_hash_score(r) for r in rows]
    mask = [s < fraction for s in scores]
    if fraction > 0 and len(rows) >= 2 and not any(mask):
        low = min(scores)
        mask = [s == low for s in scores]
    return mask


def split_heldout(
    rows: list[dict], fraction: float, max_heldout: int
) -> tuple[list[dict], list[dict]]:
    """(train, heldout) by heldout_mask; held-out rows past max_heldout (the ones with the highest
    hash) are dropped from both, so nothing chosen for evaluation is ever trained on."""
    train, heldout = split_indices(rows, fraction, max_heldout)
    return [rows[i] for i in train], [rows[i] for i in heldout]


def split_indices(
    rows: list[dict], fraction: float, max_heldout: int
) -> tuple[list[int], list[int]]:
    """split_heldout's (train, heldout) as row indices, each in row order."""
    mask = heldout_mask(rows, fraction)
    chosen = by_hash(rows, [i for i, m in enumerate(mask) if m])
    train = [i for i, m in enumerate(mask) if not m]
    return train, sorted(chosen[:max_heldout])


def by_hash(rows: list[dict], indices: list[int]) -> list[int]:
    """The indices ordered by their rows' split hash: a stable, category-blind order."""
    return sorted(indices, key=lambda i: _hash_score(rows[i]))


@dataclass
class TokenizedExample:
    """Token ids and per-position targets (IGNORE where not scored); labels are not shifted."""

    input_ids: list[int]
    labels: list[int]


def render_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """The token ids of `messages` through the chat template, as training tokenizes them."""
    text = render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _chat_example(tokenizer, messages: list[dict]) -> TokenizedExample:
    """Only assistant tokens (content and the turn's end token) are targets.

    For each assistant turn, the conversation before it is rendered with the generation prompt;
    the tokens between that prefix and the end of the turn are the reply. Template text after the
    turn's last special token (ChatML's trailing newline) is not a target.
    """
    ids = render_ids(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE] * len(ids)
    special = special_ids(tokenizer)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render_ids(tokenizer, messages[:k], add_generation_prompt=True) if k else []
        upto = render_ids(tokenizer, messages[: k + 1], add_generation_prompt=False)
        start = common_prefix(prefix, ids)
        end = common_prefix(upto, ids)
        # A one-token mismatch is a BPE merge across the prompt/reply boundary; anything more
        # means the template renders earlier turns differently, and the mask would be a guess.
        if start < len(prefix) - 1 or end < len(upto) - 1 or end <= start:
            raise EdgekdError(
                "the tokenizer's chat template renders a conversation prefix differently from "
                "the full conversation, so assistant tokens cannot be located; use a template "
                "that renders turns incrementally, or {'text': ...} rows"
            )
        ends = [i for i in range(start, end) if ids[i] in special]
        end = ends[-1] + 1 if ends else end
        labels[start:end] = ids[start:end]
    return TokenizedExample(ids, labels)


def _text_example(tokenizer, text: str) -> TokenizedExample:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    # An end-of-text token after each document teaches the student where to stop.
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids = [*ids, eos]
    return TokenizedExample(ids, list(ids))


def tokenize_rows(rows: list[dict], tokenizer, *, max_len: int) -> list[TokenizedExample]:
    """Tokenize corpus rows, truncated to max_len; rows left with no target token are dropped.

    Text rows: every token is a target. Chat rows: rendered with the tokenizer's chat template,
    only assistant tokens are targets.
    """
    if any("messages" in r for r in rows):
        require_chat_template(tokenizer)
    examples = (_example(row, tokenizer, max_len) for row in rows)
    return [ex for ex in examples if _has_target(ex)]


def _example(row: dict, tokenizer, max_len: int) -> TokenizedExample:
    if "messages" in row:
        ex = _chat_example(tokenizer, row["messages"])
    else:
        ex = _text_example(tokenizer, row["text"])
    return TokenizedExample(ex.input_ids[:max_len], ex.labels[:max_len])


def _has_target(ex: TokenizedExample) -> bool:
    return any(t != IGNORE for t in ex.labels)


def any_trainable(rows: list[dict], tokenizer, *, max_len: int) -> bool:
    """Whether tokenize_rows would keep at least one of `rows` (tokenizing only until one is
    found: the first row, as a rule)."""
    if any("messages" in r for r in rows):
        require_chat_template(tokenizer)
    return any(_has_target(_example(row, tokenizer, max_len)) for row in rows)


def padding_id(tokenizer) -> int:
    """The token that pads batches: the tokenizer's pad token, else 0 (padding is masked)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def collate(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (IGNORE on padding) as LongTensors."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack(examples: list[TokenizedExample], max_len: int) -> list[TokenizedExample]:
    """Greedily concatenate examples, in order, into sequences of at most max_len tokens.

    The first token of every packed example is not a target, so no token is ever predicted
    from the end of a different example. An example longer than max_len is truncated.
    """
    packed: list[TokenizedExample] = []
    ids: list[int] = []
    labels: list[int] = []
    for e in examples:
        if ids and len(ids) + len(e.input_ids) > max_len:
            packed.append(TokenizedExample(ids, labels))
            ids, labels = [], []
        ids += e.input_ids[:max_len]
        labels += [IGNORE, *e.labels[1:max_len]]
    if ids:
        packed.append(TokenizedExample(ids, labels))
    return packed


def fingerprint(rows: list[dict]) -> str:
    """sha256 hex of the rows' canonical JSON, in order (a cache key for derived data)."""
    h = hashlib.sha256()
    for row in rows:
        h.update(_canonical(row) + b"\n")
    return h.hexdigest()


def row_text(row: dict, tokenizer) -> str:
    """The text a tokenizer sees for a row: chat rows rendered through the chat template."""
    if "messages" in row:
        return render_chat(tokenizer, row["messages"], add_generation_prompt=False)
    return row["text"]
