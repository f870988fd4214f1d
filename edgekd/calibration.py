"""A model's importance matrix on calibration text: hooks over the inputs of its transformer
blocks' linear layers, accumulated as llama.cpp's imatrix tool does (quant.imatrix)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from edgekd import models
from edgekd.errors import EdgekdError
from edgekd.quant import ggml_types
from edgekd.quant.imatrix import Imatrix, accumulate

if TYPE_CHECKING:
    from edgekd.context import Context


def weighted_tensors(config) -> dict[str, int]:
    """GGUF name -> input width of every weight an imatrix covers: the `blk.*` matrices that
    Q4_K_M quantizes (the output projection and the embedding are left out, as llama.cpp does)."""
    shapes = models.gguf_tensor_shapes(config).items()
    return {name: s[0] for name, s in shapes if name.startswith("blk.") and len(s) == 2}


def collect(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    chunks: int,
    chunk_size: int,
    dataset: str,
) -> Imatrix:
    """The imatrix of `model` over up to chunks * chunk_size tokens of `sequences`, run one
    sequence at a time (a chat example is never attended across). Refuses less than one chunk."""
    total = sum(len(s) for s in sequences)
    if total < chunk_size:
        raise EdgekdError(
            f"the imatrix needs at least one chunk of {chunk_size} tokens but the training split "
            f"has {total}; give the build more data or lower export_gguf.imatrix_chunk_size"
        )
    widths = weighted_tensors(model.config)
    modules = dict(model.named_modules())
    imatrix = Imatrix(chunk_size=chunk_size, datasets=[dataset])
    hooks = []
    for name in widths:
        module = modules[ggml_types.hf_name(name).removesuffix(".weight")]

        def hook(_module, args, name=name):
            accumulate(imatrix, name, args[0])

        hooks.append(module.register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    # The blocks only: the output projection is not collected, and its logits over the whole
    # vocabulary would cost as much as the rest of the model.
    decoder = model.get_decoder()
    budget = chunks * chunk_size
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with torch.no_grad():
            for seq in sequences:
                ids = list(seq[: budget - seen])
                if not ids:
                    break
                decoder(input_ids=torch.tensor([ids], device=device))
                seen += len(ids)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    imatrix.chunk_count = seen // chunk_size
    return imatrix


def of_build(ctx: Context, model: nn.Module) -> Imatrix:
    """The imatrix of `model` on the build's training split (never the held-out slice), sized by
    the export_gguf settings."""
    s = ctx.recipe.export_gguf
    source = ctx.recipe.data.source or "edgekd's shipped prompts answered by the teacher"
    sequences = [ex.input_ids for ex in ctx.train_examples]
    return collect(
        model, sequences, s.imatrix_chunks, s.imatrix_chunk_size, f"{source} (training split)"
    )
