"""A teacher served over an OpenAI-compatible API (vLLM, SGLang, llama.cpp's server, a hosted one).

The teacher's weights are not on this machine: it answers prompts (chat completions, as many in
flight as teacher.concurrency allows, each answer appended to a journal as it arrives so a killed
build asks only for the rest) and scores token sequences (completions with echo and top
log-probs: its top-k log-probs at every position of a text, which fill the logit cache). The
`openai` client does the HTTP: timeouts, and retries with exponential backoff that honour
Retry-After on 408/409/429/5xx and dropped connections. The API key is read from the environment
variable teacher.api_key_env names and never written anywhere.

Servers return top log-probs keyed by token strings (vLLM with return_tokens_as_token_ids by
"token_id:N"); `TokenMap` maps them back to the student's ids, and what cannot be mapped (a
string several ids decode to, a piece that is part of a UTF-8 character) is counted, never
silently given a guessed id: its probability stays in the rest mass.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from edgekd.config import TeacherSettings
from edgekd.errors import EdgekdError
from edgekd.models import public_url
from edgekd.tokens import special_ids

# Texts whose tokenization the server and the student must agree on for logit KD.
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # 1234567890",
    "Ünïcödé, emoji 🙂 and CJK 漢字 in one line.",
)
_TOKEN_ID = re.compile(r"^token_id:(\d+)$")


def api_key(settings: TeacherSettings) -> str:
    """The API key from teacher.api_key_env; servers on the loopback usually need none."""
    if settings.api_key_env is None:
        return "none"
    key = os.environ.get(settings.api_key_env)
    if not key:
        raise EdgekdError(
            f"teacher.api_key_env={settings.api_key_env}: that environment variable is not set; "
            f"export {settings.api_key_env}=<your key> before the build"
        )
    return key


@contextmanager
def answers(
    url: str, what: str, secret: str = "", settings: TeacherSettings | None = None
) -> Iterator[None]:
    """Turn the client's failures into one line naming the server and what was asked."""
    import openai

    where = public_url(url)
    try:
        yield
    except EdgekdError:
        raise
    except openai.APITimeoutError:
        s = settings or TeacherSettings()
        raise EdgekdError(
            f"teacher server {where} did not answer {what} within teacher.timeout_s="
            f"{s.timeout_s:g} s (tried {s.max_retries + 1} times); check the server's load or "
            "raise teacher.timeout_s"
        ) from None
    except openai.APIConnectionError as err:
        cause = " ".join(str(err.__cause__ or err).split())[:120]
        cause = cause.replace(secret, "***") if secret else cause
        raise EdgekdError(
            f"teacher server {where} cannot be reached for {what} ({cause}); start the server, "
            "check --teacher's host and port, then rerun: finished answers are kept"
        ) from None
    except openai.APIStatusError as err:
        body = " ".join(str(err.message).split()).replace(secret, "***") if secret else err.message
        raise EdgekdError(
            f"teacher server {where} answered {what} with HTTP {err.status_code} "
            f"({body[:160]}); check teacher.model and teacher.api_key_env, or the server's log"
        ) from None
    except (openai.APIResponseValidationError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise EdgekdError(
            f"teacher server {where} answered {what} with malformed JSON "
            f"({type(err).__name__}); is --teacher an OpenAI-compatible /v1 endpoint?"
        ) from None


@dataclass
class Served:
    """A client of the served teacher, configured from TeacherSettings."""

    url: str
    settings: TeacherSettings
    _key: str = field(default="", repr=False)
    _client: object = field(default=None, repr=False)

    @classmethod
    def open(cls, url: str, settings: TeacherSettings) -> Served:
        return cls(url, settings, api_key(settings))

    @property
    def where(self) -> str:
        return public_url(self.url)

    def client(self):
        """One client (and connection pool) for every request and thread."""
        if self._client is None:
            import openai

            self._client = openai.OpenAI(
                base_url=self.url,
                api_key=self._key,
                timeout=self.settings.timeout_s,
                max_retries=self.settings.max_retries,
            )
        return self._client

    def guard(self, what: str):
        secret = self._key if self.settings.api_key_env else ""
        return answers(self.url, what, secret, self.settings)

    def served_models(self) -> list[str]:
        with self.guard("the model list (GET /models)"):
            return [m.id for m in self.client().models.list().data]

    def check_model(self) -> None:
        """teacher.model is set and one of the models the server serves."""
        names = self.served_models()
        listed = ", ".join(names) or "(none)"
        if self.settings.model is None:
            raise EdgekdError(
                f"teacher.model is unset for the served teacher at {self.where}; it serves: "
                f"{listed}; set teacher.model=NAME"
            )
        if self.settings.model not in names:
            raise EdgekdError(
                f"teacher.model={self.settings.model} is not served at {self.where}; it serves: "
                f"{listed}; set teacher.model to one of them"
            )

    # -- answers --------------------------------------------------------------------------------

    def chat(self, conversation: list[dict], *, max_tokens: int, temperature: float, seed: int):
        with self.guard("a chat completion"):
            reply = self.client().chat.completions.create(
                model=self.settings.model,
                messages=conversation,
                max_tokens=max_tokens,
                temperature=temperature,
                seed=seed,
            )
            return reply.choices[0].message.content or ""

    def complete(self, prompt: str, *, max_tokens: int, temperature: float, seed: int, top_k: int):
        """One pass: the answer to an already rendered prompt (completions API) with, for each
        generated token, its string and the top_k alternatives of the distribution it was drawn
        from: {"answer", "tokens", "tops"}."""
        with self.guard("a completion with log-probs"):
            reply = self.client().completions.create(
                model=self.settings.model,
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=temperature,
                seed=seed,
                logprobs=top_k,
            )
            choice = reply.choices[0]
            lp = choice.logprobs
            return {
                "answer": choice.text or "",
                "tokens": list(lp.tokens or []) if lp else [],
                "tops": list(lp.top_logprobs or []) if lp else [],
            }

    def generate(
        self,
        conversations: list[list[dict]],
        *,
        max_tokens: int,
        temperature: float,
        seed: int,
        journal: Path,
        on_answer: Callable[[int, int], None] | None = None,
        rendered: list[tuple[list[int], str]] | None = None,
        top_k: int = 0,
    ) -> list[str]:
        """The teacher's answers, teacher.concurrency requests at a time. Each answer is appended
        to `journal` (JSON lines keyed by conversation) as it arrives and flushed to disk; answers
        already there are not asked again, so a killed run keeps them.

        With `rendered` (each conversation's prompt as the student's token ids and their text)
        the answers come in one pass with their top_k log-probs (`complete`), journaled beside
        them for `score` to use instead of a second pass."""
        done = read_journal(journal)
        keys = [conversation_key(c, max_tokens, temperature, seed) for c in conversations]
        todo = [i for i, k in enumerate(keys) if k not in done]
        lock = threading.Lock()
        journal.parent.mkdir(parents=True, exist_ok=True)

        def ask(i: int) -> None:
            # Sampled answers differ per prompt yet reproduce: the seed moves with the prompt.
            kw = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed + i}
            if rendered is None:
                row = {"answer": self.chat(conversations[i], **kw)}
            else:
                ids, prompt = rendered[i]
                row = {
                    **self.complete(prompt, top_k=top_k, **kw),
                    "prompt_ids": ids,
                    "top_k": top_k,
                }
            with lock:
                done[keys[i]] = row["answer"]
                append_journal(journal, {"key": keys[i], **row})
                if on_answer is not None:
                    on_answer(sum(k in done for k in keys), len(keys))

        with ThreadPoolExecutor(self.settings.concurrency) as pool:
            for future in [pool.submit(ask, i) for i in todo]:
                future.result()  # the first failure stops the build; the journal keeps the rest
        return [done[k] for k in keys]

    # -- scoring --------------------------------------------------------------------------------

    def echo_logprobs(self, text: str, top_k: int):
        """The completions API's log-probs of `text` itself (echo): token strings and, per token,
        the top_k alternatives of the distribution that predicted it (None where none)."""
        with self.guard("a prompt log-prob request (completions, echo=true)"):
            reply = self.client().completions.create(
                model=self.settings.model,
                prompt=text,
                # 0 means "until the context is full" to llama.cpp's server; one token is cheap.
                max_tokens=1,
                temperature=0,
                echo=True,
                logprobs=top_k,
            )
            lp = reply.choices[0].logprobs
            if lp is None or not lp.tokens:
                return None
            return list(lp.tokens), list(lp.top_logprobs or [])

    def tokenize(self, text: str) -> list[int] | None:
        """The server's token ids of `text` from llama.cpp's /extras/tokenize or vLLM's
        /tokenize, or None when it has neither."""
        import httpx

        root = self.url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {self._key}"}
        model = self.settings.model
        for path, body in (
            ("/extras/tokenize", {"input": text}),
            (
                "/tokenize",
                {"model": model, "prompt": text, "add_special_tokens": False},
            ),
        ):
            try:
                r = httpx.post(
                    root + path, json=body, headers=headers, timeout=self.settings.timeout_s
                )
            except httpx.HTTPError:
                return None
            if r.status_code == 200:
                try:
                    return [int(t) for t in r.json()["tokens"]]
                except (ValueError, KeyError, TypeError):
                    return None
        return None


def conversation_key(
    conversation: list[dict], max_tokens: int, temperature: float, seed: int
) -> str:

    blob = json.dumps([conversation, max_tokens, temperature, seed], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def append_journal(path: Path, row: dict) -> None:
    """One JSON line appended to a journal and on disk before the next is asked for."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_journal(path: Path, field: str | None = "answer") -> dict:
    """What a journal already holds: key -> row[field] (the whole row with None). A line cut
    short by a kill is skipped."""
    done: dict = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            done[row["key"]] = row if field is None else row[field]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return done


def score_key(seq: list[int], positions: list[int], top_k: int) -> str:
    """What one example's scores depend on, as the scoring journal's key."""
    return hashlib.sha256(json.dumps([seq, positions, top_k]).encode()).hexdigest()[:32]


def decode(tokenizer, ids: list[int]) -> str:
    """The text a server is sent for `ids` (it tokenizes the text itself)."""
    # transformers' clean-up would turn " ." into "." and change the text the server tokenizes.
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


class TokenMap:
    """Token strings, as servers return them, back to the student tokenizer's ids."""

    def __init__(self, tokenizer):
        by_text: dict[str, list[int]] = {}
        for i in range(len(tokenizer)):
            by_text.setdefault(decode(tokenizer, [i]), []).append(i)
        # A string decoded from several ids (pieces of one UTF-8 character, unrenderable bytes)
        # names none of them.
        self.ids = {text: ids[0] for text, ids in by_text.items() if len(ids) == 1 and text}
        self._text = {i: text for text, ids in by_text.items() for i in ids}
        self.unmapped = 0
        self.mapped = 0

    def text(self, token_id: int) -> str:
        return self._text.get(token_id, "")

    def find(self, token: str) -> int | None:
        """The id a token string names, or None; not counted."""
        m = _TOKEN_ID.match(token)
        return int(m.group(1)) if m else self.ids.get(token)

    def id_of(self, token: str) -> int | None:
        found = self.find(token)
        if found is None:
            self.unmapped += 1
        else:
            self.mapped += 1
        return found


@dataclass
class Scored:
    """Per example, per scored logit index: the (id, log-prob) alternatives the server gave, or
    None where it gave none (that position trains on its label)."""

    entries: list[list[list[tuple[int, float]] | None]]
    missing: int = 0  # scored positions without teacher log-probs
    unmapped: int = 0  # alternatives whose token string names no single id
    mapped: int = 0
    one_pass: int = 0  # examples whose log-probs came with the teacher's answers
    fallback: int = 0  # examples with an answer of the teacher's, scored in a second pass
    ends: int = 0  # positions after a generated answer (its turn's end): no log-probs returned


# Prompt tokens, from the end, that find an answer's prompt in a sequence (then compared whole).
_SUFFIX = 8


@dataclass
class OnePass:
    """The log-probs the teacher's answers came with, per example (None: not covered, scored in
    the second pass)."""

    rows: list
    examples: int = 0
    fallback: int = 0
    ends: int = 0


def from_generation(
    sequences: list[list[int]],
    positions: list[list[int]],
    answers: list[dict],
    tmap: TokenMap,
    top_k: int,
) -> OnePass:
    """Scores of the sequences whose every answer span is one the teacher wrote in one pass
    (`Served.complete`, journaled with its prompt ids): the prompt's ids end right where the span
    starts and the generated tokens are the sequence's own ids there. Where they differ (a BPE
    merge across the prompt/answer seam, an answer the corpus stripped of whitespace, a CoT
    prompt the student sees without its instruction) the example is left to the second pass.
    The distribution that predicts the turn's end token after an answer is not returned with a
    generation (the server stops at it): that position trains on its label. Answers written for
    a smaller top_k are not used."""
    index: dict[tuple, list] = {}
    for row in answers:
        tokens, tops = row.get("tokens") or [], row.get("tops") or []
        gen = [tmap.find(t) for t in tokens]
        if not tokens or len(tops) != len(tokens) or None in gen or not all(tops):
            continue
        if row.get("top_k", 0) < top_k:
            continue
        prompt = row["prompt_ids"]
        index.setdefault(tuple(prompt[-_SUFFIX:]), []).append((prompt, gen, row))
    out = OnePass([None] * len(sequences))
    if not index:
        return out
    for n, (seq, want) in enumerate(zip(sequences, positions, strict=True)):
        rows = _one_pass_rows(seq, want, index, tmap)
        if rows is None:
            out.fallback += 1
            continue
        out.rows[n] = rows
        out.examples += 1
        out.ends += sum(r is None for r in rows)
    return out


def _one_pass_rows(seq: list[int], want: list[int], index: dict, tmap: TokenMap):
    at = {t: n for n, t in enumerate(want)}
    rows: list = [None] * len(want)
    for t0 in (t for t in want if t - 1 not in at):
        span = 1
        while t0 + span in at:
            span += 1
        a = t0 + 1  # the span's first target: where the answer starts
        found = None
        for prompt, gen, row in index.get(tuple(seq[max(0, a - _SUFFIX) : a]), []):
            n = min(len(gen), len(seq) - a)
            if (
                a >= len(prompt)
                and seq[a - len(prompt) : a] == prompt
                and seq[a : a + n] == gen[:n]
            ):
                found = n, gen, row
                break
        # Only the turn's end token may follow the answer in the span.
        if found is None or span - found[0] > 1:
            return None
        n, gen, row = found
        for j in range(min(n, span)):
            rows[at[t0 + j]] = _entries(row["tops"][j], row["tokens"][j], gen[j], tmap)
    return rows


def score(
    served: Served,
    tokenizer,
    sequences: list[list[int]],
    positions: list[list[int]],
    *,
    top_k: int,
    on_done: Callable[[int, int], None] | None = None,
    journal: Path | None = None,
    answers: list[dict] | None = None,
    bosless_pairs: bool | None = None,
) -> Scored:
    """The served teacher's top-k log-probs at `positions` (logit indices t: the distribution
    over sequences[i][t + 1]) of each token sequence, asked teacher.concurrency at a time.

    The server tokenizes the decoded text itself; its echoed tokens are aligned to the sequence
    token by token (`_align`). Entry j of the echo is the distribution that predicted echoed
    token j: at logit index i - 1 when that token is sequence token i.

    With a `journal` (JSON lines keyed by example), each example's scores are on disk as soon as
    they arrive and those already there are not asked again: a killed run keeps them.

    With `answers` (the journal rows of answers written in one pass), the examples those answers
    cover take their scores from them and are not asked again (`from_generation`)."""
    tmap = TokenMap(tokenizer)
    special = special_ids(tokenizer)
    generated = from_generation(sequences, positions, answers or [], tmap, top_k)
    keys = [score_key(s, p, top_k) for s, p in zip(sequences, positions, strict=True)]
    kept = read_journal(journal, "rows") if journal is not None else {}
    out: list = [
        [None if r is None else [tuple(e) for e in r] for r in kept[k]] if k in kept else given
        for k, given in zip(keys, generated.rows, strict=True)
    ]
    todo = [i for i, rows in enumerate(out) if rows is None]
    # The last guard; preflight refused these before any work (`check_bos`).
    check_bos(
        Probe(True, True, "", 0, bosless_pairs),
        tokenizer,
        [sequences[i] for i in todo],
        served.where,
    )
    texts = {i: decode(tokenizer, sequences[i]) for i in todo}
    if journal is not None:
        journal.parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    finished = [len(sequences) - len(todo)]

    def one(i: int) -> None:
        got = served.echo_logprobs(texts[i], top_k)
        seq, want = sequences[i], positions[i]
        rows: list = [None] * len(want)
        if got is not None:
            tokens, tops = got
            at = {t: n for n, t in enumerate(want)}
            # Echo entry j is the distribution that predicted seq[k], or (a text without a
            # leading BOS, on a server the probe found pairing it one on) the one after seq[k].
            on = int(bosless_pairs is False and (not seq or seq[0] != tokenizer.bos_token_id))
            for j, k in _align(tokens, seq, tmap, special):
                t = k - 1 + on
                if t in at and j < len(tops) and tops[j]:
                    # The echoed token's own string names seq[k]: only when it is the target.
                    rows[at[t]] = _entries(tops[j], None if on else tokens[j], seq[k], tmap)
        with lock:
            out[i] = rows
            if journal is not None:
                append_journal(journal, {"key": keys[i], "rows": rows})
            finished[0] += 1
            if on_done is not None:
                on_done(finished[0], len(sequences))

    with ThreadPoolExecutor(served.settings.concurrency) as pool:
        futures = [pool.submit(one, i) for i in todo]
        try:
            for future in futures:
                future.result()
        except BaseException:
            # The first failure stops the run, asking for nothing more; the journal keeps the rest.
            pool.shutdown(cancel_futures=True)
            raise
    missing = sum(r is None for rows in out for r in rows)
    return Scored(
        out,
        missing=missing,
        unmapped=tmap.unmapped,
        mapped=tmap.mapped,
        one_pass=generated.examples,
        fallback=generated.fallback,
        ends=generated.ends,
    )


def _align(tokens: list[str], seq: list[int], tmap: TokenMap, special: set[int]):
    """(echo index j, sequence index i) pairs of the echoed tokens that are the sequence's own.

    Servers echo the text they tokenized themselves: llama.cpp's leaves out every BOS token
    (the leading one and any later one), and special tokens come back as "" or their text. An
    echoed token matches the next sequence token of the same text; special tokens it does not
    show are stepped over. At the first token neither explains, the rest of the sequence is left
    unscored (those positions train on their labels) rather than guessed."""
    i = 0
    for j, token in enumerate(tokens):
        while (
            i < len(seq) and token != tmap.text(seq[i]) and not (token == "" and seq[i] in special)
        ):
            if seq[i] not in special:
                return
            i += 1
        if i >= len(seq):
            return
        yield j, i
        i += 1


def _entries(top: dict, echoed: str | None, target: int, tmap: TokenMap) -> list[tuple[int, float]]:
    """(id, log-prob) pairs of one position; the echoed token (None: the entry is not the echoed
    token's) is the sequence's own next token, whatever string it came back as; the others are
    mapped from their strings."""
    pairs: dict[int, float] = {}
    for token, logprob in top.items():
        if logprob is None or not math.isfinite(logprob):
            continue
        found = target if token == echoed else tmap.id_of(token)
        if found is not None:
            pairs[found] = max(logprob, pairs.get(found, -math.inf))
    return sorted(pairs.items(), key=lambda p: -p[1])


@dataclass(frozen=True)
class Probe:
    """What the probe of the server found: whether it tokenizes like the student, whether it
    returns prompt log-probs (completions with echo), how many alternatives come with a token it
    generates, and whether its echo pairs the tokens of a text without a leading BOS token with
    the distributions that predicted them (None: not found out)."""

    same_tokenizer: bool
    prompt_logprobs: bool
    how: str  # how the tokenization was compared
    answer_logprobs: int = 0
    bosless_pairs: bool | None = None

    @property
    def pairing_unknown(self) -> bool:
        """Whether texts would be scored by a server whose echo of a text without a leading BOS
        the probe could not pair."""
        return self.bosless_pairs is None and self.same_tokenizer and self.prompt_logprobs

    def one_pass(self, settings: TeacherSettings, top_k: int) -> bool:
        """Whether the answers the teacher writes bring their own top-k log-probs."""
        return (
            settings.one_pass
            and self.same_tokenizer
            and self.prompt_logprobs
            and self.answer_logprobs >= top_k
        )

    def lines(
        self,
        where: str,
        answers: bool = False,
        *,
        top_k: int = 0,
        settings: TeacherSettings | None = None,
    ) -> list[str]:
        """What the server cannot give, one line each; with `answers` (the teacher writes the
        corpus), a line when its answers' log-probs need a second pass."""
        out = []
        settings = settings or TeacherSettings()
        if self.prompt_logprobs and self.same_tokenizer and answers:
            if not settings.one_pass:
                out.append(
                    f"teacher.one_pass=false: the teacher's answers from {where} are scored in a "
                    "second pass (completions with echo)"
                )
            elif self.answer_logprobs < top_k:
                fix = (
                    f"; set logit_cache.top_k={self.answer_logprobs} for one pass"
                    if self.answer_logprobs
                    else ""
                )
                out.append(
                    f"the teacher server at {where} returns {self.answer_logprobs} alternatives "
                    f"with a token it generates, fewer than logit_cache.top_k={top_k}: its "
                    "answers are scored in a second pass (completions with echo), not taken from "
                    f"the generation{fix}"
                )
        if not self.prompt_logprobs:
            out.append(
                f"the teacher server at {where} returns no prompt log-probs (completions with "
                "echo and logprobs): every position trains on its label (hard labels only) and the "
                "held-out reference is the teacher's own text; use a server that gives them "
                "(vLLM, llama.cpp's server) for logit KD"
            )
        return out


def probe(teacher: Served, tokenizer, top_k: int = 2) -> Probe:
    """A look at the server: its tokenization of PROBE_TEXTS against the student tokenizer's
    (its tokenize endpoint, else the tokens echoed with log-probs), whether it gives prompt
    log-probs at all, and (a second request: the same text less its last token, completed with
    log-probs) how many alternatives come with a generated token and where its echo puts the
    distribution that predicted the text's last token."""
    import openai

    try:
        echoed = teacher.echo_logprobs(PROBE_TEXTS[0], top_k)
    except EdgekdError as err:
        # A server without the completions API, or one refusing echo with log-probs, says so
        # with a 4xx; anything else (down, slow, 5xx) is a fault of the server, not a capability.
        if "HTTP 4" not in str(err):
            raise
        echoed = None
        if top_k > 1:
            _check_top_k_allowed(teacher, top_k, str(err))
    except openai.OpenAIError:
        echoed = None
    has_logprobs = bool(echoed and any(echoed[1]))
    server_ids = [teacher.tokenize(t) for t in PROBE_TEXTS]
    mine = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in PROBE_TEXTS]
    answer_k, pairs = 0, None
    if has_logprobs:
        answer_k, pairs = _probe_generation(teacher, tokenizer, mine[0], echoed, top_k)
    if all(ids is not None for ids in server_ids):
        same = all(_same_ids(s, m, tokenizer) for s, m in zip(server_ids, mine, strict=True))
        how = "the server's tokenize endpoint"
    elif echoed is not None:
        tmap = TokenMap(tokenizer)
        same = _same_ids([tmap.id_of(t) for t in echoed[0]], mine[0], tokenizer)
        how = "the echoed tokens"
    else:
        same, how = False, "nothing (no tokenize endpoint, no echo)"
    return Probe(same, has_logprobs, how, answer_k, pairs)


def _check_top_k_allowed(teacher: Served, top_k: int, refusal: str) -> None:
    """A server that refuses top_k log-probs but gives one caps them (vLLM's --max-logprobs):
    neither pass could ask for the cache's top_k."""
    try:
        if teacher.echo_logprobs(PROBE_TEXTS[0], 1) is None:
            return
    except EdgekdError:
        return
    raise EdgekdError(
        f"logit_cache.top_k={top_k}: the teacher server at {teacher.where} refuses that many "
        f"log-probs (HTTP {refusal.split('HTTP ', 1)[-1].split('; check')[0][:100]}) but gives "
        "1; lower logit_cache.top_k to what it allows (vLLM: --max-logprobs)"
    )


def _probe_generation(teacher: Served, tokenizer, ids: list[int], echoed, top_k: int):
    """(alternatives with a generated token, whether the echo of a text without a leading BOS
    pairs its last token with the distribution that predicted it), from completing the text
    less its last token: a generation's log-probs are those of the context it was given."""
    got = teacher.complete(
        decode(tokenizer, ids[:-1]), max_tokens=1, temperature=0, seed=0, top_k=top_k
    )
    top = got["tops"][0] if got["tops"] else None
    if not top:
        return 0, None
    token, logprob = max(top.items(), key=lambda kv: kv[1])
    tmap = TokenMap(tokenizer)
    at = {k: j for j, k in _align(echoed[0], ids, tmap, special_ids(tokenizer))}

    def holds(k: int) -> bool:
        entry = echoed[1][at[k]] if k in at and at[k] < len(echoed[1]) else None
        return bool(entry) and abs(entry.get(token, math.inf) - logprob) < 1e-3

    pairs = True if holds(len(ids) - 1) else False if holds(len(ids) - 2) else None
    return len(top), pairs


def check_bos(probe: Probe, tokenizer, sequences: list[list[int]], where: str) -> None:
    """Refuse, before any work, scoring sequences without a leading BOS token (a tokenizer with
    none, or text rows it adds none to) on a server whose echo of such a text the probe could
    not pair with the distributions that predicted it. Servers pair it right (vLLM) or, as
    llama-cpp-python's does, one position on; the probe tells which and `score` reads either."""
    if not probe.pairing_unknown:
        return
    bos = tokenizer.bos_token_id
    bad = [i for i, seq in enumerate(sequences) if seq and (bos is None or seq[0] != bos)]
    if not bad:
        return
    if bos is None:
        what = "the student's tokenizer has no BOS token, so no sequence starts with one"
        fix = "use a server whose completions echo gives log-probs (llama.cpp's, vLLM)"
    else:
        what = (
            f"{len(bad)} of the {len(sequences)} sequences checked (the first: {bad[0]}) do not "
            f"start with the tokenizer's BOS token {tokenizer.convert_ids_to_tokens(bos)!r}"
        )
        fix = (
            "use chat rows (the template writes the BOS), a tokenizer that adds it "
            "(add_bos_token), or data.regenerate"
        )
    raise EdgekdError(
        f"{what}, and the probe could not find which distribution the teacher server at {where} "
        f"echoes for each token of such a text: its log-probs could be scored one position off; "
        f"{fix}"
    )


def _same_ids(server: list, mine: list[int], tokenizer) -> bool:
    # A server may add a leading BOS token that the student's tokenizer does not.
    if server and tokenizer.bos_token_id is not None and server[0] == tokenizer.bos_token_id:
        server = server[1:]
    return list(server) == list(mine)
