"""The runtime interface: what edgekd asks of every backend that runs a model.

A runtime is opened on a path (a GGUF file, an ONNX folder, a Hugging Face folder) with a thread
count and a context length; opening loads nothing. `load` loads the model for the timed
`first`/`next` token steps; the other methods load what they need themselves, exactly as the
runtime's own tools would, so each measure keeps its own numerics. The backends live beside this
module (hf_torch, llama_cpp, ort, ort_genai) and are listed in `registry`.

The benchmark's child process imports runtimes before its speed runs and measures its own peak
memory: backends import their libraries (and torch) inside the methods that use them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    import torch

    from edgekd.evaluate import HeldOut

# Room past the longest scored sequence when a runtime sizes its context to score them.
_SCORING_HEADROOM = 8


def scoring_context(sequences: list[list[int]]) -> int:
    """The context length that holds every sequence to score, with a little room."""
    return max(len(s) for s in sequences) + _SCORING_HEADROOM


def next_token(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """The argmax at temperature 0; above, a draw from softmax(logits / temperature) (no top-k or
    top-p), by `rng`."""
    if temperature == 0:
        return int(logits.argmax())
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    return int(rng.choice(len(probs), p=probs / probs.sum()))


def prompt_rng(seed: int, index: int) -> np.random.Generator:
    """The generator that samples the answer to prompt `index`: seeded with (seed, index), so an
    answer does not depend on which prompts share its batch."""
    return np.random.default_rng([seed % 2**64, index])


@dataclass(frozen=True)
class TokenCost:
    """What decoding one token reads: every weight but a looked-up embedding table, and the KV
    cache of the positions before it."""

    weights_bytes: int  # the model files
    weights_read_bytes: int
    kv_bytes_per_position: int

    def read_per_token(self, position: int) -> int:
        return self.weights_read_bytes + self.kv_bytes_per_position * position


@dataclass(frozen=True)
class Continuation:
    """How a model scores the tokens that end a sequence, given those before them."""

    logprob: float  # the sum of their log-probabilities
    greedy: bool  # whether each was the model's argmax


def score_continuation(logits: torch.Tensor, tokens: list[int]) -> Continuation:
    """`tokens` scored by the logits of the positions before each ([len(tokens), vocab]): the
    log-softmax in float32, gathered and summed, as lm-evaluation-harness's own backend does."""
    import torch

    logprobs = logits.float().log_softmax(-1)
    target = torch.tensor(tokens, dtype=torch.long)
    picked = logprobs.gather(-1, target[:, None])[:, 0]
    return Continuation(float(picked.sum()), bool((logprobs.argmax(-1) == target).all()))


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """The text before the first of `stop` in it (empty stops ignored), and whether one was."""
    ends = [i for s in stop if s and (i := text.find(s)) >= 0]
    return (text[: min(ends)], True) if ends else (text, False)


@dataclass(frozen=True)
class Specials:
    """The begin and end tokens of a model's vocabulary (None where it has none) and their text."""

    bos_id: int | None
    bos_text: str
    eos_id: int | None
    eos_text: str


class Runtime(ABC):
    """One backend running one model. Subclasses set `name` and implement every method."""

    name: ClassVar[str]
    # Whether load() allocates the KV cache of the whole context up front (llama.cpp does).
    preallocates_context: ClassVar[bool] = False

    def __init__(self, path: Path | str, *, threads: int, n_ctx: int = 0, tokenizer=None):
        """`n_ctx` 0: the model's own context; `tokenizer`: the Hugging Face tokenizer for chat
        templates where the runtime needs one (default: the one saved beside the model)."""
        self.path, self.threads, self.n_ctx = Path(path), threads, n_ctx
        self._tokenizer = tokenizer

    # --- the files ---

    @classmethod
    @abstractmethod
    def holds(cls, path: Path) -> bool:
        """Whether `path` is a model this runtime runs."""

    @classmethod
    @abstractmethod
    def weight_files(cls, path: Path) -> list[Path]:
        """The files the runtime loads as the model (tokenizer and config files left out)."""

    @classmethod
    def check_files(cls, path: Path) -> None:
        """EdgekdError naming the file unless the model's files are whole and safe to load
        (what loading would otherwise fail on deep inside the runtime, or hang on)."""
        return  # a runtime whose loader already fails with a clear line needs nothing more

    @classmethod
    @abstractmethod
    def token_cost(cls, path: Path) -> TokenCost:
        """Bytes of the model files, bytes read per decoded token, KV cache bytes per position."""

    # --- the model ---

    @property
    def tokenizer(self):
        """The Hugging Face tokenizer saved with the model (or the one given)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self._tokenizer

    @abstractmethod
    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, as the runtime's tokenizer gives them (BOS where the model adds it,
        special tokens written in the text parsed as such)."""

    @abstractmethod
    def logits(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Raw logits over the whole vocabulary ([len, vocab], float32) per token sequence."""

    def logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Log-probabilities over the whole vocabulary ([len, vocab], float32) per sequence."""
        return [x.log_softmax(-1) for x in self.logits(sequences)]

    def heldout_logprobs(self, heldout: HeldOut) -> list[torch.Tensor]:
        """Log-probs at the held-out slice's scored positions (what `evaluate.quality` takes)."""
        from edgekd.evaluate import at_positions

        return at_positions(self.logprobs(heldout.sequences), heldout)

    def continuations(self, requests: list[tuple[list[int], int]]) -> list[Continuation]:
        """Each request is (token ids, start): the ids from `start` (at least 1) scored given all
        before them, from one pass over the ids but the last. Backends that keep a model loaded
        between sequences, or batch them, override this."""
        return [
            score_continuation(self.logits([ids[:-1]])[0][start - 1 :], ids[start:])
            for ids, start in requests
        ]

    def specials(self) -> Specials:
        """The vocabulary's begin and end tokens, from the Hugging Face tokenizer."""
        tok = self.tokenizer

        def text(token: int | None) -> str:
            return "" if token is None else tok.decode([token])

        bos, eos = tok.bos_token_id, tok.eos_token_id
        return Specials(bos, text(bos), eos, text(eos))

    def chat_text(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """The conversation rendered by the model's chat template, as text (what a harness
        prompt with the chat template on is tokenized from)."""
        from edgekd.data import render_chat, require_chat_template

        require_chat_template(self.tokenizer)
        return render_chat(self.tokenizer, messages, add_generation_prompt=add_generation_prompt)

    @abstractmethod
    def complete(self, prompts: list[list[int]], *, max_tokens: int, stop: list[str]) -> list[str]:
        """The greedy text after each raw prompt (token ids, no chat template), cut before the
        first of `stop` it holds, after at most `max_tokens` tokens or an end token."""

    @abstractmethod
    def chat(self, conversations: list[list[dict]], *, max_tokens: int) -> list[str]:
        """The greedy reply to each conversation, through the runtime's own chat path (the one a
        user of the exported model runs)."""

    @abstractmethod
    def generate(
        self,
        conversations: list[list[dict]],
        *,
        max_tokens: int,
        temperature: float,
        seed: int,
        parallel: int,
        beams: int = 1,
    ) -> list[str]:
        """Answers to many conversations (a teacher's corpus): greedy at temperature 0, sampled
        above it, beam search with beams > 1 where the runtime has it; up to `parallel`
        conversations decoded together where the runtime batches."""

    # --- a device that runs the runtime without edgekd (edgekd.device_runner) ---

    def device_chat(self, conversations: list[list[dict]]) -> dict:
        """What the device runner needs, besides the model files, to answer `conversations` as
        `chat` does: nothing where the runtime renders chat prompts itself (llama.cpp)."""
        return {"conversations": conversations}

    def device_replies(self, result: dict) -> list[str]:
        """The replies in what the device runner sent back."""
        return result["replies"]

    # --- timing ---

    @abstractmethod
    def load(self) -> None:
        """Load the model for `first`/`next` (the load the benchmark times)."""

    @abstractmethod
    def first(self, ids: list[int]) -> int:
        """Run a prompt from an empty cache and return the greedy next token."""

    @abstractmethod
    def next(self, token: int) -> int:
        """Run one more token with the cache and return the greedy next token."""
