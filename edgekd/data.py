"""Corpora -> tokenized examples: loading, the shipped prompts, teacher answers, held-out split,
chat-template masking, collation and packing.

A row is {"text": str} or {"messages": [{"role", "content"}, ...]}; other keys ("category",
"answer") ride along untouched.
"""

import hashlib
import importlib.resources
import json
import re
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from jinja2.exceptions import SecurityError, TemplateError
from rich.progress import Progress, track

from edgekd.atomic import atomic_path
from edgekd.errors import EdgekdError

IGNORE = -100
TEXT_SUFFIXES = (".txt", ".md")
CORPUS_SUFFIXES = (".jsonl", *TEXT_SUFFIXES)
ROLES = ("system", "user", "assistant")
HF_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
ROW_SHAPE = (
    '{"text": str} or {"messages": [{"role": "system|user|assistant", "content": str}, ...]}'
)


def _parsed_lines(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed JSON) for each non-blank line; malformed JSON names file and line."""
    parsed = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
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
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
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
    try:
        import datasets
    except ImportError as e:
        raise EdgekdError(
            f"{name!r} is not a local path, and loading it as a Hugging Face dataset needs "
            "`pip install datasets`; or pass a .jsonl/.txt/.md file or folder"
        ) from e
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
    dataset name ("name" or "owner/name", split "train"; needs the optional `datasets` package).
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


def _answered(prompt_row: dict, answer: str) -> dict:
    """A chat row from a prompt row and the teacher's answer, keeping the other keys."""
    row = {
        "messages": [
            {"role": "user", "content": prompt_row["prompt"]},
            {"role": "assistant", "content": answer.strip()},
        ]
    }
    row.update({k: v for k, v in prompt_row.items() if k != "prompt"})
    return row


def _llama_chat_prompts(vocab_llm, gguf_path: Path, prompts: list[dict]) -> list[list[int]]:
    """Prompt token ids as create_chat_completion builds them: the GGUF's chat template rendered
    by llama-cpp-python's Jinja2ChatFormatter, then tokenized with special tokens parsed."""
    from llama_cpp import llama_chat_format, llama_model_get_vocab, llama_vocab_get_text

    template = vocab_llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise EdgekdError(
            f"{gguf_path}: the GGUF has no tokenizer.chat_template, so prompts cannot be "
            "formatted; use a GGUF with a chat template or set data.source to a corpus"
        )
    vocab = llama_model_get_vocab(vocab_llm.model)

    def text(token: int) -> str:
        return llama_vocab_get_text(vocab, token).decode() if token >= 0 else ""

    formatter = llama_chat_format.Jinja2ChatFormatter(
        template=template,
        eos_token=text(vocab_llm.token_eos()),
        bos_token=text(vocab_llm.token_bos()),
    )
    ids = []
    for p in prompts:
        rendered = formatter(messages=[{"role": "user", "content": p["prompt"]}])
        ids.append(
            vocab_llm.tokenize(
                rendered.prompt.encode(), add_bos=not rendered.added_special, special=True
            )
        )
    return ids


@dataclass
class _Sequence:
    """One prompt being answered in a llama.cpp sequence slot."""

    index: int
    feed: list[int]  # tokens for the next decode: the prompt, then each sampled token
    rng: np.random.Generator
    pos: int = 0
    tokens: list[int] = field(default_factory=list)


def generate_with_llama_cpp(
    gguf_path: Path,
    prompts: list[dict],
    *,
    max_tokens: int,
    seed: int,
    n_threads: int,
    temperature: float,
    parallel: int,
) -> list[dict]:
    """Teacher answers from a GGUF through llama.cpp, using the GGUF's own chat template.

    Up to `parallel` prompts are decoded together in one context (continuous batching: a finished
    answer frees its slot for the next prompt). Each answer stops at an end-of-generation token or
    after max_tokens. temperature 0 is greedy (argmax); above 0, tokens are drawn from
    softmax(logits / temperature), with no top-k/top-p, by a numpy generator seeded with
    (seed, prompt index), so an answer does not depend on which prompts share its batch.
    """
    import llama_cpp  # loads a native library: only when a GGUF teacher is used

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise EdgekdError(f"{gguf_path}: GGUF teacher not found")
    if not prompts:
        return []
    from edgekd.formats.gguf import quiet_llama_cpp

    quiet_llama_cpp()
    vocab_llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    prompt_ids = _llama_chat_prompts(vocab_llm, gguf_path, prompts)
    parallel = min(parallel, len(prompts), llama_cpp.llama_max_parallel_sequences())
    longest = max(len(ids) for ids in prompt_ids)
    # Each slot gets its own KV stream (not one unified buffer): a token attends only to its own
    # sequence's cells, laid out as when decoding it alone, which keeps greedy answers closest
    # to one-at-a-time decoding and attention cost independent of the other slots. llama.cpp
    # rounds a stream up to a multiple of 256 cells anyway; asking for that avoids its warning.
    # Flash attention stays off, as in Llama(), whose numerics the old sequential path had.
    n_ctx_seq = -(-(longest + max_tokens) // 256) * 256
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = parallel * n_ctx_seq
    cparams.n_seq_max = parallel
    cparams.kv_unified = False
    cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cparams.n_threads = cparams.n_threads_batch = n_threads
    with ExitStack() as stack:
        model = llama_cpp.llama_model_load_from_file(
            str(gguf_path).encode(), llama_cpp.llama_model_default_params()
        )
        if not model:
            raise EdgekdError(f"{gguf_path}: llama.cpp could not load the GGUF")
        stack.callback(llama_cpp.llama_model_free, model)
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise EdgekdError(
                f"{gguf_path}: llama.cpp could not create a {cparams.n_ctx}-token context; "
                "lower data.generation.parallel or data.generation.max_tokens"
            )
        stack.callback(llama_cpp.llama_free, ctx)
        batch = llama_cpp.llama_batch_init(cparams.n_batch, 0, 1)
        stack.callback(llama_cpp.llama_batch_free, batch)
        answers = _decode_continuously(
            ctx,
            batch,
            prompt_ids,
            parallel,
            max_tokens=max_tokens,
            seed=seed,
            temperature=temperature,
        )
    return [
        _answered(p, vocab_llm.detokenize(answers[i]).decode("utf-8", errors="ignore"))
        for i, p in enumerate(prompts)
    ]


def _decode_continuously(
    ctx, batch, prompt_ids: list[list[int]], parallel: int, *, max_tokens, seed, temperature
) -> list[list[int]]:
    """Generated token ids per prompt, keeping up to `parallel` sequences in every decode."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llama_cpp.llama_get_model(ctx))
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    memory = llama_cpp.llama_get_memory(ctx)
    pending = deque(range(len(prompt_ids)))
    free_slots = list(range(parallel))
    active: dict[int, _Sequence] = {}
    answers: list[list[int]] = [[] for _ in prompt_ids]

    def add(token: int, pos: int, slot: int, wants_logits: bool) -> None:
        n = batch.n_tokens
        batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, 1
        batch.seq_id[n][0], batch.logits[n] = slot, wants_logits
        batch.n_tokens = n + 1

    with Progress() as progress:
        task = progress.add_task("Teacher answers (llama.cpp)", total=len(prompt_ids))
        while pending or active:
            while pending and free_slots:
                index = pending.popleft()
                rng = np.random.default_rng([seed % 2**64, index])
                active[free_slots.pop()] = _Sequence(index, prompt_ids[index], rng)
            batch.n_tokens = 0
            outputs = []  # (slot, row of its logits in the batch)
            # Slots in ascending order: with one KV stream per slot, llama.cpp splits a batch
            # whose sequences are out of order into more micro-batches (measured 2x slower).
            for slot in sorted(active):
                seq = active[slot]
                for k, token in enumerate(seq.feed):
                    add(token, seq.pos + k, slot, k == len(seq.feed) - 1)
                seq.pos += len(seq.feed)
                outputs.append((slot, batch.n_tokens - 1))
            if (code := llama_cpp.llama_decode(ctx, batch)) != 0:
                raise EdgekdError(
                    f"llama.cpp decode failed with code {code}; lower data.generation.parallel"
                )
            for slot, row in outputs:
                seq = active[slot]
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, row), (n_vocab,))
                token = _next_token(logits, temperature, seq.rng)
                eog = llama_cpp.llama_vocab_is_eog(vocab, token)
                if not eog:
                    seq.tokens.append(token)
                    seq.feed = [token]
                if eog or len(seq.tokens) >= max_tokens:
                    answers[seq.index] = seq.tokens
                    del active[slot]
                    llama_cpp.llama_memory_seq_rm(memory, slot, -1, -1)
                    free_slots.append(slot)
                    progress.advance(task)
    return answers


def _next_token(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    return int(rng.choice(len(probs), p=probs / probs.sum()))


def _tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def render_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool, tokenize=False):
    """The tokenizer's chat template applied to `messages` (text, or ids with tokenize=True).

    transformers renders templates in jinja2's ImmutableSandboxedEnvironment, so a template that
    reaches for Python internals stops with a SecurityError: that, and any other template
    failure, is an EdgekdError naming the tokenizer.
    """
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=tokenize, add_generation_prompt=add_generation_prompt
        )
    except SecurityError as err:
        raise EdgekdError(
            f"the chat template of tokenizer {_tokenizer_name(tokenizer)!r} tried an unsafe "
            f"operation ({err}) and was stopped by the sandbox; use a tokenizer you trust"
        ) from err
    except TemplateError as err:
        raise EdgekdError(
            f"the chat template of tokenizer {_tokenizer_name(tokenizer)!r} failed to render a "
            f"conversation ({type(err).__name__}: {err}); fix the template or use {{'text'}} rows"
        ) from err


def _require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = _tokenizer_name(tokenizer)
        raise EdgekdError(
            f"tokenizer {name!r} has no chat template, so chat rows cannot be formatted; "
            "use a tokenizer with a chat_template or a corpus of {'text': ...} rows"
        )


def decoding_options(*, temperature: float, num_beams: int) -> dict:
    """transformers generate() options: sampling at temperature > 0, else greedy (num_beams 1)
    or beam search. Knobs left out are set to None, which overrides any that a model's
    generation_config sets (top-k/top-p would change what sampling draws from)."""
    if temperature > 0 and num_beams > 1:
        raise ValueError("sampling and beam search do not mix; pass temperature 0 with beams")
    off = {"temperature": None, "top_p": None, "top_k": None}
    if temperature > 0:
        return {**off, "do_sample": True, "temperature": temperature}
    return {**off, "do_sample": False, "num_beams": num_beams}


def generate_token_ids(
    model,
    prompts: list[list[int]],
    *,
    max_tokens: int,
    pad_id: int,
    decoding: dict,
    batch_size: int,
    progress: str | None = None,
) -> list[list[int]]:
    """The new token ids per prompt, from left-padded batched generate(); an answer that ended
    early is followed by pad_id up to its batch's longest. `progress`: a bar with that title."""
    # Batches of similar length waste less compute on padding.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    starts = range(0, len(order), batch_size)
    for start in starts if progress is None else track(starts, description=progress):
        batch = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # left padding: every prompt ends where generation starts
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        with torch.inference_mode():
            gen = model.generate(
                input_ids=ids.to(model.device),
                attention_mask=mask.to(model.device),
                max_new_tokens=max_tokens,
                pad_token_id=pad_id,
                **decoding,
            )
        for i, new in zip(batch, gen[:, width:].tolist(), strict=True):
            out[i] = new
    return out


def generate_with_transformers(
    model,
    tokenizer,
    prompts: list[dict],
    *,
    max_tokens: int,
    seed: int,
    temperature: float,
    batch_size: int,
    num_beams: int,
) -> list[dict]:
    """Teacher answers from a transformers model: chat template, left-padded batched generate;
    greedy (temperature 0, num_beams 1), sampling (temperature > 0) or beam search."""
    _require_chat_template(tokenizer)
    texts = [
        render_chat(
            tokenizer, [{"role": "user", "content": p["prompt"]}], add_generation_prompt=True
        )
        for p in prompts
    ]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    torch.manual_seed(seed)
    answers = generate_token_ids(
        model,
        encoded,
        max_tokens=max_tokens,
        pad_id=pad_id,
        decoding=decoding_options(temperature=temperature, num_beams=num_beams),
        batch_size=batch_size,
        progress="Teacher answers (transformers)",
    )
    return [
        _answered(p, tokenizer.decode(a, skip_special_tokens=True))
        for p, a in zip(prompts, answers, strict=True)
    ]


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
    mask = heldout_mask(rows, fraction)
    chosen = sorted((i for i, m in enumerate(mask) if m), key=lambda i: _hash_score(rows[i]))
    keep = set(chosen[:max_heldout])
    train = [r for r, m in zip(rows, mask, strict=True) if not m]
    heldout = [r for i, r in enumerate(rows) if i in keep]
    return train, heldout


@dataclass
class TokenizedExample:
    """Token ids and per-position targets (IGNORE where not scored); labels are not shifted."""

    input_ids: list[int]
    labels: list[int]


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading items a and b share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _chat_example(tokenizer, messages: list[dict]) -> TokenizedExample:
    """Only assistant tokens (content and the turn's end token) are targets.

    For each assistant turn, the conversation before it is rendered with the generation prompt;
    the tokens between that prefix and the end of the turn are the reply. Template text after the
    turn's last special token (ChatML's trailing newline) is not a target.
    """
    ids = _render(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE] * len(ids)
    # Turn markers such as ChatML's <|im_end|> are added special tokens, not always listed
    # among all_special_ids.
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special
    }
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:k], add_generation_prompt=True) if k else []
        upto = _render(tokenizer, messages[: k + 1], add_generation_prompt=False)
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
        _require_chat_template(tokenizer)
    out = []
    for row in rows:
        if "messages" in row:
            ex = _chat_example(tokenizer, row["messages"])
        else:
            ex = _text_example(tokenizer, row["text"])
        ex = TokenizedExample(ex.input_ids[:max_len], ex.labels[:max_len])
        if any(t != IGNORE for t in ex.labels):
            out.append(ex)
    return out


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
