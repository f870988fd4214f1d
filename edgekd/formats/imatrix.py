"""llama.cpp's imatrix file (the GGUF format its llama-imatrix writes and llama-quantize reads):
`<tensor>.in_sum2` (F32, the sums of squared activations) and `<tensor>.counts` (F32, tokens)
per weight, with `imatrix.datasets`, `imatrix.chunk_count` and `imatrix.chunk_size`."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from edgekd.atomic import atomic_path
from edgekd.errors import EdgekdError
from edgekd.quant.imatrix import Imatrix

DATASETS, CHUNK_COUNT, CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"
_SUMS, _COUNTS = ".in_sum2", ".counts"
# The file's name in a stage folder: qat_kd leaves it beside its model, export_gguf ships it.
FILE = "imatrix.gguf"


def beside(model_dir: Path) -> Path:
    """Where a training stage leaves the imatrix that goes with its `model/` folder."""
    return Path(model_dir).parent / FILE


def write(imatrix: Imatrix, path: Path) -> Path:
    """Write `imatrix` where llama.cpp's tools can read it (tensors in name order, as they do)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch="imatrix")
        # llama-imatrix writes no architecture, only this type.
        w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
        w.add_type("imatrix")
        w.add_array(DATASETS, imatrix.datasets)
        w.add_uint32(CHUNK_COUNT, imatrix.chunk_count)
        w.add_uint32(CHUNK_SIZE, imatrix.chunk_size)
        for name in sorted(imatrix.sums):
            sums = imatrix.sums[name].float().numpy().reshape(1, -1)
            w.add_tensor(name + _SUMS, sums)
            w.add_tensor(name + _COUNTS, np.full((1, 1), imatrix.counts[name], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def read(path: Path) -> Imatrix:
    """Read an imatrix GGUF file; one line naming the file when it is not one."""
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as e:
        raise EdgekdError(
            f"imatrix {path} is not a GGUF imatrix file ({e}); write one with llama-imatrix "
            "(a legacy .dat converts with `llama-imatrix --in-file old.dat -o new.gguf`) or let "
            "edgekd compute it"
        ) from None
    fields = reader.fields
    if CHUNK_COUNT not in fields or not any(t.name.endswith(_SUMS) for t in reader.tensors):
        raise EdgekdError(
            f"imatrix {path} has no {CHUNK_COUNT} or no {_SUMS} tensors: it is not an "
            "importance matrix; delete it to compute one from this model"
        )
    tensors = {t.name: t for t in reader.tensors}
    out = Imatrix(
        chunk_count=int(fields[CHUNK_COUNT].contents()),
        chunk_size=int(fields[CHUNK_SIZE].contents()) if CHUNK_SIZE in fields else 0,
        datasets=list(fields[DATASETS].contents()) if DATASETS in fields else [],
    )
    for name, t in tensors.items():
        if not name.endswith(_SUMS):
            continue
        base = name.removesuffix(_SUMS)
        counts = tensors.get(base + _COUNTS)
        if counts is None:
            raise EdgekdError(f"imatrix {path}: {base} has sums but no counts; compute it again")
        out.sums[base] = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1))
        out.counts[base] = int(round(float(np.asarray(counts.data).reshape(-1)[0])))
    return out
