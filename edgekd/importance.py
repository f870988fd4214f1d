"""How much each attention head, MLP neuron and embedding channel of a model matters, measured from
its activations on calibration batches as Minitron does (Muralidharan et al., "Compact Language
Models via Pruning and Knowledge Distillation", 2024).

- a head: the L2 norm of its output (the input of o_proj, one head_dim slice per head);
- a neuron: the magnitude of the MLP's intermediate activation (the input of down_proj);
- an embedding channel: the magnitude of every decoder layer's normalized hidden state (the
  outputs of its two RMSNorms), summed over layers.

Each activation [batch, seq, units] is aggregated over the batch by its L2 norm, then over the
sequence by the mean: the pair the paper found best for width pruning. `aggregate` is the pure
function; `measure` runs the model with hooks and applies it. Layers are ranked elsewhere, by the
block-drop kld in models.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Importance:
    """Scores per decoder layer (heads [n_heads], neurons [intermediate]) and per channel."""

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    channels: torch.Tensor


def aggregate(act: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, seq, units] -> [units]: L2 norm over the batch, then the mean over the positions
    that hold a token in any sequence (`mask` [batch, seq], 1 where a token is)."""
    act = act.float()
    if mask is not None:
        act = act * mask[..., None].to(act.dtype)
    per_position = act.pow(2).sum(0).sqrt()  # [seq, units]
    if mask is None:
        return per_position.mean(0)
    present = mask.bool().any(0)
    return per_position[present].sum(0) / present.sum().clamp(min=1)


def top(scores: torch.Tensor, k: int) -> list[int]:
    """The indices of the `k` largest scores, in increasing index order (ties: lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


@torch.no_grad()
def measure(model, batches: list[dict]) -> Importance:
    """Run `model` over `batches` (input_ids, optional attention_mask) and score its units."""
    layers = model.model.layers
    config = model.config
    n_heads = config.num_attention_heads
    heads = [torch.zeros(n_heads) for _ in layers]
    neurons = [torch.zeros(layer.mlp.down_proj.in_features) for layer in layers]
    channels = torch.zeros(config.hidden_size)
    mask: list[torch.Tensor | None] = [None]

    def on_heads(i):
        def hook(_module, args):
            x = args[0]
            per_head = x.view(*x.shape[:-1], n_heads, -1).float().norm(dim=-1)
            heads[i] += aggregate(per_head, mask[0])

        return hook

    def on_neurons(i):
        def hook(_module, args):
            neurons[i] += aggregate(args[0].abs(), mask[0])

        return hook

    def on_norm(_module, _args, out):
        nonlocal channels
        channels += aggregate(out.abs(), mask[0])

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_heads(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_neurons(i)))
        handles.append(layer.input_layernorm.register_forward_hook(on_norm))
        handles.append(layer.post_attention_layernorm.register_forward_hook(on_norm))
    try:
        for batch in batches:
            m = batch.get("attention_mask")
            mask[0] = None if m is None else m.to(model.device)
            model(
                input_ids=batch["input_ids"].to(model.device),
                attention_mask=mask[0],
                use_cache=False,
            )
    finally:
        for h in handles:
            h.remove()
    return Importance(heads=heads, neurons=neurons, channels=channels)
