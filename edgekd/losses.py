"""Knowledge-distillation losses: per-token teacher/student divergences and the mixed KD objective.

Notation: p = softmax(z_t / T) is the teacher, q = softmax(z_s / T) the student. All math runs in
float32 log space, so underflowing probabilities and -inf logits (masked vocabulary) stay finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

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


@dataclass(frozen=True)
class Divergence:
    """A divergence by name with its knobs, checked once: what every KD loss takes.

    Build it from a stage's settings with `Divergence.of(settings.kd)`; the knobs' defaults live in
    config.KDSettings. A knob a divergence does not use is still range-checked and then ignored.
    """

    name: str
    skew_alpha: float  # the mixture weight a of skew_forward_kl and skew_reverse_kl
    jsd_beta: float  # the mixture weight b of jsd

    def __post_init__(self) -> None:
        if self.name not in DIVERGENCES:
            raise ValueError(
                f"divergence={self.name!r} is unknown; use one of {', '.join(DIVERGENCES)}"
            )
        for knob in KNOBS:
            value = getattr(self, knob)
            if not 0 <= value <= 1:
                raise ValueError(f"{knob}={value} must be in [0, 1]")
        for knob, degenerate in DIVERGENCES[self.name].degenerate.items():
            if getattr(self, knob) in degenerate:
                values = " or ".join(str(v) for v in degenerate)
                raise ValueError(
                    f"{knob}={getattr(self, knob)} makes {self.name} identically 0; "
                    f"use a value in [0, 1] other than {values}"
                )

    @classmethod
    def of(cls, settings) -> Divergence:
        """The divergence a KDSettings names, with its knobs."""
        return cls(settings.divergence, **{k: getattr(settings, k) for k in KNOBS})


KNOBS = tuple(f.name for f in fields(Divergence) if f.name != "name")


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


# A divergence from the teacher's and the student's log-probs p and q at temperature T.
OnLogProbs = Callable[[Tensor, Tensor, Divergence], Tensor]
# A divergence from the student's and the teacher's logits and T.
OnLogits = Callable[[Tensor, Tensor, float, Divergence], Tensor]


def _on_log_probs(fn: OnLogProbs) -> OnLogits:
    def from_logits(student: Tensor, teacher: Tensor, temperature: float, d: Divergence) -> Tensor:
        log_q = _log_probs(student, temperature)
        log_p = _log_probs(teacher, temperature)
        return fn(log_p, log_q, d)

    return from_logits


def _mse(student: Tensor, teacher: Tensor, temperature: float, d: Divergence) -> Tensor:
    zs = student.float() / temperature
    zt = teacher.float() / temperature
    # Equal entries (both -inf for a masked token) differ by 0, not by NaN.
    return torch.where(zs == zt, 0.0, zs - zt).square().mean(-1)


def _jsd(log_p: Tensor, log_q: Tensor, d: Divergence) -> Tensor:
    log_m = _log_mix(log_p, log_q, d.jsd_beta)
    return d.jsd_beta * _kl(log_p, log_m) + (1 - d.jsd_beta) * _kl(log_q, log_m)


class DivergenceEntry(NamedTuple):
    """A registered divergence: its per-position function, and for each knob it reads the values
    that make it identically zero (refused)."""

    fn: OnLogits
    degenerate: dict[str, tuple[float, ...]]


# The one list of divergences: config's choice, the CLI's error and the tests all read it.
DIVERGENCES: dict[str, DivergenceEntry] = {
    "forward_kl": DivergenceEntry(_on_log_probs(lambda p, q, d: _kl(p, q)), {}),
    "reverse_kl": DivergenceEntry(_on_log_probs(lambda p, q, d: _kl(q, p)), {}),
    "skew_forward_kl": DivergenceEntry(
        _on_log_probs(lambda p, q, d: _kl(p, _log_mix(p, q, d.skew_alpha))), {"skew_alpha": (1,)}
    ),
    "skew_reverse_kl": DivergenceEntry(
        _on_log_probs(lambda p, q, d: _kl(q, _log_mix(q, p, d.skew_alpha))), {"skew_alpha": (1,)}
    ),
    "jsd": DivergenceEntry(_on_log_probs(_jsd), {"jsd_beta": (0, 1)}),
    "tv": DivergenceEntry(
        _on_log_probs(lambda p, q, d: 0.5 * (p.exp() - q.exp()).abs().sum(-1)), {}
    ),
    "mse": DivergenceEntry(_mse, {}),
}


def _check_args(divergence: Divergence, temperature: float) -> None:
    if not isinstance(divergence, Divergence):
        raise TypeError(f"divergence={divergence!r}: pass a losses.Divergence")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature} must be a finite number > 0")


def check_kd_args(
    divergence: Divergence, temperature: float, *, alpha: float, has_teacher: bool
) -> None:
    """The arguments of a KD loss (plain or chunked): a Divergence, a valid temperature and
    alpha, and a teacher wherever alpha gives the divergence weight."""
    _check_args(divergence, temperature)
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


def token_divergence(
    student_logits: Tensor, teacher_logits: Tensor, *, divergence: Divergence, temperature: float
) -> Tensor:
    """Per-position divergence, shape logits.shape[:-1], over the full vocabulary at temperature T.

    forward_kl KL(p||q); reverse_kl KL(q||p); skew_forward_kl KL(p || a p + (1-a) q) and
    skew_reverse_kl KL(q || a q + (1-a) p) with a = skew_alpha (DistiLLM); jsd is GKD's generalized
    JSD with m = b p + (1-b) q: b KL(p||m) + (1-b) KL(q||m), b = jsd_beta, symmetric at b = 0.5;
    tv is 0.5 * sum|p - q|; mse is the mean over the vocabulary of (z_s/T - z_t/T)^2.
    """
    _check_args(divergence, temperature)
    _check_shapes(student_logits, teacher_logits)
    return DIVERGENCES[divergence.name].fn(student_logits, teacher_logits, temperature, divergence)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    *,
    temperature: float,
    alpha: float,
    divergence: Divergence,
) -> KDLossOutput:
    """alpha * T^2 * mean(divergence) + (1 - alpha) * cross_entropy(student_logits, labels).

    labels are aligned with logits (logits[..., t, :] predicts labels[..., t]); positions labelled
    -100 are left out of both terms and of the means. teacher_logits may be None when alpha == 0.
    With no labelled position the loss is 0 and still backpropagates (zero gradients).
    """
    check_kd_args(divergence, temperature, alpha=alpha, has_teacher=teacher_logits is not None)
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
