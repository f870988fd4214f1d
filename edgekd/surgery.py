"""Slicing a Llama-family transformers model to a smaller shape of the same architecture.

A `Shape` is what the student keeps: decoder layers, hidden size (embedding channels), MLP
intermediate size and query heads (evenly per key/value group, so grouped-query attention stays
consistent; every key/value head and head_dim are kept). `reshaped_config` is the config of that
shape, for sizing from a config alone; `slice_model` cuts the weights given which units to keep.
The result is an ordinary model of the teacher's class: `save_pretrained` writes a folder
transformers loads without custom code.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers.modeling_utils import no_init_weights

from edgekd.errors import EdgekdError


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int  # query heads, a multiple of the key/value heads

    def describe(self) -> str:
        return (
            f"{self.layers} layers, hidden {self.hidden}, intermediate {self.intermediate}, "
            f"{self.heads} heads"
        )


@dataclass
class Keep:
    """Teacher indices of what the student keeps: the decoder layers, the hidden channels and,
    per kept layer, the MLP neurons and the query heads (grouped by key/value head, in order)."""

    layers: list[int]
    channels: list[int]
    neurons: list[list[int]]
    heads: list[list[int]]


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def shape_of(config) -> Shape:
    return Shape(
        config.num_hidden_layers,
        config.hidden_size,
        config.intermediate_size,
        config.num_attention_heads,
    )


def reshaped_config(config, shape: Shape):
    """A copy of `config` at `shape`: head_dim stays the teacher's, written out since the hidden
    size no longer implies it."""
    out = copy.deepcopy(config)
    dim = head_dim(config)
    out.num_hidden_layers = shape.layers
    if getattr(out, "layer_types", None) is not None:
        out.layer_types = list(out.layer_types[: shape.layers])
    out.hidden_size = shape.hidden
    out.intermediate_size = shape.intermediate
    out.num_attention_heads = shape.heads
    out.num_key_value_heads = kv_heads(config)
    out.head_dim = dim
    return out


def _rows(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return w.index_select(0, idx).clone()


def _cols(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return w.index_select(1, idx).clone()


def _head_rows(heads: list[int], dim: int) -> torch.Tensor:
    return torch.tensor([h * dim + d for h in heads for d in range(dim)])


def slice_model(model, keep: Keep):
    """A new model of `model`'s class holding only the units in `keep` (weights copied)."""
    config = model.config
    dim, n_kv = head_dim(config), kv_heads(config)
    per_group = config.num_attention_heads // n_kv
    new_heads = {len(h) for h in keep.heads}
    new_inter = {len(n) for n in keep.neurons}
    if len(new_heads) != 1 or len(new_inter) != 1 or len(keep.heads) != len(keep.layers):
        raise EdgekdError("every kept layer must keep the same number of heads and neurons")
    heads = new_heads.pop()
    if heads % n_kv:
        raise EdgekdError(f"{heads} query heads do not divide evenly over {n_kv} key/value heads")
    for kept in keep.heads:
        groups = [h // per_group for h in kept]
        if groups != sorted(groups) or any(groups.count(g) != heads // n_kv for g in set(groups)):
            raise EdgekdError(f"query heads {kept} are not kept evenly per key/value group")
    shape = Shape(len(keep.layers), len(keep.channels), new_inter.pop(), heads)
    new_config = reshaped_config(config, shape)
    if getattr(config, "layer_types", None) is not None:
        new_config.layer_types = [config.layer_types[i] for i in keep.layers]
    ch = torch.tensor(keep.channels)
    old = model.state_dict()
    new = {}
    new["model.embed_tokens.weight"] = _cols(old["model.embed_tokens.weight"], ch)
    new["model.norm.weight"] = _rows(old["model.norm.weight"], ch)
    if "lm_head.weight" in old:
        new["lm_head.weight"] = _cols(old["lm_head.weight"], ch)
    for j, i in enumerate(keep.layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{j}."
        q = _head_rows(keep.heads[j], dim)
        neurons = torch.tensor(keep.neurons[j])
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            new[dst + name] = _rows(old[src + name], ch)
        for proj, rows in (("q_proj", q), ("k_proj", None), ("v_proj", None)):
            w = _cols(old[f"{src}self_attn.{proj}.weight"], ch)
            new[f"{dst}self_attn.{proj}.weight"] = w if rows is None else _rows(w, rows)
            if (bias := old.get(f"{src}self_attn.{proj}.bias")) is not None:
                new[f"{dst}self_attn.{proj}.bias"] = bias.clone() if rows is None else bias[rows]
        o = old[f"{src}self_attn.o_proj.weight"]
        new[f"{dst}self_attn.o_proj.weight"] = _cols(_rows(o, ch), q)
        if (bias := old.get(f"{src}self_attn.o_proj.bias")) is not None:
            new[f"{dst}self_attn.o_proj.bias"] = bias[ch]
        for proj in ("gate_proj", "up_proj"):
            w = old[f"{src}mlp.{proj}.weight"]
            new[f"{dst}mlp.{proj}.weight"] = _rows(_cols(w, ch), neurons)
            if (bias := old.get(f"{src}mlp.{proj}.bias")) is not None:
                new[f"{dst}mlp.{proj}.bias"] = bias[neurons]
        down = old[f"{src}mlp.down_proj.weight"]
        new[f"{dst}mlp.down_proj.weight"] = _cols(_rows(down, ch), neurons)
        if (bias := old.get(f"{src}mlp.down_proj.bias")) is not None:
            new[f"{dst}mlp.down_proj.bias"] = bias[ch]
    dtype = next(model.parameters()).dtype
    with no_init_weights():
        pruned = type(model)(new_config).to(dtype)
    missing, unexpected = pruned.load_state_dict(new, strict=False)
    # Tied output heads share the embedding's tensor and have no key of their own.
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise EdgekdError(f"slicing left weights out of place: {missing or unexpected}")
    if config.tie_word_embeddings:
        pruned.tie_weights()
    return pruned.eval()
