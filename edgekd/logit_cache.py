"""The teacher logit cache: the teacher's top-k log-probs at every trained position, computed once
per corpus and read by the training stages instead of running the teacher.

Per position (a logit index t whose next label is not -100, exactly what the KD loss uses) it keeps
the k largest log-probs at temperature 1 (fp16) with their token ids (int32) and the log of the
mass outside them (fp32). Training gets dense stand-in logits at its temperature T (see
dense_logprobs), so every divergence in losses.py applies unchanged. On disk: one safetensors file.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from edgekd.atomic import atomic_path
from edgekd.data import TokenizedExample, collate
from edgekd.losses import IGNORE_INDEX

# log of the mass outside the top k when the top k hold all of it (keeps the rebuilt logits finite).
_MIN_LOG_REST = -80.0


def examples_fingerprint(examples: list[TokenizedExample]) -> str:
    """sha256 hex of the token ids and labels, in order: the cache key of the training examples."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.input_ids, ex.labels]).encode() + b"\n")
    return h.hexdigest()


def trained_positions(labels: list[int]) -> list[int]:
    """Logit indices the KD loss uses: t such that labels[t + 1] is a target."""
    return [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE_INDEX]


def top_k_entries(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """[P, V] logits -> int32 ids [P, k], fp16 log-probs [P, k], fp32 log rest-mass [P]."""
    logp = logits.float().log_softmax(-1)
    top, ids = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1).clamp(min=_MIN_LOG_REST)
    fp16_min = torch.finfo(torch.float16).min
    return ids.to(torch.int32), top.clamp(min=fp16_min).to(torch.float16), rest


def dense_logprobs(
    ids: Tensor, logprobs: Tensor, log_rest: Tensor, vocab: int, temperature: float
) -> Tensor:
    """[P, V] logits whose softmax at `temperature` is the rebuilt tempered teacher (T * log q_T).

    q_T keeps the top k tempered exactly (p_i^(1/T), relative to each other). The tail's tempered
    mass is unknown; it is taken as if the rest mass r sat on r / p_k tokens of the k-th largest
    probability p_k (so r * p_k^(1/T - 1)), the least a tail bounded by p_k can have, and spread
    evenly over the other V - k tokens. At T = 1 that is the top k plus r spread evenly. Spreading
    r evenly before tempering instead would hand the flat tail most of the mass at T > 1."""
    k = ids.shape[-1]
    top = logprobs.float() / temperature
    log_tail = log_rest.float() + (1 / temperature - 1) * logprobs.float().min(-1).values
    norm = torch.logaddexp(top.logsumexp(-1), log_tail)
    spread = log_tail - norm - math.log(max(vocab - k, 1))
    out = spread[:, None].expand(-1, vocab).clone()
    out.scatter_(-1, ids.long(), top - norm[:, None])
    return out * temperature


@torch.no_grad()
def compute(
    teacher, examples: list[TokenizedExample], *, top_k: int, batch_size: int, pad_id: int
) -> dict[str, Tensor]:
    """Run the teacher over `examples` and keep the top_k entries at each trained position."""
    device = next(teacher.parameters()).device
    parts: dict[str, list[Tensor]] = {"ids": [], "logprobs": [], "log_rest": [], "positions": []}
    counts = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = collate(chunk, pad_id)
        logits = teacher(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
        ).logits
        for row, ex in enumerate(chunk):
            pos = torch.tensor(trained_positions(ex.labels), dtype=torch.long)
            ids, logprobs, rest = top_k_entries(logits[row, pos.to(device)].cpu(), top_k)
            for name, value in zip(parts, (ids, logprobs, rest, pos.to(torch.int32)), strict=True):
                parts[name].append(value)
            counts.append(len(pos))
    out = {name: torch.cat(values) for name, values in parts.items()}
    out["offsets"] = torch.tensor([0, *counts], dtype=torch.long).cumsum(0)
    out["vocab"] = torch.tensor([logits.shape[-1]], dtype=torch.long)
    return out


def save(path: Path, tensors: dict[str, Tensor]) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


class LogitCache:
    """A loaded cache; `teacher_logits` stands in for the teacher's shifted logits."""

    def __init__(self, tensors: dict[str, Tensor]):
        self.t = tensors
        self.vocab = int(tensors["vocab"][0])

    @classmethod
    def load(cls, path: Path) -> LogitCache:
        return cls(load_file(str(path)))

    @property
    def num_examples(self) -> int:
        return len(self.t["offsets"]) - 1

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.t.values())

    def teacher_logits(self, idx: list[int], width: int, device, temperature: float) -> Tensor:
        """[len(idx), width - 1, V] stand-in teacher logits at `temperature` (dense_logprobs) for
        collated examples `idx`, aligned like shift_for_next_token's logits; untrained positions
        hold zeros (the loss never reads them)."""
        out = torch.zeros(len(idx), width - 1, self.vocab, device=device)
        offsets = self.t["offsets"]
        for row, i in enumerate(idx):
            a, b = int(offsets[i]), int(offsets[i + 1])
            t = {name: self.t[name][a:b] for name in ("ids", "logprobs", "log_rest")}
            rebuilt = dense_logprobs(**t, vocab=self.vocab, temperature=temperature)
            out[row, self.t["positions"][a:b].long()] = rebuilt.to(device)
        return out
