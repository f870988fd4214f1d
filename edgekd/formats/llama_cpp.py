"""The llama.cpp runtime (llama-cpp-python) for GGUF files: tokenizer, scoring, chat, a teacher's
batched generation through llama.cpp's C API, and the timed token steps.

llama_cpp is imported inside the methods: it loads a native library, and the benchmark's child
process measures its own peak memory.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgekd.errors import EdgekdError
from edgekd.formats.runtime import (
    Continuation,
    Runtime,
    Specials,
    TokenCost,
    next_token,
    prompt_rng,
    score_continuation,
    scoring_context,
)
from edgekd.tokens import common_prefix

if TYPE_CHECKING:
    import torch

GB = 1e9
_GGML_LOG_LEVEL_ERROR = 4  # enum ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR, CONT


@functools.cache
def quiet_llama_cpp():
    """Let only llama.cpp's errors reach stderr.

    llama-cpp-python maps llama.cpp's log levels one off, so its warnings (the context-size notes
    of short evaluations, say) print even with verbose=False; edgekd reports failures itself.
    """
    import llama_cpp

    @llama_cpp.llama_log_callback
    def log(level: int, text: bytes, user_data) -> None:
        if level == _GGML_LOG_LEVEL_ERROR:
            sys.stderr.write(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    return log  # llama.cpp holds a raw pointer to it: keep it alive


def _meta_strings(model, wanted) -> dict[str, str]:
    """The GGUF metadata values whose key `wanted(key)` accepts, as strings."""
    import llama_cpp

    def text(read, i: int) -> str:
        size = 1024
        while True:
            buffer = ctypes.create_string_buffer(size)
            n = read(model, i, buffer, size)
            if n < size:
                return buffer.value.decode("utf-8", errors="replace")
            size = n + 1

    out = {}
    for i in range(llama_cpp.llama_model_meta_count(model)):
        key = text(llama_cpp.llama_model_meta_key_by_index, i)
        if wanted(key):
            out[key] = text(llama_cpp.llama_model_meta_val_str_by_index, i)
    return out


def _unloadable(path: Path) -> EdgekdError:
    return EdgekdError(
        f"llama.cpp could not load GGUF file {path}: it is truncated, malformed or of an "
        "architecture this llama.cpp does not know; re-export or re-download it"
    )


@functools.lru_cache(maxsize=32)
def _checked_templates(path: Path, size: int, mtime_ns: int) -> None:
    """Refuse a GGUF whose chat templates llama-cpp-python could not compile within bounds: it
    compiles every one whenever it loads the model, folding constant expressions as it goes.
    Read through llama.cpp's own loader (vocabulary only), which also refuses a cut-short file."""
    import llama_cpp

    from edgekd.chat_template import check_compiles

    quiet_llama_cpp()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise _unloadable(path)
    try:
        templates = _meta_strings(model, lambda key: key.startswith("tokenizer.chat_template"))
    finally:
        llama_cpp.llama_model_free(model)
    for key, template in sorted(templates.items()):
        check_compiles(template, f"GGUF file {path} ({key})")


def _checked(gguf_path: Path) -> Path:
    """The GGUF's path once it exists and its chat templates are safe to compile."""
    path = Path(gguf_path)
    if not path.is_file():
        raise EdgekdError(f"GGUF file {path} does not exist")
    stat = path.stat()
    _checked_templates(path.resolve(), stat.st_size, stat.st_mtime_ns)
    return path


def _llama(gguf_path: Path, **kwargs):
    from llama_cpp import Llama

    path = _checked(gguf_path)
    try:
        return Llama(str(path), verbose=False, **kwargs)
    except ValueError as err:
        if "context" not in str(err):
            raise _unloadable(path) from None
        n_ctx = kwargs.get("n_ctx", 0)
        kv = _gguf_cost(path).kv_bytes_per_position * n_ctx
        raise EdgekdError(
            f"llama.cpp could not allocate a {n_ctx}-token context for {path} (a KV cache of "
            f"{kv / GB:.1f} GB); lower the profile's context_length"
        ) from None


def _gguf_cost(path: Path) -> TokenCost:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    arch = reader.fields["general.architecture"].contents()

    def field(key: str, default=None):
        f = reader.fields.get(f"{arch}.{key}")
        return default if f is None else int(f.contents())

    n_head = field("attention.head_count")
    head_dim = field("attention.key_length", field("embedding_length") // n_head)
    kv_heads = field("attention.head_count_kv", n_head)
    # An untied token embedding is only looked up (one row per token); a tied one is the output
    # matrix too and is read whole.
    lookup = sizes.get("token_embd.weight", 0) if "output.weight" in sizes else 0
    return TokenCost(
        weights_bytes=path.stat().st_size,
        weights_read_bytes=sum(sizes.values()) - lookup,
        # llama.cpp keeps K and V in F16 unless told otherwise.
        kv_bytes_per_position=2 * field("block_count") * kv_heads * head_dim * 2,
    )


def _chat_prompts(vocab_llm, gguf_path: Path, conversations: list[list[dict]]) -> list[list[int]]:
    """Prompt token ids as create_chat_completion builds them: the GGUF's chat template rendered
    as llama-cpp-python's Jinja2ChatFormatter renders it (within chat_template's limits), then
    tokenized with special tokens parsed."""
    template = vocab_llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise EdgekdError(
            f"{gguf_path}: the GGUF has no tokenizer.chat_template, so prompts cannot be "
            "formatted; use a GGUF with a chat template or set data.source to a corpus"
        )
    # The formatter's added_special is True: the template writes BOS itself, none is added.
    return [
        vocab_llm.tokenize(prompt.encode(), add_bos=False, special=True)
        for prompt in _rendered(template, gguf_path, conversations, vocab_llm)
    ]


def _rendered(
    template: str, gguf_path: Path, conversations, llm, add_generation_prompt: bool = True
) -> list[str]:
    """Each conversation rendered (with a generation prompt unless told otherwise) with the
    variables llama-cpp-python's Jinja2ChatFormatter passes, within chat_template's limits."""
    from llama_cpp import llama_model_get_vocab, llama_vocab_get_text

    from edgekd.chat_template import render

    vocab = llama_model_get_vocab(llm.model)

    def text(token: int) -> str:
        return llama_vocab_get_text(vocab, token).decode() if token >= 0 else ""

    eos, bos = llm.token_eos(), llm.token_bos()
    return [
        render(
            template,
            f"GGUF file {gguf_path}",
            messages=messages,
            eos_token=text(eos),
            bos_token=text(bos),
            add_generation_prompt=add_generation_prompt,
            functions=None,
            function_call=None,
            tools=None,
            tool_choice=None,
        )
        for messages in conversations
    ]


@dataclass
class _Sequence:
    """One prompt being answered in a llama.cpp sequence slot."""

    index: int
    feed: list[int]  # tokens for the next decode: the prompt, then each sampled token
    rng: np.random.Generator
    pos: int = 0
    tokens: list[int] = field(default_factory=list)


def _decode_continuously(
    ctx, batch, prompt_ids: list[list[int]], parallel: int, *, max_tokens, seed, temperature
) -> list[list[int]]:
    """Generated token ids per prompt, keeping up to `parallel` sequences in every decode."""
    import llama_cpp

    from edgekd.console import progress

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

    with progress("Teacher answers (llama.cpp)", len(prompt_ids)) as advance:
        while pending or active:
            while pending and free_slots:
                index = pending.popleft()
                active[free_slots.pop()] = _Sequence(
                    index, prompt_ids[index], prompt_rng(seed, index)
                )
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
                token = next_token(logits, temperature, seq.rng)
                eog = llama_cpp.llama_vocab_is_eog(vocab, token)
                if not eog:
                    seq.tokens.append(token)
                    seq.feed = [token]
                if eog or len(seq.tokens) >= max_tokens:
                    answers[seq.index] = seq.tokens
                    del active[slot]
                    llama_cpp.llama_memory_seq_rm(memory, slot, -1, -1)
                    free_slots.append(slot)
                    advance()
    return answers


class LlamaCpp(Runtime):
    """A GGUF file in llama.cpp."""

    name = "llama.cpp"
    preallocates_context = True

    @classmethod
    def holds(cls, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() == ".gguf"

    @classmethod
    def weight_files(cls, path: Path) -> list[Path]:
        return [Path(path)]

    @classmethod
    def check_files(cls, path: Path) -> None:
        _checked(path)

    @classmethod
    def token_cost(cls, path: Path) -> TokenCost:
        return _gguf_cost(Path(path))

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids with the conventions of Hugging Face `tokenizer(text)`: special tokens in
        the text parsed as such, BOS/EOS added exactly when the GGUF says the model adds them."""
        llm = _llama(self.path, vocab_only=True)
        # add_bos=True: "add the specials the vocab asks for", none unless add_bos_token is set.
        return [llm.tokenize(t.encode("utf-8"), add_bos=True, special=True) for t in texts]

    def _each_logits(self, sequences: list[list[int]], reuse: bool = False):
        """The logits of each sequence in turn, from one model loaded for all of them; with
        `reuse`, a prefix shared with the sequence before is not run again."""
        import torch

        if not sequences:
            return
        n_ctx = scoring_context(sequences)
        llm = _llama(
            self.path,
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            n_threads=self.threads,
            n_threads_batch=self.threads,
            logits_all=True,
        )
        previous: list[int] = []
        for seq in sequences:
            # A prefix the last sequence shared (a question's context before each of its
            # choices) keeps its cache and its logits; eval clears the cache past n_tokens.
            llm.n_tokens = min(common_prefix(previous, seq), len(seq) - 1) if reuse else 0
            llm.eval(seq[llm.n_tokens :])
            previous = seq
            yield torch.from_numpy(np.array(llm.scores[: len(seq)], dtype=np.float32))

    def logits(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        return list(self._each_logits(sequences))

    def continuations(self, requests: list[tuple[list[int], int]]) -> list[Continuation]:
        """One sequence at a time through one loaded model (only its logits held at once), the
        prefix it shares with the one before taken from the cache: the harness asks for a
        question's choices one after another."""
        rows = self._each_logits([ids[:-1] for ids, _ in requests], reuse=True)
        return [
            score_continuation(logits[start - 1 :], ids[start:])
            for (ids, start), logits in zip(requests, rows, strict=True)
        ]

    def specials(self) -> Specials:
        llm = _llama(self.path, vocab_only=True)
        bos, eos = llm.token_bos(), llm.token_eos()

        def text(token: int) -> str:
            return llm.detokenize([token], special=True).decode("utf-8", errors="replace")

        return Specials(
            bos if bos >= 0 else None,
            text(bos) if bos >= 0 else "",
            eos if eos >= 0 else None,
            text(eos) if eos >= 0 else "",
        )

    def chat_text(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """The GGUF's own chat template, rendered as llama-cpp-python renders it."""
        llm = _llama(self.path, vocab_only=True)
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise EdgekdError(f"{self.path}: the GGUF has no tokenizer.chat_template")
        return _rendered(template, self.path, [messages], llm, add_generation_prompt)[0]

    def complete(self, prompts: list[list[int]], *, max_tokens: int, stop: list[str]) -> list[str]:
        """llama-cpp-python's completion at temperature 0 (greedy), which stops at the stop
        strings itself; from an empty cache for each prompt, as when it runs alone."""
        if not prompts:
            return []
        llm = _llama(
            self.path,
            n_ctx=scoring_context([p + [0] * max_tokens for p in prompts]),
            n_threads=self.threads,
            n_threads_batch=self.threads,
        )
        out = []
        for prompt in prompts:
            llm.reset()
            reply = llm.create_completion(
                prompt,
                max_tokens=max_tokens,
                temperature=0.0,
                repeat_penalty=1.0,
                stop=[s for s in stop if s] or None,
            )
            out.append(reply["choices"][0]["text"])
        return out

    def chat(self, conversations: list[list[dict]], *, max_tokens: int) -> list[str]:
        replies = []
        for messages in conversations:
            # A fresh model per conversation: a reused one would keep the previous prompt's cache
            # and decode a shared prefix differently.
            llm = _llama(
                self.path, n_ctx=self.n_ctx, n_threads=self.threads, n_threads_batch=self.threads
            )
            if template := llm.metadata.get("tokenizer.chat_template"):
                # llama-cpp-python renders it without limits: render it within them first.
                _rendered(template, self.path, [messages], llm)
            reply = llm.create_chat_completion(
                messages=messages, max_tokens=max_tokens, temperature=0.0
            )
            replies.append(reply["choices"][0]["message"]["content"])
        return replies

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
        """Answers with the GGUF's own chat template, decoded by llama.cpp's C API.

        Up to `parallel` conversations are decoded together in one context (continuous batching:
        a finished answer frees its slot for the next one). Each answer stops at an
        end-of-generation token or after max_tokens. Sampling draws from softmax(logits /
        temperature) with no top-k/top-p, by a generator seeded with (seed, index).
        """
        import llama_cpp

        if beams > 1:
            raise EdgekdError("llama.cpp has no beam search; run beam search in transformers")
        if not self.path.is_file():
            raise EdgekdError(f"{self.path}: GGUF teacher not found")
        if not conversations:
            return []
        vocab_llm = _llama(self.path, vocab_only=True)
        prompt_ids = _chat_prompts(vocab_llm, self.path, conversations)
        parallel = min(parallel, len(conversations), llama_cpp.llama_max_parallel_sequences())
        longest = max(len(ids) for ids in prompt_ids)
        # Each slot gets its own KV stream (not one unified buffer): a token attends only to its
        # own sequence's cells, laid out as when decoding it alone, which keeps greedy answers
        # closest to one-at-a-time decoding and attention cost independent of the other slots.
        # llama.cpp rounds a stream up to a multiple of 256 cells anyway; asking for that avoids
        # its warning. Flash attention stays off, as in Llama(), whose numerics the old
        # sequential path had.
        n_ctx_seq = -(-(longest + max_tokens) // 256) * 256
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = parallel * n_ctx_seq
        cparams.n_seq_max = parallel
        cparams.kv_unified = False
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.n_threads = cparams.n_threads_batch = self.threads
        with ExitStack() as stack:
            model = llama_cpp.llama_model_load_from_file(
                str(self.path).encode(), llama_cpp.llama_model_default_params()
            )
            if not model:
                raise EdgekdError(f"{self.path}: llama.cpp could not load the GGUF")
            stack.callback(llama_cpp.llama_model_free, model)
            ctx = llama_cpp.llama_init_from_model(model, cparams)
            if not ctx:
                raise EdgekdError(
                    f"{self.path}: llama.cpp could not create a {cparams.n_ctx}-token context; "
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
        return [vocab_llm.detokenize(a).decode("utf-8", errors="ignore") for a in answers]

    def load(self) -> None:
        import llama_cpp

        self._logits_ith = llama_cpp.llama_get_logits_ith
        self._llm = _llama(
            self.path, n_ctx=self.n_ctx, n_threads=self.threads, n_threads_batch=self.threads
        )
        self._n_vocab = self._llm.n_vocab()

    def _argmax(self) -> int:
        logits = np.ctypeslib.as_array(self._logits_ith(self._llm.ctx, -1), shape=(self._n_vocab,))
        return int(logits.argmax())

    def first(self, ids: list[int]) -> int:
        self._llm.reset()
        self._llm.eval(ids)
        return self._argmax()

    def next(self, token: int) -> int:
        self._llm.eval([token])
        return self._argmax()
