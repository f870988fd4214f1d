"""A GGUF quantized with an importance matrix by edgekd itself (llama-cpp-python's quantize call
takes no imatrix): llama.cpp's own file for the same type, each imatrix-covered Q4_K / Q6_K /
Q5_0 tensor replaced by edgekd's weighted search of the F16 values (quant.gguf_k, bit-exact with
llama.cpp's weighted path), and llama-quantize's metadata keys saying how it was made."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from edgekd.atomic import atomic_path
from edgekd.errors import EdgekdError
from edgekd.quant import ggml_pack, gguf_k
from edgekd.quant.imatrix import Imatrix, check, importance

# llama-quantize's keys (tools/quantize/quantize.cpp), written as it writes them (u32 counts).
KEY_FILE = "quantize.imatrix.file"
KEY_DATASET = "quantize.imatrix.dataset"
KEY_ENTRIES = "quantize.imatrix.entries_count"
KEY_CHUNKS = "quantize.imatrix.chunks_count"

_WEIGHTED = {
    gguf.GGMLQuantizationType.Q4_K: (gguf_k.q4_k_codes, ggml_pack.pack_q4_k),
    gguf.GGMLQuantizationType.Q6_K: (gguf_k.q6_k_codes, ggml_pack.pack_q6_k),
    gguf.GGMLQuantizationType.Q5_0: (gguf_k.q5_0_codes, ggml_pack.pack_q5_0),
}


def covered_widths(f16: Path) -> dict[str, int]:
    """GGUF name -> input width of the F16 file's weights an imatrix must cover (`blk.*`)."""
    reader = gguf.GGUFReader(f16)
    return {
        t.name: int(t.shape[0])
        for t in reader.tensors
        if t.name.startswith("blk.") and len(t.shape) == 2
    }


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)


def quantize_weighted(
    f16: Path, plain: Path, dst: Path, imatrix: Imatrix, imatrix_file: str
) -> dict[str, str]:
    """Write `dst`: `plain` (llama.cpp's quantization of `f16`, which fixes each tensor's type)
    with every imatrix-covered tensor requantized by the weighted search. Returns GGUF name ->
    how each quantized tensor was made ("imatrix", or "llama.cpp" for types without a weighted
    path and tensors llama.cpp leaves unweighted: the embedding and the output)."""
    check(imatrix, covered_widths(f16), imatrix_file)
    source = {t.name: t for t in gguf.GGUFReader(f16).tensors}
    reader = gguf.GGUFReader(plain)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    methods, data = {}, []
    for t in reader.tensors:
        raw = t.data
        weighted = _WEIGHTED.get(t.tensor_type)
        if weighted is not None and t.name in imatrix.sums:
            rows = int(t.shape[1])
            x = torch.from_numpy(np.asarray(source[t.name].data, dtype=np.float32)).reshape(
                rows, -1
            )
            codes, pack = weighted
            raw = pack(codes(x, importance(imatrix, t.name)), rows)
            if raw.shape != t.data.shape:
                raise EdgekdError(f"{t.name}: {raw.shape} bytes packed, {t.data.shape} expected")
            methods[t.name] = "imatrix"
        elif t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            methods[t.name] = "llama.cpp"
        data.append((t, raw))
    with atomic_path(Path(dst)) as tmp:
        w = gguf.GGUFWriter(tmp, arch=arch)
        _copy_metadata(reader, w)
        w.add_string(KEY_FILE, imatrix_file)
        if imatrix.datasets:
            w.add_string(KEY_DATASET, imatrix.datasets[0])
        w.add_uint32(KEY_ENTRIES, len(imatrix.sums))
        if imatrix.chunk_count > 0:
            w.add_uint32(KEY_CHUNKS, imatrix.chunk_count)
        for t, raw in data:
            w.add_tensor_info(t.name, raw.shape, raw.dtype, raw.nbytes, t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, raw in data:
            w.write_tensor_data(raw)
        w.close()
    return methods
