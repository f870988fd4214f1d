"""The KD loss computed from final hidden states, chunk by chunk, never holding a batch's logits.

The plain path materializes batch x length x vocab logits for both models (and as much again for
the softmaxes and the gradient). Here only the labelled positions are kept, and their logits exist
`chunk_tokens` rows at a time: each chunk's logits, divergence and gradient are computed and
dropped before the next. The gradients with respect to the hidden states and the LM head are
accumulated during the forward pass, so the backward pass only scales them: the result, value and
gradients, is the same as `losses.kd_loss` on the full logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from edgekd.losses import IGNORE_INDEX, KDLossOutput, _check_args, token_divergence

# Teacher logits for rows [start, stop) of the kept positions (batch-major order, as labels[keep]):
# from the teacher's hidden states and head (`head_logits`), or from a precomputed cache.
TeacherLogits = Callable[[int, int], Tensor]


def _compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul on `t` in (t's own dtype outside autocast)."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # Cast once per loss, not once per chunk: autocast re-casts non-leaf weights at every use.
    return None if t is None else t.detach().to(dtype)


def head_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None = None) -> TeacherLogits:
    """Teacher logits computed on demand from its kept hidden states (N, d) and its LM head."""
    dtype = _compute_dtype(weight)
    hidden, weight, bias = _cast(hidden, dtype), _cast(weight, dtype), _cast(bias, dtype)

    def rows(start: int, stop: int) -> Tensor:
        with torch.no_grad():
            return F.linear(hidden[start:stop], weight, bias)

    return rows


class _ChunkedKD(torch.autograd.Function):
    """loss(hidden, weight, bias); the gradients are computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, teacher, alpha, chunk_tokens, kd_args):
        n = max(labels.numel(), 1)
        # Only what trains gets a gradient buffer (a frozen head, as in QLoRA, gets none).
        needs = ctx.needs_input_grad[:3]
        want_grad = any(needs)
        grad_h, grad_w, grad_b = (
            torch.zeros_like(t) if need else None
            for t, need in zip((hidden, weight, bias), needs, strict=True)
        )
        dtype = _compute_dtype(weight)
        h_all, w, b = _cast(hidden, dtype), _cast(weight, dtype), _cast(bias, dtype)
        ce_sum = hidden.new_zeros((), dtype=torch.float32)
        kd_sum = hidden.new_zeros((), dtype=torch.float32)
        scale = alpha * kd_args["temperature"] ** 2
        for start in range(0, labels.numel(), chunk_tokens):
            stop = min(start + chunk_tokens, labels.numel())
            h = h_all[start:stop]
            with torch.enable_grad():
                logits = F.linear(h, w, b).requires_grad_(want_grad)
                student = logits.float()
                with torch.set_grad_enabled(alpha < 1):  # at alpha=1 CE is only logged
                    ce = F.cross_entropy(student, labels[start:stop], reduction="sum")
                kd = torch.zeros_like(ce)
                if alpha > 0:
                    kd = token_divergence(student, teacher(start, stop), **kd_args).sum()
                chunk_loss = (scale * kd + (1 - alpha) * ce) / n
            ce_sum += ce.detach()
            kd_sum += kd.detach()
            if want_grad and chunk_loss.requires_grad:
                (d_logits,) = torch.autograd.grad(chunk_loss, logits)
                d_logits = d_logits.to(dtype)
                if grad_h is not None:
                    grad_h[start:stop] = d_logits @ w
                if grad_w is not None:
                    grad_w += (d_logits.t() @ h).to(grad_w.dtype)
                if grad_b is not None:
                    grad_b += d_logits.sum(0).to(grad_b.dtype)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        loss = (scale * kd_sum + (1 - alpha) * ce_sum) / n
        return loss, kd_sum / n, ce_sum / n

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        # The loss is a scalar: its gradients are the accumulated ones times the incoming scale.
        grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return *grads, None, None, None, None, None


def chunked_kd_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    teacher: TeacherLogits | None,
    *,
    chunk_tokens: int,
    temperature: float,
    alpha: float,
    divergence: str,
    skew_alpha: float,
    jsd_beta: float,
) -> KDLossOutput:
    """`losses.kd_loss` from the student's final hidden states (..., d) and LM head (weight, bias).

    labels match hidden.shape[:-1] (already shifted for next-token prediction); positions labelled
    -100 are dropped before any logit is computed. `teacher(start, stop)` gives the teacher logits
    of kept rows [start, stop) in the order of labels[labels != -100]; it may be None at alpha=0.
    At most `chunk_tokens` rows of logits exist at a time.
    """
    _check_args(divergence, temperature, skew_alpha, jsd_beta)
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}; "
            "labels need the hidden states' shape minus the last dim"
        )
    if teacher is None and alpha > 0:
        raise ValueError(f"teacher is None but alpha={alpha}; pass it or set alpha=0")
    keep = labels != IGNORE_INDEX
    kd_args = {
        "divergence": divergence,
        "temperature": temperature,
        "skew_alpha": skew_alpha,
        "jsd_beta": jsd_beta,
    }
    loss, kd, ce = _ChunkedKD.apply(
        hidden[keep], weight, bias, labels[keep], teacher, alpha, chunk_tokens, kd_args
    )
    return KDLossOutput(loss, kd.detach(), ce.detach(), keep.sum())
