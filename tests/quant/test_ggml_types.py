"""The table of ggml types per file type: gguf-py's sizes, GGUF <-> HF names, llama.cpp's rules."""

import pytest
from transformers import LlamaConfig

from edgekd import models
from edgekd.errors import EdgekdError
from edgekd.quant import ggml_types
from edgekd.quant.gguf_k import q4_k_m_types


def test_sizes_come_from_gguf_py():
    assert ggml_types.block("Q4_K") == (256, 144)
    assert ggml_types.block("Q6_K") == (256, 210)
    assert ggml_types.block("Q8_0") == (32, 34)
    assert ggml_types.ALIGNMENT == 32
    assert ggml_types.tensor_bytes("Q8_0", 64) == 96  # 2 blocks of 34 bytes, padded to 32
    for default in ggml_types.FILE_TYPES.values():
        ggml_types.block(default)


def test_hf_names():
    assert ggml_types.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert ggml_types.hf_name("output.weight") == "lm_head.weight"
    assert ggml_types.hf_name("blk.7.ffn_down.weight") == "model.layers.7.mlp.down_proj.weight"
    assert ggml_types.hf_name("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
    with pytest.raises(KeyError, match="rope_freqs"):
        ggml_types.hf_name("rope_freqs.weight")


@pytest.mark.parametrize("tied", [True, False])
def test_qat_types_are_the_size_estimates_types(tied):
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=16,
        num_attention_heads=4,
        tie_word_embeddings=tied,
    )
    estimate = models.gguf_tensor_types(config, "Q4_K_M")
    qat = q4_k_m_types(config)
    assert qat == {
        ggml_types.hf_name(name): kind for name, kind in estimate.items() if kind != "F32"
    }
    assert all(estimate[n] == "F32" for n in estimate if n.endswith("norm.weight"))


def test_unknown_file_type_is_refused():
    with pytest.raises(EdgekdError, match="unknown GGUF quant type 'Q3_K_M'"):
        ggml_types.check_file_type("Q3_K_M")
