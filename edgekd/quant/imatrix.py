"""The importance matrix as llama.cpp's imatrix tool defines it, and how llama-quantize reads it.

For every quantized linear layer of a transformer block (`blk.*`, named as in GGUF): the sum over
calibration tokens of each input column's squared activation, and the number of tokens. llama.cpp
leaves the output projection and the token embedding out (neither is a `blk.*` matrix product
over activations it collects by default), and so does edgekd. llama-quantize weighs each column by
sum / count. Pure functions: the file is `formats/imatrix.py`, the collection over a model
`calibration.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from edgekd.errors import EdgekdError


@dataclass
class Imatrix:
    """Sums of squared activations per input column and token counts, by GGUF tensor name."""

    sums: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    chunk_count: int = 0
    chunk_size: int = 0
    datasets: list[str] = field(default_factory=list)


def accumulate(imatrix: Imatrix, name: str, x: Tensor) -> None:
    """Add the activations x [..., columns] of one call of `name` (every row a token)."""
    rows = x.detach().reshape(-1, x.shape[-1]).double()
    square = (rows * rows).sum(0)
    if name in imatrix.sums:
        imatrix.sums[name] += square
    else:
        imatrix.sums[name] = square
    imatrix.counts[name] = imatrix.counts.get(name, 0) + rows.shape[0]


def importance(imatrix: Imatrix, name: str) -> Tensor:
    """The per-column weights llama-quantize derives: float32 sum / count (1 where no tokens)."""
    sums = imatrix.sums[name].float()
    count = imatrix.counts[name]
    if count <= 0:
        return torch.ones_like(sums)
    return sums / torch.tensor(float(count), dtype=torch.float32)


def check(imatrix: Imatrix, widths: dict[str, int], source: str) -> None:
    """Refuse an imatrix that does not fit a model whose weighted tensors have these input widths.

    Every tensor must have an entry of its width with tokens behind it, and every entry must
    name one of its tensors: a silent unweighted tensor in a GGUF reported as weighted is what
    this prevents.
    """
    foreign = sorted(set(imatrix.sums) - set(widths))
    if foreign:
        raise EdgekdError(
            f"imatrix {source} has entries this model does not have ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}): it was made for another model; "
            "delete it to compute one from this model"
        )
    missing = sorted(set(widths) - set(imatrix.sums))
    if missing:
        raise EdgekdError(
            f"imatrix {source} has no entry for {len(missing)} of this model's tensors "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
            "compute it again from this model"
        )
    for name, width in widths.items():
        got = imatrix.sums[name].numel()
        if got != width:
            raise EdgekdError(
                f"imatrix {source}: {name} has {got} columns, the model's tensor {width}: it was "
                "made for another model; delete it to compute one from this model"
            )
        if imatrix.counts[name] <= 0:
            raise EdgekdError(
                f"imatrix {source}: {name} saw no calibration tokens; give the build more data "
                "(data.max_examples) or raise export_gguf.imatrix_chunks"
            )
