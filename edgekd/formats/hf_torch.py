"""The torch runtime: a Hugging Face model folder (or a model already in memory) in transformers.
Scoring, left-padded batched generate() (greedy, sampling or beam search), the timed token
steps with the KV cache.

torch and transformers are imported inside the functions: the benchmark's child process must
not import torch before it measures another runtime's peak memory.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgekd.formats.runtime import (
    Continuation,
    Runtime,
    TokenCost,
    cut_at_stop,
    score_continuation,
)

if TYPE_CHECKING:
    import torch


def _torch_cost(folder: Path) -> TokenCost:
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    sizes, per_value = {}, 4
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                t = f.get_slice(name)
                per_value = {"F32": 4, "F16": 2, "BF16": 2}.get(t.get_dtype(), 4)
                sizes[name] = per_value * int(np.prod(t.get_shape()))
    embed = next((n for n in sizes if n.endswith("embed_tokens.weight")), None)
    lookup = sizes[embed] if embed and any(n.endswith("lm_head.weight") for n in sizes) else 0
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return TokenCost(
        weights_bytes=sum(f.stat().st_size for f in folder.glob("*.safetensors")),
        weights_read_bytes=sum(sizes.values()) - lookup,
        # transformers keeps the cache in the weights' dtype.
        kv_bytes_per_position=2 * config.num_hidden_layers * kv_heads * head_dim * per_value,
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
    import torch

    from edgekd.console import progress as progress_bar

    # Batches of similar length waste less compute on padding.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    bar = progress_bar(progress, len(prompts)) if progress else contextlib.nullcontext(None)
    with bar as advance:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            # Left padding: every prompt ends where generation starts.
            for row, i in enumerate(batch):
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
            if advance:
                advance(len(batch))
    return out


# Tokens one scoring forward pass holds: its logits over a 50k vocabulary take 200 MB.
SCORE_TOKENS = 1024


def _length_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices in batches of similar length whose padded size stays within `budget` tokens (a
    longer sequence alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class HfTorch(Runtime):
    """A Hugging Face model folder in transformers (or, through `from_model`, a loaded model)."""

    name = "torch"
    # The prompts one generate() call answers together when the caller leaves it to the runtime.
    chat_batch = 8

    @classmethod
    def from_model(cls, model, tokenizer) -> HfTorch:
        """The runtime over a model already loaded (a teacher on its device, a student being
        trained); threads are left as they are."""
        runtime = cls(getattr(model, "name_or_path", "") or ".", threads=0, tokenizer=tokenizer)
        runtime._model = model
        return runtime

    @classmethod
    def holds(cls, path: Path) -> bool:
        return path.is_dir() and (path / "config.json").is_file()

    @classmethod
    def weight_files(cls, path: Path) -> list[Path]:
        return sorted(Path(path).glob("*.safetensors"))

    @classmethod
    def token_cost(cls, path: Path) -> TokenCost:
        return _torch_cost(Path(path))

    @property
    def model(self):
        """The model, loaded on first use."""
        if getattr(self, "_model", None) is None:
            self.load()
        return self._model

    def load(self) -> None:
        import torch

        from edgekd import models

        torch.set_num_threads(self.threads)
        self._model = models.load_model(models.resolve_source(str(self.path), role="model"))

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts)["input_ids"]

    def logits(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        import torch

        with torch.no_grad():
            return [self.model(torch.tensor([seq])).logits[0].float() for seq in sequences]

    def continuations(self, requests: list[tuple[list[int], int]]) -> list[Continuation]:
        """In right-padded batches without a mask, as lm-evaluation-harness's own backend runs
        them: a causal model's positions never see the padding after them."""
        import torch

        inputs = [ids[:-1] for ids, _ in requests]
        out: list[Continuation] = [None] * len(requests)  # type: ignore[list-item]
        for batch in _length_batches([len(x) for x in inputs], SCORE_TOKENS):
            width = len(inputs[batch[0]])
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : len(inputs[i])] = torch.tensor(inputs[i])
            with torch.no_grad():
                logits = self.model(ids.to(self.model.device)).logits.float().cpu()
            for row, i in enumerate(batch):
                seq, start = requests[i]
                out[i] = score_continuation(logits[row, start - 1 : len(seq) - 1], seq[start:])
        return out

    def complete(self, prompts: list[list[int]], *, max_tokens: int, stop: list[str]) -> list[str]:
        """Left-padded batched greedy generate(), stopping at the stop strings as transformers
        matches them on tokens, then cut at the first one."""
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        decoding = decoding_options(temperature=0.0, num_beams=1)
        if stop := [s for s in stop if s]:
            decoding |= {"stop_strings": stop, "tokenizer": tok}
        answers = generate_token_ids(
            self.model,
            prompts,
            max_tokens=max_tokens,
            pad_id=pad_id,
            decoding=decoding,
            batch_size=self.chat_batch,
        )
        return [cut_at_stop(tok.decode(a, skip_special_tokens=True), stop)[0] for a in answers]

    def heldout_logprobs(self, heldout) -> list[torch.Tensor]:
        """In padded batches, keeping only the scored rows (a large vocabulary times every
        position of every sequence would not fit)."""
        from edgekd.evaluate import torch_logprobs

        return torch_logprobs(self.model, heldout)

    def chat(self, conversations: list[list[dict]], *, max_tokens: int) -> list[str]:
        replies = self.generate(
            conversations, max_tokens=max_tokens, temperature=0.0, seed=0, parallel=self.chat_batch
        )
        return [r.strip() for r in replies]

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
        """The tokenizer's chat template, then left-padded generate() in batches of `parallel`;
        greedy (temperature 0, beams 1), sampling (temperature > 0) or beam search."""
        import torch

        from edgekd.data import render_chat, require_chat_template

        tokenizer = self.tokenizer
        require_chat_template(tokenizer)
        texts = [render_chat(tokenizer, m, add_generation_prompt=True) for m in conversations]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        # Answers that end early are padded to their batch's longest: with the end token, which
        # decoding skips.
        pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        torch.manual_seed(seed)
        answers = generate_token_ids(
            self.model,
            encoded,
            max_tokens=max_tokens,
            pad_id=pad_id,
            decoding=decoding_options(temperature=temperature, num_beams=beams),
            batch_size=parallel,
            progress="Teacher answers (transformers)",
        )
        return [tokenizer.decode(a, skip_special_tokens=True) for a in answers]

    def _forward(self, ids: list[int]) -> int:
        import torch

        with torch.inference_mode():
            out = self._model(
                input_ids=torch.tensor([ids], device=self._model.device),
                past_key_values=self._past,
                use_cache=True,
            )
        self._past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def first(self, ids: list[int]) -> int:
        self._past = None
        return self._forward(ids)

    def next(self, token: int) -> int:
        return self._forward([token])
