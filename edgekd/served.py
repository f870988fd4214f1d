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

    def generate(
        self,
        conversations: list[list[dict]],
        *,
        max_tokens: int,
        temperature: float,
        seed: int,
        journal: Path,
        on_answer: Callable[[int, int], None] | None = None,
    ) -> list[str]:
        """The teacher's answers, teacher.concurrency requests at a time. Each answer is appended
        to `journal` (JSON lines keyed by conversation) as it arrives and flushed to disk; answers
        already there are not asked again, so a killed run keeps them."""
        done = read_journal(journal)
        keys = [conversation_key(c, max_tokens, temperature, seed) for c in conversations]
        todo = [i for i, k in enumerate(keys) if k not in done]
        lock = threading.Lock()
        journal.parent.mkdir(parents=True, exist_ok=True)

        def ask(i: int) -> None:
            # Sampled answers differ per prompt yet reproduce: the seed moves with the prompt.
            text = self.chat(
                conversations[i], max_tokens=max_tokens, temperature=temperature, seed=seed + i
            )
            with lock:
                done[keys[i]] = text
                append_journal(journal, {"key": keys[i], "answer": text})
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


def read_journal(path: Path, field: str = "answer") -> dict:
    """What a journal already holds: key -> row[field]. A line cut short by a kill is skipped."""
    done: dict = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            done[row["key"]] = row[field]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return done


def score_key(seq: list[int], positions: list[int], top_k: int) -> str:
    """What one example's scores depend on, as the scoring journal's key."""
    return hashlib.sha256(json.dumps([seq, positions, top_k]).encode()).hexdigest()[:32]


def _text(tokenizer, ids: list[int]) -> str:
    # transformers' clean-up would turn " ." into "." and change the text the server tokenizes.
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


class TokenMap:
    """Token strings, as servers return them, back to the student tokenizer's ids."""

    def __init__(self, tokenizer):
        by_text: dict[str, list[int]] = {}
        for i in range(len(tokenizer)):
            by_text.setdefault(_text(tokenizer, [i]), []).append(i)
        # A string decoded from several ids (pieces of one UTF-8 character, unrenderable bytes)
        # names none of them.
        self.ids = {text: ids[0] for text, ids in by_text.items() if len(ids) == 1 and text}
        self._text = {i: text for text, ids in by_text.items() for i in ids}
        self.unmapped = 0
        self.mapped = 0

    def text(self, token_id: int) -> str:
        return self._text.get(token_id, "")

    def id_of(self, token: str) -> int | None:
        m = _TOKEN_ID.match(token)
        found = int(m.group(1)) if m else self.ids.get(token)
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


def score(
    served: Served,
    tokenizer,
    sequences: list[list[int]],
    positions: list[list[int]],
    *,
    top_k: int,
    on_done: Callable[[int, int], None] | None = None,
    journal: Path | None = None,
) -> Scored:
    """The served teacher's top-k log-probs at `positions` (logit indices t: the distribution
    over sequences[i][t + 1]) of each token sequence, asked teacher.concurrency at a time.

    The server tokenizes the decoded text itself; its echoed tokens are aligned to the sequence
    token by token (`_align`). Entry j of the echo is the distribution that predicted echoed
    token j: at logit index i - 1 when that token is sequence token i.

    With a `journal` (JSON lines keyed by example), each example's scores are on disk as soon as
    they arrive and those already there are not asked again: a killed run keeps them."""
    check_starts_with_bos(tokenizer, sequences)
    tmap = TokenMap(tokenizer)
    special = set(tokenizer.all_special_ids)
    texts = [_text(tokenizer, s) for s in sequences]
    keys = [score_key(s, p, top_k) for s, p in zip(sequences, positions, strict=True)]
    kept = read_journal(journal, "rows") if journal is not None else {}
    out: list = [
        [None if r is None else [tuple(e) for e in r] for r in kept[k]] if k in kept else None
        for k in keys
    ]
    todo = [i for i, rows in enumerate(out) if rows is None]
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
            for j, k in _align(tokens, seq, tmap, special):
                t = k - 1  # echo entry j is the distribution that predicted seq[k]
                if t in at and j < len(tops) and tops[j]:
                    rows[at[t]] = _entries(tops[j], tokens[j], seq[k], tmap)
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
    return Scored(out, missing=missing, unmapped=tmap.unmapped, mapped=tmap.mapped)


def check_starts_with_bos(tokenizer, sequences: list[list[int]]) -> None:
    """Refuse sequences that do not start with the tokenizer's BOS token: a server reads a text
    after the BOS it adds (llama.cpp's server always does, and hides it from the echo), or, adding
    none, pairs each echoed token with the distribution one position on. Either way the
    log-probs would belong to another context than the student's, so none are guessed."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return
    bad = [i for i, seq in enumerate(sequences) if seq and seq[0] != bos]
    if bad:
        token = tokenizer.convert_ids_to_tokens(bos)
        raise EdgekdError(
            f"{len(bad)} of {len(sequences)} sequences (the first: example {bad[0]}) do not start "
            f"with the tokenizer's BOS token {token!r}, which the served teacher reads every text "
            "after: its log-probs would be scored one position off; use chat rows (the template "
            "writes the BOS), a tokenizer that adds it (add_bos_token), or data.regenerate"
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


def _entries(top: dict, echoed: str, target: int, tmap: TokenMap) -> list[tuple[int, float]]:
    """(id, log-prob) pairs of one position; the echoed token is the sequence's own next token
    (whatever string it came back as), the others are mapped from their strings."""
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
    """What one probe of the server found: whether it tokenizes like the student, and whether it
    returns prompt log-probs (completions with echo)."""

    same_tokenizer: bool
    prompt_logprobs: bool
    how: str  # how the tokenization was compared

    def lines(self, where: str, answers: bool = False) -> list[str]:
        """What the server cannot give, one line each; with `answers` (the teacher writes the
        corpus), how its answers' log-probs are found."""
        out = []
        if self.prompt_logprobs and self.same_tokenizer and answers:
            out.append(
                f"the teacher's answers from {where} are scored in a second pass (completions "
                "with echo), not taken from the generation's own log-probs"
            )
        if not self.prompt_logprobs:
            out.append(
                f"the teacher server at {where} returns no prompt log-probs (completions with "
                "echo and logprobs): every position trains on its label (hard labels only) and the "
                "held-out reference is the teacher's own text; use a server that gives them "
                "(vLLM, llama.cpp's server) for logit KD"
            )
        return out


def probe(teacher: Served, tokenizer) -> Probe:
    """One look at the server: its tokenization of PROBE_TEXTS against the student tokenizer's
    (its tokenize endpoint, else the tokens echoed with log-probs), and whether it gives prompt
    log-probs at all."""
    import openai

    try:
        echoed = teacher.echo_logprobs(PROBE_TEXTS[0], 2)
    except EdgekdError as err:
        # A server without the completions API, or one refusing echo with log-probs, says so
        # with a 4xx; anything else (down, slow, 5xx) is a fault of the server, not a capability.
        if "HTTP 4" not in str(err):
            raise
        echoed = None
    except openai.OpenAIError:
        echoed = None
    has_logprobs = bool(echoed and any(echoed[1]))
    server_ids = [teacher.tokenize(t) for t in PROBE_TEXTS]
    mine = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in PROBE_TEXTS]
    if all(ids is not None for ids in server_ids):
        same = all(_same_ids(s, m, tokenizer) for s, m in zip(server_ids, mine, strict=True))
        return Probe(same, has_logprobs, "the server's tokenize endpoint")
    if echoed is not None:
        tmap = TokenMap(tokenizer)
        got = [tmap.id_of(t) for t in echoed[0]]
        return Probe(_same_ids(got, mine[0], tokenizer), has_logprobs, "the echoed tokens")
    return Probe(False, has_logprobs, "nothing (no tokenize endpoint, no echo)")


def _same_ids(server: list, mine: list[int], tokenizer) -> bool:
    # A server may add a leading BOS token that the student's tokenizer does not.
    if server and tokenizer.bos_token_id is not None and server[0] == tokenizer.bos_token_id:
        server = server[1:]
    return list(server) == list(mine)
