"""Knowledge-distillation losses: per-token teacher/student divergences and the mixed KD objective.

Notation: p = softmax(z_t / T) is the teacher, q = softmax(z_s / T) the student. All math runs in
float32 log space, so underflowing probabilities and -inf logits (masked vocabulary) stay finite.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

Divergence = Literal[
    "forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "tv", "mse"
]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)
IGNORE_INDEX = -100

# Masked vocabulary entries have log-prob -inf, and 0 * (-inf - -inf) is NaN. Flooring log-probs at
# the most negative float keeps every difference finite while exp(floor) is still exactly 0.
LOG_FLOOR = torch.finfo(torch.float32).min


class KDLossOutput(NamedTuple):
    """`loss` keeps the graph; `kd` (mean divergence, before alpha and T^2), `ce` (mean
    cross-entropy) and `tokens` (count of positions used, 0-d long tensor) are detached."""

    loss: Tensor
    kd: Tensor
    ce: Tensor
    tokens: Tensor


def _check_args(divergence: str, temperature: float, skew_alpha: float, jsd_beta: float) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(
            f"divergence={divergence!r} is unknown; use one of {', '.join(DIVERGENCES)}"
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature} must be a finite number > 0")
    if not 0 <= skew_alpha <= 1:
        raise ValueError(f"skew_alpha={skew_alpha} must be in [0, 1]")
    if not 0 <= jsd_beta <= 1:
        raise ValueError(f"jsd_beta={jsd_beta} must be in [0, 1]")
    # At these endpoints the mixture equals the first argument, so the loss is identically zero.
    if divergence.startswith("skew_") and skew_alpha == 1:
        raise ValueError(f"skew_alpha=1 makes {divergence} identically 0; use a value in [0, 1)")
    if divergence == "jsd" and jsd_beta in (0, 1):
        raise ValueError(f"jsd_beta={jsd_beta} makes jsd identically 0; use a value in (0, 1)")


def check_kd_args(
    divergence: str,
    temperature: float,
    skew_alpha: float,
    jsd_beta: float,
    *,
    alpha: float,
    has_teacher: bool,
) -> None:
    """The arguments of a KD loss (plain or chunked): a known divergence, valid knobs, and a
    teacher wherever alpha gives the divergence weight."""
    _check_args(divergence, temperature, skew_alpha, jsd_beta)
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    if not has_teacher and alpha > 0:
        raise ValueError(f"the teacher is None but alpha={alpha}; pass it or set alpha=0")


def _check_shapes(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} differ; teacher and student must share a vocabulary"
        )


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    return (logits.float() / temperature).log_softmax(-1).clamp(min=LOG_FLOOR)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) over the last dim, from log-probs."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, weight: float) -> Tensor:
    """log(weight * a + (1 - weight) * b), computed without leaving log space."""
    if weight == 0:
        return log_b
    if weight == 1:
        return log_a
    return torch.logaddexp(log_a + math.log(weight), log_b + math.log1p(-weight))


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    divergence: str,
    temperature: float,
    skew_alpha: float,
    jsd_beta: float,
) -> Tensor:
    """Per-position divergence, shape logits.shape[:-1], over the full vocabulary at temperature T.

    forward_kl KL(p||q); reverse_kl KL(q||p); skew_forward_kl KL(p || a p + (1-a) q) and
    skew_reverse_kl KL(q || a q + (1-a) p) with a = skew_alpha (DistiLLM); jsd is GKD's generalized
    JSD with m = b p + (1-b) q: b KL(p||m) + (1-b) KL(q||m), b = jsd_beta, symmetric at b = 0.5;
    tv is 0.5 * sum|p - q|; mse is the mean over the vocabulary of (z_s/T - z_t/T)^2.
    """
    _check_args(divergence, temperature, skew_alpha, jsd_beta)
    _check_shapes(student_logits, teacher_logits)
    if divergence == "mse":
        zs = student_logits.float() / temperature
        zt = teacher_logits.float() / temperature
        # Equal entries (both -inf for a masked token) differ by 0, not by NaN.
        return torch.where(zs == zt, 0.0, zs - zt).square().mean(-1)
    log_q = _log_probs(student_logits, temperature)
    log_p = _log_probs(teacher_logits, temperature)
    if divergence == "forward_kl":
        return _kl(log_p, log_q)
    if divergence == "reverse_kl":
        return _kl(log_q, log_p)
    if divergence == "skew_forward_kl":
        return _kl(log_p, _log_mix(log_p, log_q, skew_alpha))
    if divergence == "skew_reverse_kl":
        return _kl(log_q, _log_mix(log_q, log_p, skew_alpha))
    if divergence == "jsd":
        log_m = _log_mix(log_p, log_q, jsd_beta)
        return jsd_beta * _kl(log_p, log_m) + (1 - jsd_beta) * _kl(log_q, log_m)
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)  # tv


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    *,
    temperature: float,
    alpha: float,
    divergence: str,
    skew_alpha: float,
    jsd_beta: float,
) -> KDLossOutput:
    """alpha * T^2 * mean(divergence) + (1 - alpha) * cross_entropy(student_logits, labels).

    labels are aligned with logits (logits[..., t, :] predicts labels[..., t]); positions labelled
    -100 are left out of both terms and of the means. teacher_logits may be None when alpha == 0.
    With no labelled position the loss is 0 and still backpropagates (zero gradients).
    """
    check_kd_args(
        divergence,
        temperature,
        skew_alpha,
        jsd_beta,
        alpha=alpha,
        has_teacher=teacher_logits is not None,
    )
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match student_logits "
            f"{tuple(student_logits.shape)}; labels need the logits' shape minus the vocab dim"
        )

    keep = labels != IGNORE_INDEX
    tokens = keep.sum()
    n = tokens.clamp(min=1)
    # Select first: ignored positions never enter the math, and only kept rows are upcast.
    student = student_logits[keep].float()
    with torch.set_grad_enabled(torch.is_grad_enabled() and alpha < 1):  # at alpha=1 CE only logs
        ce = F.cross_entropy(student, labels[keep], reduction="sum") / n
    if alpha == 0:
        return KDLossOutput(ce, torch.zeros_like(ce).detach(), ce.detach(), tokens)

    _check_shapes(student_logits, teacher_logits)
    kd = (
        token_divergence(
            student,
            teacher_logits[keep].detach(),  # the teacher is frozen; never hold its graph
            divergence=divergence,
            temperature=temperature,
            skew_alpha=skew_alpha,
            jsd_beta=jsd_beta,
        ).sum()
        / n
    )
    # T^2 keeps the soft-target gradients on the same scale as the hard-label ones (Hinton et al.).
    loss = alpha * temperature**2 * kd
    if alpha < 1:
        loss = loss + (1 - alpha) * ce
    return KDLossOutput(loss, kd.detach(), ce.detach(), tokens)


def shift_for_next_token(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Align a causal LM's outputs with its inputs: drop the last logit and the first label."""
    return logits[..., :-1, :], labels[..., 1:]
