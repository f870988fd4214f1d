"""The onnxruntime runtime for folders exported by optimum-onnx (model.onnx with a KV cache):
scoring, greedy or sampled chat through the cache, and the timed token steps.

onnxruntime is imported inside the methods (the benchmark's child measures its own peak memory).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgekd.device_runner import OrtSession
from edgekd.errors import EdgekdError
from edgekd.formats.runtime import (
    Continuation,
    Runtime,
    TokenCost,
    cut_at_stop,
    next_token,
    prompt_rng,
    score_continuation,
)
from edgekd.tokens import common_prefix

if TYPE_CHECKING:
    import torch

MODEL = "model.onnx"
_GATHER_OPS = ("Gather", "GatherBlockQuantized")


def model_files(folder: Path) -> list[Path]:
    """model.onnx and its external data files: the weights onnxruntime loads."""
    return sorted(f for f in Path(folder).iterdir() if f.name.startswith(MODEL))


def check_onnx(folder: Path) -> None:
    """model.onnx parses and every external weight lies within its data file."""
    import onnx
    from google.protobuf.message import DecodeError
    from onnx import external_data_helper

    path = Path(folder) / MODEL
    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, OSError, ValueError) as err:
        raise EdgekdError(
            f"{path} is truncated or malformed ({type(err).__name__}); re-export it"
        ) from None
    for tensor in model.graph.initializer:
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        data = Path(folder) / info["location"]
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if not data.is_file() or data.stat().st_size < end:
            raise EdgekdError(
                f"{data} is missing or truncated: {tensor.name} ends at byte {end}; re-export it"
            )


def _initializer_bytes(tensor) -> int:
    from onnx import external_data_helper, numpy_helper

    if external_data_helper.uses_external_data(tensor):
        return int({e.key: e.value for e in tensor.external_data}["length"])
    if tensor.raw_data:
        return len(tensor.raw_data)
    return numpy_helper.to_array(tensor).nbytes


def onnx_cost(folder: Path, kv_per_position: Callable[[list, list[int]], int]) -> TokenCost:
    """The token cost of a folder's model.onnx; `kv_per_position(past input types, their item
    sizes)` gives the KV cache bytes per position (the graphs do not always state it)."""
    import onnx

    model = onnx.load(folder / MODEL, load_external_data=False)
    sizes = {t.name: _initializer_bytes(t) for t in model.graph.initializer}
    users: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    # Tensors that only feed embedding lookups are read one row per token.
    lookup = sum(b for n, b in sizes.items() if users.get(n) and users[n] <= set(_GATHER_OPS))
    past = [i.type.tensor_type for i in model.graph.input if i.name.startswith("past_key_values.")]
    itemsize = [onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize for t in past]
    return TokenCost(
        weights_bytes=sum(f.stat().st_size for f in model_files(folder)),
        weights_read_bytes=sum(sizes.values()) - lookup,
        kv_bytes_per_position=kv_per_position(past, itemsize),
    )


def _fixed_dims_kv(past: list, itemsize: list[int]) -> int:
    # [batch, kv heads, past length, head size]: the fixed dims are the per-position size.
    return sum(
        size * int(np.prod([d.dim_value for d in t.shape.dim if d.HasField("dim_value")]))
        for t, size in zip(past, itemsize, strict=True)
    )


class _Session(OrtSession):
    """One onnxruntime session over an exported decoder, fed the inputs its graph declares (the
    steps the device runner takes too)."""

    def __init__(self, onnx_dir: Path, threads: int):
        if not (Path(onnx_dir) / MODEL).is_file():
            raise EdgekdError(f"{onnx_dir} has no {MODEL}: export the model first")
        super().__init__(str(onnx_dir), threads)

    def decode(
        self, prompt: list[int], eos: set[int], max_tokens: int, pick, done=lambda new: False
    ) -> list[int]:
        """The tokens `pick(logits)` chooses after `prompt`, reusing the KV cache between steps,
        up to an end token (left out), max_tokens or `done(tokens so far)`."""
        logits, past = self.step(prompt, self.empty_past(), 0)
        new: list[int] = []
        while len(new) < max_tokens:
            token = pick(logits[-1])
            if token in eos:
                break
            new.append(token)
            if len(new) == max_tokens or done(new):
                break
            logits, past = self.step([token], past, len(prompt) + len(new) - 1)
        return new


class Ort(Runtime):
    """An ONNX folder (model.onnx with a KV cache) in onnxruntime."""

    name = "onnxruntime"

    @classmethod
    def holds(cls, path: Path) -> bool:
        return path.is_dir() and (path / MODEL).is_file()

    @classmethod
    def weight_files(cls, path: Path) -> list[Path]:
        return model_files(path)

    @classmethod
    def check_files(cls, path: Path) -> None:
        check_onnx(path)

    @classmethod
    def token_cost(cls, path: Path) -> TokenCost:
        return onnx_cost(Path(path), _fixed_dims_kv)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts)["input_ids"]

    def logits(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        import torch

        session = _Session(self.path, self.threads)
        out = []
        for seq in sequences:
            logits, _ = session.step(list(seq), session.empty_past(), 0)
            out.append(torch.from_numpy(logits.astype(np.float32)))
        return out

    def continuations(self, requests: list[tuple[list[int], int]]) -> list[Continuation]:
        """One sequence at a time through one session; the prefix a sequence shares with the
        one before (a question's context before each of its choices) is taken from that one's
        cache, cut to the prefix along its positions axis ([batch, heads, positions, size])."""
        import torch

        session, out = _Session(self.path, self.threads), []
        before: list[int] = []
        logits, cache = np.zeros((0, 0), np.float32), session.empty_past()
        for ids, start in requests:
            seq = list(ids[:-1])
            n = min(common_prefix(before, seq), len(seq) - 1)
            if n:
                past = {k: v[:, :, :n] for k, v in cache.items()}
                new, cache = session.step(seq[n:], past, n)
                logits = np.concatenate([logits[:n], new])
            else:
                logits, cache = session.step(seq, session.empty_past(), 0)
            before = seq
            out.append(score_continuation(torch.from_numpy(logits[start - 1 :]), ids[start:]))
        return out

    def complete(self, prompts: list[list[int]], *, max_tokens: int, stop: list[str]) -> list[str]:
        """Greedy through the KV cache, one prompt at a time, until a stop string shows."""
        session, tok, eos = _Session(self.path, self.threads), self.tokenizer, self._eos_ids()
        out = []
        for prompt in prompts:
            new = session.decode(
                list(prompt),
                eos,
                max_tokens,
                lambda x: int(np.argmax(x)),
                lambda new: cut_at_stop(tok.decode(new, skip_special_tokens=True), stop)[1],
            )
            out.append(cut_at_stop(tok.decode(new, skip_special_tokens=True), stop)[0])
        return out

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id} - {None}
        gen_config = self.path / "generation_config.json"
        if gen_config.is_file():
            eos = json.loads(gen_config.read_text()).get("eos_token_id")
            ids |= set(eos if isinstance(eos, list) else [eos]) - {None}
        return ids

    def _replies(self, conversations: list[list[dict]], max_tokens: int, pick_for) -> list[str]:
        from edgekd.data import render_chat

        session, tok = _Session(self.path, self.threads), self.tokenizer
        eos = self._eos_ids()
        replies = []
        for i, messages in enumerate(conversations):
            prompt = render_chat(tok, messages, add_generation_prompt=True, tokenize=True)
            new = session.decode(prompt, eos, max_tokens, pick_for(i))
            replies.append(tok.decode(new, skip_special_tokens=True))
        return replies

    def device_chat(self, conversations: list[list[dict]]) -> dict:
        """The prompts rendered and tokenized here, and the end tokens: the device has no
        transformers; it decodes greedily and sends the reply tokens back."""
        from edgekd.data import render_chat

        prompts = [
            render_chat(self.tokenizer, m, add_generation_prompt=True, tokenize=True)
            for m in conversations
        ]
        return {"chat_ids": [list(p) for p in prompts], "eos": sorted(self._eos_ids())}

    def device_replies(self, result: dict) -> list[str]:
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in result["reply_ids"]]

    def chat(self, conversations: list[list[dict]], *, max_tokens: int) -> list[str]:
        return self._replies(conversations, max_tokens, lambda i: lambda x: int(np.argmax(x)))

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
        """One conversation at a time (`parallel` is not used); sampling as llama.cpp's
        generation samples, by a generator seeded with (seed, index)."""
        if beams > 1:
            raise EdgekdError("onnxruntime has no beam search here; run it in transformers")

        def pick_for(i: int):
            rng = prompt_rng(seed, i)
            return lambda x: next_token(x, temperature, rng)

        return self._replies(conversations, max_tokens, pick_for)

    def load(self) -> None:
        self._session = _Session(self.path, self.threads)

    def _run(self, ids: list[int]) -> int:
        logits, self._past = self._session.step(ids, self._past, self._n_past)
        self._n_past += len(ids)
        return int(logits[-1].argmax())

    def first(self, ids: list[int]) -> int:
        self._past, self._n_past = self._session.empty_past(), 0
        return self._run(ids)

    def next(self, token: int) -> int:
        return self._run([token])
