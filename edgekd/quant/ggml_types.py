"""The ggml type llama.cpp's quantizer gives each tensor of a GGUF file, per file type.

One table for the GGUF size estimate (models.gguf_bytes_estimate) and for quantization-aware
training (quant.gguf_k.q4_k_m_types), so both follow the same rules: llama_tensor_get_type without
an importance matrix, for the file types edgekd writes. Tensors are named as in GGUF
(`blk.3.attn_v.weight`); `hf_name` gives a Llama-family weight's Hugging Face name. Block sizes,
type sizes and the data alignment come from gguf-py.
"""

from __future__ import annotations

import re

import gguf

from edgekd.errors import EdgekdError

ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT

# llama.cpp file type -> the tensor type of a weight no other rule applies to.
FILE_TYPES = {
    "F16": "F16",
    "Q8_0": "Q8_0",
    "Q4_0": "Q4_0",
    "Q4_1": "Q4_1",
    "Q4_K_M": "Q4_K",
    "Q5_K_M": "Q5_K",
}
# File types whose attn_v and ffn_down weights get Q6_K in use_more_bits layers.
_MORE_BITS = ("Q4_K_M", "Q5_K_M")
# llama.cpp's tensor_type_fallback: what it writes when a row is not a multiple of the block.
_ROW_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

# GGUF name -> Hugging Face name of a Llama-family weight ({} is the layer index).
_HF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output": "lm_head",
    "output_norm": "model.norm",
    "attn_norm": "model.layers.{}.input_layernorm",
    "ffn_norm": "model.layers.{}.post_attention_layernorm",
    "attn_q": "model.layers.{}.self_attn.q_proj",
    "attn_k": "model.layers.{}.self_attn.k_proj",
    "attn_v": "model.layers.{}.self_attn.v_proj",
    "attn_output": "model.layers.{}.self_attn.o_proj",
    "attn_q_norm": "model.layers.{}.self_attn.q_norm",
    "attn_k_norm": "model.layers.{}.self_attn.k_norm",
    "ffn_gate": "model.layers.{}.mlp.gate_proj",
    "ffn_up": "model.layers.{}.mlp.up_proj",
    "ffn_down": "model.layers.{}.mlp.down_proj",
}
_GGUF_NAME = re.compile(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)")


def check_file_type(file_type: str) -> None:
    """Refuse a file type this table does not know."""
    if file_type not in FILE_TYPES:
        raise EdgekdError(
            f"unknown GGUF quant type {file_type!r}: use one of {', '.join(FILE_TYPES)}"
        )


def block(ggml_type: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a ggml type, from gguf-py."""
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]


def padded(n: int) -> int:
    """n bytes rounded up to the GGUF data alignment."""
    return -(-n // ALIGNMENT) * ALIGNMENT


def hf_name(name: str) -> str:
    """The Hugging Face name of the Llama-family tensor GGUF calls `name`."""
    match = _GGUF_NAME.fullmatch(name)
    if match is None or match[2] not in _HF_NAMES:
        raise KeyError(f"no Hugging Face name known for GGUF tensor {name!r}")
    layer, kind, suffix = match.groups()
    return f"{_HF_NAMES[kind].format(layer)}.{suffix}"


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits in *_K_M files: the first and last eighth,
    and every third layer in between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(
    name: str, shape: tuple[int, ...], file_type: str, n_layers: int, tied: bool
) -> str:
    """The ggml type of GGUF tensor `name` (shape in GGUF order, row length first) in a
    `file_type` file (a key of FILE_TYPES) of a model with `n_layers` decoder layers (`tied`: the
    embedding is the output)."""
    default = FILE_TYPES[file_type]
    # 1-D tensors (norms, biases, rope factors) are never quantized and stay F32.
    if len(shape) < 2:
        return "F32"
    if default == "F16":
        return "F16"
    row = shape[0]
    match = _GGUF_NAME.fullmatch(name)
    layer, kind = (int(match[1]) if match[1] else -1, match[2]) if match else (-1, name)
    chosen = default
    if kind == "output" or (tied and kind == "token_embd"):
        if row % block(default)[0] != 0:
            chosen = "Q8_0"
        elif default != "Q8_0":
            chosen = "Q6_K"
    elif (
        file_type in _MORE_BITS
        and kind in ("attn_v", "ffn_down")
        and use_more_bits(layer, n_layers)
    ):
        chosen = "Q6_K"
    if row % block(chosen)[0] != 0:
        if chosen not in _ROW_FALLBACK:
            raise EdgekdError(
                f"tensor {name} has rows of {row} values, not a multiple of "
                f"{block(chosen)[0]}: llama.cpp cannot write it as {file_type}"
            )
        chosen = _ROW_FALLBACK[chosen]
        if row % block(chosen)[0] != 0:
            chosen = "F16"
    return chosen


def tensor_bytes(ggml_type: str, numel: int) -> int:
    """Bytes of a tensor of `numel` values stored as `ggml_type`, padded to the alignment."""
    per_block, block_bytes = block(ggml_type)
    return padded(numel // per_block * block_bytes)
