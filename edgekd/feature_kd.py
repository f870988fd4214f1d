"""Feature, attention and relation KD: losses on the models' insides, added to the logit KD loss.

Layers count from 1: layer i is the output of decoder block i, `hidden_states[i]` of a Hugging Face
model (0 is the embeddings) and `attentions[i - 1]`. Every loss is averaged over the positions
where attention_mask is 1, so padding never counts; the teacher side is always detached.

- feature: MSE (mean over features) or 1 - cosine per token between a student layer, mapped to the
  teacher's width by a learned bias-free linear projection when widths differ, and its teacher
  layer (FitNets, TinyBERT). The projections train with the student and are dropped afterwards.
- attention: KL(teacher || student) of each query's attention distribution (TinyBERT matches the
  same maps; MiniLM uses this KL). When head counts differ, both sides' heads are averaged in
  consecutive groups down to gcd(student heads, teacher heads) maps: a mean of distributions is a
  distribution, and with equal counts (a pruned teacher) it is head-to-head.
- value relation: MiniLM's softmax(V V^T / sqrt(d)) per relation head, KL(teacher || student). The
  value vectors of all heads are concatenated and split into gcd(student kv heads, teacher kv heads)
  relation heads (MiniLM-v2), so different head counts and widths need no projection. Keys are
  masked causally and at padding, as the model's own attention sees them.
- relation: the N x N cosine similarities of the batch's masked-mean-pooled last hidden states,
  student against teacher, MSE over the off-diagonal entries (the diagonal is always 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgekd.config import TrainSettings
from edgekd.losses import LOG_FLOOR

_TINY = torch.finfo(torch.float32).tiny


def layer_pairs(
    n_student: int, n_teacher: int, layers: str | dict[int, int], last_k: int
) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs, 1-based, sorted by student layer.

    'uniform': student layer i to teacher layer max(1, i * n_teacher // n_student), so the last
    layers always meet; 'last_k': the last k layers of each, in order; a dict: as given."""
    if layers == "uniform":
        return [(i, max(1, i * n_teacher // n_student)) for i in range(1, n_student + 1)]
    if layers == "last_k":
        if last_k > min(n_student, n_teacher):
            raise ValueError(
                f"last_k={last_k} exceeds the layers of the student ({n_student}) or the "
                f"teacher ({n_teacher})"
            )
        return [(n_student - last_k + j, n_teacher - last_k + j) for j in range(1, last_k + 1)]
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"layers={layers!r}: use 'uniform', 'last_k' or a non-empty map")
    for s, t in layers.items():
        if not (1 <= s <= n_student and 1 <= t <= n_teacher):
            raise ValueError(
                f"layers map {s}: {t} is out of range; student layers are 1..{n_student}, "
                f"teacher layers 1..{n_teacher}"
            )
    return sorted(layers.items())


class Projections(nn.Module):
    """One bias-free linear map from the student's width to the teacher's per mapped layer;
    the identity when the widths are equal (then it has no parameters)."""

    def __init__(self, n_pairs: int, d_student: int, d_teacher: int):
        super().__init__()
        self.maps = nn.ModuleList(
            nn.Linear(d_student, d_teacher, bias=False) if d_student != d_teacher else nn.Identity()
            for _ in range(n_pairs)
        )

    def forward(self, states: Sequence[Tensor]) -> list[Tensor]:
        return [m(h) for m, h in zip(self.maps, states, strict=True)]


def _masked_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    """Mean of [..., B, L] values over the positions where mask [B, L] is true."""
    mask = mask.bool().expand_as(per_token)
    return per_token[mask].sum() / mask.sum().clamp(min=1)


def feature_loss(
    student: Sequence[Tensor], teacher: Sequence[Tensor], mask: Tensor, kind: str
) -> Tensor:
    """Mean over layer pairs of the per-token 'mse' (mean over features) or 'cosine' (1 - cos)
    between [B, L, D] states of equal width (project the student's first)."""
    losses = []
    for s, t in zip(student, teacher, strict=True):
        s, t = s.float(), t.detach().float()
        if kind == "mse":
            per_token = (s - t).square().mean(-1)
        elif kind == "cosine":
            per_token = 1 - F.cosine_similarity(s, t, dim=-1)
        else:
            raise ValueError(f"feature loss {kind!r} is unknown; use 'mse' or 'cosine'")
        losses.append(_masked_mean(per_token, mask))
    return torch.stack(losses).mean()


def group_heads(attn: Tensor, groups: int) -> Tensor:
    """Average [B, H, L, L] attention maps over consecutive heads into [B, groups, L, L]."""
    b, h, lq, lk = attn.shape
    return attn.reshape(b, groups, h // groups, lq, lk).mean(2)


def _row_kl(log_p: Tensor, log_q: Tensor, mask: Tensor) -> Tensor:
    """KL(p || q) over the last dim of [B, G, L, L] log-probs, averaged over real query rows."""
    log_p, log_q = log_p.clamp(min=LOG_FLOOR), log_q.clamp(min=LOG_FLOOR)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [B, G, L]
    return _masked_mean(kl, mask[:, None, :])


def attention_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], mask: Tensor) -> Tensor:
    """Mean over layer pairs of KL(teacher || student) per query over [B, H, L, L] attention
    probabilities, heads averaged into gcd(H_student, H_teacher) groups."""
    losses = []
    for s, t in zip(student, teacher, strict=True):
        g = math.gcd(s.shape[1], t.shape[1])
        # The eager softmax puts exactly 0 on masked keys. Flooring before the log keeps its
        # gradient finite there (clamping -inf after it would give 0 * inf = NaN).
        log_q = group_heads(s.float(), g).clamp(min=_TINY).log()
        log_p = group_heads(t.detach().float(), g).clamp(min=_TINY).log()
        losses.append(_row_kl(log_p, log_q, mask))
    return torch.stack(losses).mean()


def value_relation(values: Tensor, heads: int, mask: Tensor) -> Tensor:
    """MiniLM's value relation log softmax(V_r V_r^T / sqrt(d_r)) per relation head, [B, R, L, L],
    from [B, L, D] concatenated value vectors; keys masked causally and at padding."""
    b, length, d = values.shape
    v = values.float().reshape(b, length, heads, d // heads).transpose(1, 2)
    scores = v @ v.transpose(-1, -2) / math.sqrt(d // heads)
    causal = torch.ones(length, length, dtype=torch.bool, device=values.device).tril()
    allowed = causal & mask.bool()[:, None, None, :]
    return scores.masked_fill(~allowed, LOG_FLOOR).log_softmax(-1)


def value_relation_loss(
    student: Sequence[Tensor], teacher: Sequence[Tensor], mask: Tensor, relation_heads: int
) -> Tensor:
    """Mean over layer pairs of KL(teacher || student) of the value relations."""
    losses = [
        _row_kl(
            value_relation(t.detach(), relation_heads, mask),
            value_relation(s, relation_heads, mask),
            mask,
        )
        for s, t in zip(student, teacher, strict=True)
    ]
    return torch.stack(losses).mean()


def pooled(hidden: Tensor, mask: Tensor) -> Tensor:
    """Masked mean over positions of [B, L, D] states: [B, D]."""
    m = mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def relation_loss(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """MSE between the off-diagonal entries of the student's and the teacher's N x N cosine
    similarity matrices of pooled [N, L, D] states (0 for a batch of one)."""
    s = F.normalize(pooled(student.float(), mask), dim=-1)
    t = F.normalize(pooled(teacher.detach().float(), mask), dim=-1)
    off = ~torch.eye(len(s), dtype=torch.bool, device=s.device)
    diff = (s @ s.T - t @ t.T)[off]
    return diff.square().mean() if len(diff) else s.sum() * 0


def _kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


class MethodLosses(nn.Module):
    """The feature, attention and relation terms of one training run, and the projections they
    train (pass `parameters()` to the optimizer; they are not part of the saved student).

    Use: `attach(student, teacher)` once, call both models with `**model_kwargs`, then this
    module on their outputs (see forward); `detach()` at the end. It is a module
    called through forward so that accelerate can wrap it (DDP) when it has projections."""

    def __init__(self, settings: TrainSettings, student_config, teacher_config):
        super().__init__()
        self.settings = settings
        n_s, n_t = student_config.num_hidden_layers, teacher_config.num_hidden_layers
        f, a = settings.feature, settings.attention
        self.feature_pairs = layer_pairs(n_s, n_t, f.layers, f.last_k) if f.weight else []
        self.projections = Projections(
            len(self.feature_pairs), student_config.hidden_size, teacher_config.hidden_size
        )
        on = a.weight or a.value_weight
        self.attention_pairs = layer_pairs(n_s, n_t, a.layers, a.last_k) if on else []
        self.relation_heads = math.gcd(_kv_heads(student_config), _kv_heads(teacher_config))
        self._values: dict[str, dict[int, Tensor]] = {"student": {}, "teacher": {}}
        self._hooks: list = []
        self._attn_impl: list[tuple[nn.Module, str]] = []

    @property
    def active(self) -> bool:
        return bool(self.feature_pairs or self.attention_pairs or self.settings.relation.weight)

    @property
    def model_kwargs(self) -> dict:
        """What both models must return: hidden states and attention maps only when used."""
        return {
            "output_hidden_states": bool(self.feature_pairs or self.settings.relation.weight),
            "output_attentions": bool(self.settings.attention.weight),
        }

    def attach(self, student: nn.Module, teacher: nn.Module) -> None:
        """Hook the mapped layers' value projections and, for attention maps, switch both models
        to eager attention (the only implementation that returns them)."""
        if self.settings.attention.value_weight:
            for role, model, col in (("student", student, 0), ("teacher", teacher, 1)):
                for pair in self.attention_pairs:
                    self._hook_values(role, model, pair[col])
        if self.settings.attention.weight:
            for model in (student, teacher):
                self._attn_impl.append((model, model.config._attn_implementation))
                model.set_attn_implementation("eager")

    def _hook_values(self, role: str, model: nn.Module, layer: int) -> None:
        suffix = f"layers.{layer - 1}.self_attn.v_proj"
        module = next(m for name, m in model.named_modules() if name.endswith(suffix))
        store = self._values[role]

        def keep(_module, _inputs, output):
            store[layer] = output

        self._hooks.append(module.register_forward_hook(keep))

    def detach(self) -> None:
        """Remove the hooks and restore each model's attention implementation."""
        for handle in self._hooks:
            handle.remove()
        for model, impl in self._attn_impl:
            model.set_attn_implementation(impl)
        self._hooks, self._attn_impl = [], []

    def forward(
        self,
        student_hidden: tuple[Tensor, ...] | None,
        teacher_hidden: tuple[Tensor, ...] | None,
        student_attn: tuple[Tensor, ...] | None,
        teacher_attn: tuple[Tensor, ...] | None,
        mask: Tensor,
    ) -> tuple[Tensor, dict[str, float]]:
        """The weighted sum of the enabled terms, and each term's unweighted value, from the
        models' `hidden_states` and `attentions` (plain tuples, which DDP can take as inputs)."""
        s = self.settings
        terms: dict[str, tuple[float, Tensor]] = {}
        if self.feature_pairs:
            hs = self.projections([student_hidden[i] for i, _ in self.feature_pairs])
            ht = [teacher_hidden[j] for _, j in self.feature_pairs]
            terms["feature"] = (s.feature.weight, feature_loss(hs, ht, mask, s.feature.loss))
        if s.attention.weight:
            a_s = [student_attn[i - 1] for i, _ in self.attention_pairs]
            a_t = [teacher_attn[j - 1] for _, j in self.attention_pairs]
            terms["attention"] = (s.attention.weight, attention_loss(a_s, a_t, mask))
        if s.attention.value_weight:
            v_s = [self._values["student"][i] for i, _ in self.attention_pairs]
            v_t = [self._values["teacher"][j] for _, j in self.attention_pairs]
            value = value_relation_loss(v_s, v_t, mask, self.relation_heads)
            terms["value"] = (s.attention.value_weight, value)
        if s.relation.weight:
            rel = relation_loss(student_hidden[-1], teacher_hidden[-1], mask)
            terms["relation"] = (s.relation.weight, rel)
        total = sum(w * v for w, v in terms.values())
        return total, {k: float(v.detach()) for k, (_, v) in terms.items()}
