"""The quality measures of DESIGN.md (ppl, kld, top1) on the held-out slice, for any runtime.

A runtime only has to produce full-vocabulary log-probabilities at the scored positions; the
arithmetic lives in `quality`, a pure function, so torch, llama.cpp and onnxruntime numbers are
computed the same way.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from edgekd.atomic import atomic_path
from edgekd.errors import EdgekdError

# The largest x whose exp is a float: a mean nll above it has no perplexity.
_MAX_LOG_FLOAT = math.log(sys.float_info.max)


@dataclass(frozen=True)
class HeldOut:
    """Token sequences with the positions that are scored and the tokens that follow them."""

    sequences: list[list[int]]
    positions: list[torch.Tensor]  # logits index t predicts sequences[i][t + 1]
    targets: list[torch.Tensor]

    @classmethod
    def from_examples(cls, examples: Sequence) -> HeldOut:
        """From tokenized examples whose unshifted labels are -100 where a token is not scored."""
        seqs, positions, targets = [], [], []
        for ex in examples:
            ids = torch.tensor(ex.input_ids)
            labels = torch.tensor(ex.labels)
            pos = torch.nonzero(labels[1:] != -100).flatten()
            if len(pos) == 0:
                continue
            seqs.append(list(ex.input_ids))
            positions.append(pos)
            targets.append(ids[pos + 1])
        return cls(seqs, positions, targets)

    @property
    def num_tokens(self) -> int:
        return int(sum(len(p) for p in self.positions))


@dataclass(frozen=True)
class Quality:
    ppl: float
    kld: float
    top1: float
    tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


def _common_vocab(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Some models pad the embedding past the tokenizer's vocabulary; compare on the shared part.
    if a.shape[-1] == b.shape[-1]:
        return a, b
    v = min(a.shape[-1], b.shape[-1])
    return a[..., :v].log_softmax(-1), b[..., :v].log_softmax(-1)


def quality(
    model_logprobs: Sequence[torch.Tensor],
    reference_logprobs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
) -> Quality:
    """ppl (of the targets), mean KL(reference || model) and top1 agreement, over all positions."""
    terms = []
    for i, (lp, ref, tgt) in enumerate(
        zip(model_logprobs, reference_logprobs, targets, strict=True)
    ):
        lp, ref = _common_vocab(lp.float(), ref.float())
        seq_nll = -lp.gather(-1, tgt.view(-1, 1)).sum().item()
        seq_kld = (ref.exp() * (ref - lp)).sum().item()
        if not (math.isfinite(seq_nll) and math.isfinite(seq_kld)):
            broken_ref = bool(torch.isfinite(lp).all()) and not bool(torch.isfinite(ref).all())
            raise _not_finite(i, "reference's" if broken_ref else "model's", seq_nll, seq_kld)
        agree = (lp.argmax(-1) == ref.argmax(-1)).sum().item()
        terms.append((seq_nll, seq_kld, agree, len(tgt), lp.shape[-1]))
    return combine(terms)


def _not_finite(i: int, side: str, seq_nll: float, seq_kld: float) -> EdgekdError:
    return EdgekdError(
        f"held-out quality: the {side} log-probs of held-out sequence {i} hold NaN or inf "
        f"(nll {seq_nll}, kld {seq_kld}): its weights are broken, so no ppl, kld or top1 "
        "is reported for it"
    )


def combine(terms: Sequence[Sequence[float]]) -> Quality:
    """ppl, kld and top1 from per-sequence sums (nll, kld, top1 hits, positions, vocabulary), as
    `quality` makes them here and the device runner makes them on a device."""
    nll = kld = agree = 0.0
    n = 0
    for i, (seq_nll, seq_kld, seq_agree, positions, _) in enumerate(terms):
        if not (math.isfinite(seq_nll) and math.isfinite(seq_kld)):
            raise _not_finite(i, "model's", seq_nll, seq_kld)
        nll, kld = nll + seq_nll, kld + seq_kld
        agree += seq_agree
        n += positions
    if n == 0:
        raise ValueError("no scored positions in the held-out slice")
    if nll / n > _MAX_LOG_FLOAT:
        raise EdgekdError(
            f"held-out quality: the model's mean negative log-likelihood is {nll / n:.4g} nats "
            f"per token (a uniform guess scores {math.log(terms[-1][4]):.3g}), beyond any "
            "perplexity: its weights are broken (a training that diverged?)"
        )
    return Quality(ppl=math.exp(nll / n), kld=kld / n, top1=agree / n, tokens=n)


@torch.no_grad()
def torch_logprobs(model, heldout: HeldOut, *, batch_size: int = 4) -> list[torch.Tensor]:
    """Full-vocabulary float32 log-probs at the scored positions, from a transformers model."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    for start in range(0, len(heldout.sequences), batch_size):
        chunk = heldout.sequences[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for i in range(len(chunk)):
            pos = heldout.positions[start + i].to(device)
            out.append(logits[i, pos].float().log_softmax(-1).cpu())
    model.train(was_training)
    return out


def at_positions(full: Sequence[torch.Tensor], heldout: HeldOut) -> list[torch.Tensor]:
    """Pick the scored positions out of a runtime's log-probs for whole sequences."""
    return [lp[pos] for lp, pos in zip(full, heldout.positions, strict=True)]


def evaluate(logprobs_fn: Callable[[HeldOut], list[torch.Tensor]], heldout, reference) -> Quality:
    """Quality of any runtime, given a function that returns its log-probs on the held-out slice."""
    return quality(logprobs_fn(heldout), reference, heldout.targets)


def evaluate_torch(model, heldout: HeldOut, reference: Sequence[torch.Tensor]) -> Quality:
    return evaluate(lambda h: torch_logprobs(model, h), heldout, reference)


def save_reference(path: Path, logprobs: Sequence[torch.Tensor]) -> None:
    """The teacher's held-out log-probs, fp16, computed once per corpus (they are reused by every
    stage; fp16 keeps a 49k vocabulary at about 100 KB per scored token)."""
    tensors = {f"r{i}": lp.to(torch.float16).contiguous() for i, lp in enumerate(logprobs)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def load_reference(path: Path) -> list[torch.Tensor]:
    tensors = load_file(str(path))
    return [tensors[f"r{i}"].float() for i in range(len(tensors))]
