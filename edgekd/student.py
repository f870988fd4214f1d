"""The student pruned from the teacher: its shape, chosen from configs alone, and the model built
to that shape.

Read by the planner (to size and fit-check the student, and for `--dry-run`) and by distill (to
prune the teacher), so that both choose the same shape for the same build. The size target is the
smaller of the `layer_fraction` depth student's parameter count (or `student.target_params`) and
the largest student whose GGUF weights at the exported type plus its KV cache at the profile's
context fit the profile's budget less `student.budget_margin`. Each method reaches that target its
own way: `depth` drops layers (the least useful contiguous block, by block-drop kld); `width`
keeps every layer and narrows the hidden size, the MLP and (last) the query heads by measured
importance (importance.py, Minitron); `depth_width` does both. Each takes the shape whose most
pruned axis is pruned least. `auto` builds one candidate per method, heals each briefly and keeps
the lowest held-out kld.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgekd import importance, models, surgery
from edgekd.config import Profile, Recipe
from edgekd.errors import EdgekdError
from edgekd.quant import ggml_types
from edgekd.surgery import Shape

MB = 1024 * 1024
METHODS = ("depth", "width", "depth_width")


@dataclass(frozen=True)
class Candidate:
    method: str
    shape: Shape
    config: object
    params: int
    gguf_bytes: int
    kv_bytes: int
    note: str
    quant: str

    def row(self) -> dict:
        """What the distill report records of it (sizes are estimates from the config)."""
        return {
            "method": self.method,
            "shape": self.shape.__dict__,
            "params": self.params,
            "gguf_bytes_estimate": self.gguf_bytes,
            "kv_bytes": self.kv_bytes,
            "row_fallbacks": row_fallbacks(self.config, self.quant),
        }


def quantum(width: int, quant: str) -> int:
    """What a width is rounded to: 256 where the teacher's rows of that width take the file
    type's K-quant blocks (a narrower multiple would force llama.cpp's fallback type), else 32,
    the smallest block of any quantized type."""
    block = ggml_types.block(ggml_types.FILE_TYPES[quant])[0]
    return 256 if block == 256 and width % 256 == 0 else 32


def _budget(profile: Profile, recipe: Recipe) -> int:
    return int(profile.memory_budget_mb * MB * (1 - recipe.student.budget_margin))


def _check_given(teacher_config, recipe: Recipe) -> None:
    """The widths a user gave, against the teacher's and the architecture's constraints."""
    s = recipe.student
    kv = surgery.kv_heads(teacher_config)
    for key, value, teacher in (
        ("hidden_size", s.hidden_size, teacher_config.hidden_size),
        ("intermediate_size", s.intermediate_size, teacher_config.intermediate_size),
        ("num_attention_heads", s.num_attention_heads, teacher_config.num_attention_heads),
    ):
        if value is not None and value > teacher:
            raise EdgekdError(
                f"student.{key}={value} exceeds the teacher's {teacher}; set at most {teacher}"
            )
    for key, value in (("hidden_size", s.hidden_size), ("intermediate_size", s.intermediate_size)):
        if value is not None and value % 32:
            raise EdgekdError(
                f"student.{key}={value} is not a multiple of 32, the smallest quantization block "
                f"of a GGUF row; use {max(32, value // 32 * 32)}"
            )
    if s.num_attention_heads is not None and s.num_attention_heads % kv:
        raise EdgekdError(
            f"student.num_attention_heads={s.num_attention_heads} does not divide over the "
            f"teacher's {kv} key/value heads (grouped-query attention keeps each group whole); "
            f"use a multiple of {kv}, at least {kv}"
        )
    if s.num_layers is not None and s.num_layers > teacher_config.num_hidden_layers:
        raise EdgekdError(
            f"student.num_layers={s.num_layers} exceeds the teacher's "
            f"{teacher_config.num_hidden_layers} layers; set a smaller value"
        )


def _candidate(teacher_config, method: str, shape: Shape, quant: str, profile, note) -> Candidate:
    config = surgery.reshaped_config(teacher_config, shape)
    return Candidate(
        method=method,
        shape=shape,
        config=config,
        params=models.param_count(config),
        gguf_bytes=models.gguf_bytes_estimate(config, quant),
        kv_bytes=models.kv_cache_bytes(config, profile.context_length),
        note=note,
        quant=quant,
    )


def target_params(teacher_config, recipe: Recipe) -> tuple[int, str]:
    """The most parameters a student may have, and the setting it comes from."""
    s = recipe.student
    if s.target_params is not None:
        return s.target_params, f"student.target_params={s.target_params}"
    n = s.num_layers or max(1, round(s.layer_fraction * teacher_config.num_hidden_layers))
    cap = models.param_count(models.with_layers(teacher_config, n))
    if s.num_layers:
        return cap, f"student.num_layers={n}"
    return cap, f"student.layer_fraction={s.layer_fraction:.2f}"


def _options(teacher_config, recipe: Recipe, method: str, quant: str):
    """What each axis may take for `method`, largest first; a width the user gave is fixed."""
    s, t = recipe.student, surgery.shape_of(teacher_config)
    deep = method in ("depth", "depth_width")
    wide = method in ("width", "depth_width")

    def widths(full: int, given: int | None) -> list[int]:
        if given is not None:
            return [given]
        if not wide:
            return [full]
        q = quantum(full, quant)
        return sorted({full, *range(q, full, q)}, reverse=True)

    layers = (
        [s.num_layers] if s.num_layers else list(range(t.layers, 0, -1)) if deep else [t.layers]
    )
    return layers, widths(t.hidden, s.hidden_size), widths(t.intermediate, s.intermediate_size)


def _heads(teacher_config, recipe: Recipe, method: str, hidden: int) -> int:
    """Query heads for a hidden size: they shrink with it, rounded up (Minitron found heads the
    costliest width axis), evenly per key/value group."""
    t, kv = surgery.shape_of(teacher_config), surgery.kv_heads(teacher_config)
    if recipe.student.num_attention_heads is not None:
        return recipe.student.num_attention_heads
    if method == "depth":
        return t.heads
    return kv * max(1, math.ceil(t.heads // kv * hidden / t.hidden))


def shape_for(
    teacher_config, recipe: Recipe, profile: Profile, quant: str, method: str
) -> Candidate:
    """The `method` student within the parameter target and the profile's budget whose most
    pruned axis (layers, hidden, intermediate, as shares of the teacher's) is pruned least;
    among equals, the largest."""
    _check_given(teacher_config, recipe)
    target, why = target_params(teacher_config, recipe)
    budget = _budget(profile, recipe)
    t = surgery.shape_of(teacher_config)
    layer_opts, hidden_opts, inter_opts = _options(teacher_config, recipe, method, quant)

    def make(n, h, i) -> Candidate:
        shape = Shape(n, h, i, _heads(teacher_config, recipe, method, h))
        return _candidate(teacher_config, method, shape, quant, profile, "")

    over_budget = []  # shapes within the target that the budget refused

    def ok(c: Candidate) -> bool:
        if c.params <= target and c.gguf_bytes + c.kv_bytes > budget:
            over_budget.append(c)
        return c.params <= target and c.gguf_bytes + c.kv_bytes <= budget

    if method == "depth" and recipe.student.num_layers is not None:
        c = make(recipe.student.num_layers, t.hidden, t.intermediate)
        return _candidate(teacher_config, method, c.shape, quant, profile, f"depth: {why}")
    best, best_key = None, None
    deep, wide = method != "width", method != "depth"
    for n in layer_opts:
        for h in hidden_opts:
            # The largest intermediate size that meets both limits (both grow with it).
            lo, hi, found = 0, len(inter_opts) - 1, None
            while lo <= hi:
                mid = (lo + hi) // 2
                c = make(n, h, inter_opts[mid])
                if ok(c):
                    found, hi = c, mid - 1
                else:
                    lo = mid + 1
            if found is None:
                continue
            shares = [n / t.layers] * deep + [
                h / t.hidden,
                found.shape.intermediate / t.intermediate,
            ] * wide
            key = (min(shares), found.params)
            if best_key is None or key > best_key:
                best, best_key = found, key
            if not wide:
                break
        if best is not None and not wide:
            break
    if best is not None:
        margin = recipe.student.budget_margin
        note = f"{method}: at most {target / 1e6:.1f}M params ({why})"
        if any(c.params > best.params for c in over_budget):
            note = f"{method}: largest that fits {profile.name}'s budget less {margin:.0%}"
        return _candidate(teacher_config, method, best.shape, quant, profile, note)
    smallest = make(layer_opts[-1], hidden_opts[-1], inter_opts[-1])
    if smallest.params > target:
        raise EdgekdError(
            f"{why}: no {method} student of this teacher is that small; the "
            f"smallest is {smallest.shape.describe()} ({smallest.params / 1e6:.1f}M params): "
            f"set student.target_params to at least {smallest.params} or try another "
            "student.prune"
        )
    need = (smallest.gguf_bytes + smallest.kv_bytes) / MB / (1 - recipe.student.budget_margin)
    narrower = "" if method == "depth_width" else "set student.prune=depth_width (it narrows too), "
    raise EdgekdError(
        f"no {method} student of this teacher fits {profile.name}'s memory_budget_mb="
        f"{profile.memory_budget_mb} (less student.budget_margin={recipe.student.budget_margin}): "
        f"the smallest, {smallest.shape.describe()}, needs memory_budget_mb of at least "
        f"{math.ceil(need)} at {quant}; {narrower}pick a larger profile or a smaller teacher"
    )


def candidates(teacher_config, recipe: Recipe, profile: Profile, quant: str) -> list[Candidate]:
    """The shapes distill builds: one per method for `auto` (those that can meet the target),
    else the one asked for."""
    prune = recipe.student.prune
    if prune != "auto":
        return [shape_for(teacher_config, recipe, profile, quant, prune)]
    found, last = [], None
    for method in METHODS:
        try:
            found.append(shape_for(teacher_config, recipe, profile, quant, method))
        except EdgekdError as e:
            last = e
    if not found:
        raise last
    return found


def layer_count(teacher_config, recipe: Recipe, profile: Profile, quant: str) -> tuple[int, str]:
    """How many teacher layers a depth-pruned student keeps, and why."""
    c = shape_for(teacher_config, recipe, profile, quant, "depth")
    return c.shape.layers, c.note


def row_fallbacks(config, quant: str) -> dict[str, str]:
    """Weights whose rows are not a multiple of the file type's block, by GGUF kind (attn_q,
    ffn_down...), and the type llama.cpp writes them as instead."""
    default = ggml_types.FILE_TYPES[quant]
    per_block = ggml_types.block(default)[0]
    types = models.gguf_tensor_types(config, quant)
    out = {}
    for name, shape in models.tensor_shapes(config).items():
        if len(shape) == 2 and shape[0] % per_block:
            out[name.split(".")[-2]] = types[name]
    return out


# ---------------------------------------------------------------------------------------------
# Building the chosen shape from the teacher's weights.


def _block_drop_keep(teacher, batches: list[dict], n_keep: int) -> tuple[list[int], dict]:
    """Keep the layers whose contiguous complement changes the teacher's output least (kld)."""
    total = teacher.config.num_hidden_layers
    n_drop = total - n_keep
    if n_drop == 0:
        return list(range(total)), {"teacher_layers": total, "kept_layers": list(range(total))}
    scores = models.block_drop_scores(teacher, batches, n_drop)
    start, kld = min(scores, key=lambda s: s[1])
    keep = [i for i in range(total) if not start <= i < start + n_drop]
    report = {
        "teacher_layers": total,
        "kept_layers": keep,
        "dropped_block": [start, start + n_drop - 1] if n_drop else None,
        "dropped_block_kld": kld,
        "layer_candidates": [{"first": s, "last": s + n_drop - 1, "kld": k} for s, k in scores],
    }
    return keep, report


def _keep_units(teacher, batches: list[dict], layers: list[int], shape: Shape) -> surgery.Keep:
    """The most important channels, neurons and heads (per key/value group) of the kept layers."""
    with models.only_layers(teacher, layers):
        scores = importance.measure(teacher, batches)
    per_group = teacher.config.num_attention_heads // surgery.kv_heads(teacher.config)
    new_per_group = shape.heads // surgery.kv_heads(teacher.config)
    heads = []
    for layer_scores in scores.heads:
        kept = []
        for g in range(surgery.kv_heads(teacher.config)):
            group = layer_scores[g * per_group : (g + 1) * per_group]
            kept += [g * per_group + h for h in importance.top(group, new_per_group)]
        heads.append(kept)
    return surgery.Keep(
        layers=layers,
        channels=importance.top(scores.channels, shape.hidden),
        neurons=[importance.top(n, shape.intermediate) for n in scores.neurons],
        heads=heads,
    )


def build(teacher, batches: list[dict], candidate: Candidate) -> tuple[torch.nn.Module, dict]:
    """The student of `candidate`'s shape cut from `teacher`, and how its units were chosen."""
    shape = candidate.shape
    keep, report = _block_drop_keep(teacher, batches, shape.layers)
    if (shape.hidden, shape.intermediate, shape.heads) == (
        teacher.config.hidden_size,
        teacher.config.intermediate_size,
        teacher.config.num_attention_heads,
    ):
        return models.prune_layers(teacher, keep), report
    units = _keep_units(teacher, batches, keep, shape)
    return surgery.slice_model(teacher, units), report


def _teacher_targets(batches: list[dict], teacher) -> list[torch.Tensor]:
    with torch.no_grad():
        return [models.target_logprobs(teacher, b) for b in batches]


def heal(student, teacher, batches: list[dict], steps: int, lr: float) -> None:
    """A few steps of KL(teacher || student) at temperature 1 on `batches`, in place: enough to
    rank candidates by how well they recover, not to finish training."""
    targets = _teacher_targets(batches, teacher)
    student.requires_grad_(True)  # a copy of the frozen teacher's layers starts frozen
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr)
    for step in range(steps):
        i = step % len(batches)
        loss = F.kl_div(
            models.target_logprobs(student, batches[i]),
            targets[i],
            reduction="batchmean",
            log_target=True,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    student.eval()
