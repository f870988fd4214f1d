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

from edgekd.losses import (
    IGNORE_INDEX,
    LOG_FLOOR,
    Divergence,
    KDLossOutput,
    check_kd_args,
    token_divergence,
)

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


# Divergences whose logit gradient `_closed_form` writes out: the default and its mirror. The
# others go through autograd per chunk, which costs several more passes over the chunk's logits.
CLOSED_FORM = ("forward_kl", "reverse_kl")
# (kd sum, ce sum, gradient of alpha * T^2 * kd + (1 - alpha) * ce w.r.t. the logits, or None)
ChunkStep = tuple[Tensor, Tensor, Tensor | None]


def _autograd(
    logits: Tensor, t_logits: Tensor | None, labels: Tensor, alpha: float, kd_args: dict, grad: bool
) -> ChunkStep:
    with torch.enable_grad():
        logits = logits.detach().requires_grad_(grad)
        student = logits.float()
        with torch.set_grad_enabled(grad and alpha < 1):  # at alpha=1 CE is only logged
            ce = F.cross_entropy(student, labels, reduction="sum")
        kd = torch.zeros_like(ce)
        if alpha > 0:
            kd = token_divergence(student, t_logits, **kd_args).sum()
        loss = alpha * kd_args["temperature"] ** 2 * kd + (1 - alpha) * ce
    d_logits = torch.autograd.grad(loss, logits)[0] if loss.requires_grad else None
    return kd.detach(), ce.detach(), d_logits


def _closed_form(
    logits: Tensor, t_logits: Tensor | None, labels: Tensor, alpha: float, kd_args: dict, grad: bool
) -> ChunkStep:
    """forward_kl / reverse_kl and CE with their logit gradient written out, in place.

    With q = softmax(z/T) and p the teacher's: d KL(p||q)/dz = (q - p) / T, d KL(q||p)/dz =
    q (log q - log p - KL(q||p)) / T, d CE/dz = softmax(z) - onehot(label). At T=1 q is CE's
    softmax too, so both terms share one buffer. Log-probs are floored as in `losses`, so masked
    (-inf) logits stay finite.
    """
    t = kd_args["temperature"]
    z = logits.float()
    log_q = (z / t if t != 1 else z).log_softmax(-1).clamp_(min=LOG_FLOOR)
    log_q1 = log_q if t == 1 else z.log_softmax(-1)
    rows = torch.arange(len(labels), device=z.device)
    ce = -log_q1[rows, labels].sum()  # before any buffer below is reused
    kd = torch.zeros_like(ce)
    d_logits, ce_folded = None, False
    if alpha > 0:
        log_p = (t_logits.float() / t).log_softmax(-1).clamp_(min=LOG_FLOOR)
        if kd_args["divergence"].name == "forward_kl":
            p = log_p.exp()
            kd = (log_p - log_q).mul_(p).sum()
            if grad:
                d_logits = log_q.exp_()  # q, in log_q's buffer
                if t == 1:  # alpha (q - p) + (1 - alpha) q = q - alpha p
                    d_logits.sub_(p, alpha=alpha)
                    ce_folded = True
                else:  # alpha T^2 (q - p) / T
                    d_logits.sub_(p).mul_(alpha * t)
        else:  # reverse_kl
            q = log_q.exp()
            diff = log_q.sub_(log_p)
            kl_rows = (q * diff).sum(-1, keepdim=True)
            kd = kl_rows.sum()
            if grad:
                d_logits = diff.sub_(kl_rows).mul_(alpha * t)
                if t == 1:  # q (alpha (diff - KL) + (1 - alpha))
                    d_logits.add_(1 - alpha)
                    ce_folded = True
                d_logits.mul_(q)
    if grad and alpha < 1:
        if not ce_folded:
            soft = log_q1.exp_()
            d_logits = (
                soft.mul_(1 - alpha) if d_logits is None else d_logits.add_(soft, alpha=1 - alpha)
            )
        d_logits[rows, labels] -= 1 - alpha
    return kd, ce, d_logits


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
        step = _closed_form if kd_args["divergence"].name in CLOSED_FORM else _autograd
        for start in range(0, labels.numel(), chunk_tokens):
            stop = min(start + chunk_tokens, labels.numel())
            h = h_all[start:stop]
            logits = F.linear(h, w, b)
            t_logits = teacher(start, stop) if alpha > 0 else None
            kd, ce, d_logits = step(logits, t_logits, labels[start:stop], alpha, kd_args, want_grad)
            ce_sum += ce
            kd_sum += kd
            if d_logits is not None:
                # The 1/n of the mean is applied to the (small) products, not the logit gradient.
                d_logits = d_logits.to(dtype)
                if grad_h is not None:
                    grad_h[start:stop] = (d_logits @ w).div_(n)
                if grad_w is not None and grad_w.dtype == dtype:
                    grad_w.addmm_(d_logits.t(), h, alpha=1 / n)  # no vocab x d temporary
                elif grad_w is not None:
                    grad_w += (d_logits.t() @ h).to(grad_w.dtype).div_(n)
                if grad_b is not None:
                    grad_b += d_logits.sum(0).to(grad_b.dtype).div_(n)
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
    divergence: Divergence,
) -> KDLossOutput:
    """`losses.kd_loss` from the student's final hidden states (..., d) and LM head (weight, bias).

    labels match hidden.shape[:-1] (already shifted for next-token prediction); positions labelled
    -100 are dropped before any logit is computed. `teacher(start, stop)` gives the teacher logits
    of kept rows [start, stop) in the order of labels[labels != -100]; it may be None at alpha=0.
    At most `chunk_tokens` rows of logits exist at a time.
    """
    check_kd_args(divergence, temperature, alpha=alpha, has_teacher=teacher is not None)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}; "
            "labels need the hidden states' shape minus the last dim"
        )
    keep = labels != IGNORE_INDEX
    kd_args = {"divergence": divergence, "temperature": temperature}
    loss, kd, ce = _ChunkedKD.apply(
        hidden[keep], weight, bias, labels[keep], teacher, alpha, chunk_tokens, kd_args
    )
    return KDLossOutput(loss, kd.detach(), ce.detach(), keep.sum())
