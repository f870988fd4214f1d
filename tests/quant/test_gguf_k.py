"""The fake quantizers against llama.cpp itself: same types, same values."""

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from edgekd.errors import EdgekdError
from edgekd.formats.gguf import _permute_rope_rows, quantize_gguf, write_gguf
from edgekd.quant.ggml_pack import pack_q4_k, pack_q5_0, pack_q6_k
from edgekd.quant.gguf_k import (
    DEQUANT,
    fake_quantize,
    q4_k_codes,
    q4_k_dequant,
    q4_k_m_types,
    q5_0_codes,
    q6_k_codes,
)

PACK = {
    "Q4_K": (pack_q4_k, q4_k_codes),
    "Q6_K": (pack_q6_k, q6_k_codes),
    "Q5_0": (pack_q5_0, q5_0_codes),
}


def llama_cpp_quantize(x: torch.Tensor, ggml_type: str, importance=None) -> np.ndarray:
    """llama.cpp's own quantizer (ggml_quantize_chunk, weighted by `importance` when given): the
    stored bytes, one row of blocks per row of x."""
    import llama_cpp

    lib = ctypes.CDLL(str(next((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"))))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.ggml_quantize_chunk.argtypes += [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    qtype = gguf.GGMLQuantizationType[ggml_type]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    src = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    rows, cols = src.shape
    dst = np.zeros((rows, cols // block * size), dtype=np.uint8)
    qw = None if importance is None else np.ascontiguousarray(importance.numpy(), np.float32)
    lib.ggml_quantize_chunk(
        qtype,
        src.ctypes.data,
        dst.ctypes.data,
        0,
        rows,
        cols,
        None if qw is None else qw.ctypes.data,
    )
    return dst


def llama_cpp_dequant(x: torch.Tensor, ggml_type: str, importance=None) -> torch.Tensor:
    """llama_cpp_quantize's blocks dequantized by gguf-py."""
    raw = llama_cpp_quantize(x, ggml_type, importance)
    qtype = gguf.GGMLQuantizationType[ggml_type]
    return torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(x.shape))


def awkward_importance(cols: int) -> torch.Tensor:
    """Per-column weights like an imatrix's: positive, spread over decades, some columns 0."""
    g = torch.Generator().manual_seed(5)
    imp = torch.exp(torch.randn(cols, generator=g) * 2)
    imp[::97] = 0
    return imp


def awkward_rows() -> torch.Tensor:
    """Gaussian rows of mixed scale, plus blocks that take the C code's special branches."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 1024, generator=g) * torch.rand(1024, 1, generator=g) * 0.1
    x[0] = 0  # all-zero super-block
    x[1, :32] = -0.25  # constant negative sub-block (max == min)
    x[2, 40:48] = 0  # sub-block mostly zero
    x[3] = x[3].abs()  # all positive: the min clamps to 0
    x[4, ::32] = 5.0  # an outlier in every sub-block
    x[5] = 1e-7 * torch.randn(1024, generator=g)  # float16 subnormals
    x[6] = torch.randint(-2, 3, (1024,), generator=g).float()  # many ties
    # A super-block where computing 63 / max_min as reciprocal-then-multiply (what torch does
    # for `63 / t`) puts a sub-block's min on the other side of a rounding tie.
    x[7, :256] = torch.randn(16384, 256, generator=torch.Generator().manual_seed(3))[14405] * 0.02
    return x.half().float()  # the F16 values llama.cpp reads from edgekd's export


@pytest.mark.parametrize("ggml_type", ["Q4_K", "Q6_K", "Q5_0", "Q8_0"])
def test_bit_exact_with_llama_cpp(ggml_type):
    x = awkward_rows()
    assert torch.equal(DEQUANT[ggml_type](x), llama_cpp_dequant(x, ggml_type))


@pytest.mark.parametrize("ggml_type", ["Q4_K", "Q6_K", "Q5_0", "Q8_0"])
def test_weighted_bit_exact_with_llama_cpp(ggml_type):
    """With an importance per column: the same values, and the same stored bytes."""
    x = awkward_rows()[:256]
    imp = awkward_importance(x.shape[1])
    assert torch.equal(DEQUANT[ggml_type](x, imp), llama_cpp_dequant(x, ggml_type, imp))
    # The weights change the result (Q8_0 has no weighted path in llama.cpp).
    assert torch.equal(DEQUANT[ggml_type](x, imp), DEQUANT[ggml_type](x)) == (ggml_type == "Q8_0")
    if ggml_type in PACK:
        pack, codes = PACK[ggml_type]
        ours = pack(codes(x, imp), x.shape[0])
        assert np.array_equal(ours, llama_cpp_quantize(x, ggml_type, imp))


def test_weighted_q5_0_rows_not_a_multiple_of_256():
    x = awkward_rows()[:64, :576]
    imp = awkward_importance(576)
    assert np.array_equal(pack_q5_0(q5_0_codes(x, imp), 64), llama_cpp_quantize(x, "Q5_0", imp))


def test_importance_of_another_width_is_refused():
    with pytest.raises(EdgekdError, match="not this model's"):
        q4_k_dequant(torch.randn(4, 512), torch.ones(256))


def test_error_shrinks_with_bits():
    """Relative RMS error on Gaussian weights: about 7% for Q4_K down to 0.5% for Q8_0."""
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1))
    err = [
        ((DEQUANT[t](x) - x).pow(2).mean() / x.pow(2).mean()).sqrt().item()
        for t in ("Q4_K", "Q5_0", "Q6_K", "Q8_0", "F16")
    ]
    assert 0.1 > err[0] > err[1] > err[2] > err[3] > err[4] > 0
    assert err[0] > 0.05 and err[3] < 0.01


def test_shape_and_row_length():
    w = torch.randn(3, 2, 256)
    assert q4_k_dequant(w).shape == w.shape
    with pytest.raises(EdgekdError, match="multiple of 256"):
        q4_k_dequant(torch.randn(4, 576))
    with pytest.raises(EdgekdError, match="not one of"):
        fake_quantize(w, "Q4_1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_straight_through(dtype):
    w = (torch.randn(8, 256) * 0.02).to(dtype).requires_grad_()
    out = fake_quantize(w, "Q4_K")
    assert out.dtype == dtype
    assert torch.equal(out, q4_k_dequant(w.detach().half()).to(dtype))
    grad = torch.randn(8, 256, dtype=dtype)
    out.backward(grad)
    assert torch.equal(w.grad, grad)


def llama_config(hidden, ffn, layers=8, tied=True, **extra):
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        **extra,
    )


def test_types_follow_llama_cpp_rules():
    types = q4_k_m_types(llama_config(256, 768, layers=16, tied=False))
    assert types["model.embed_tokens.weight"] == "Q4_K"
    assert types["lm_head.weight"] == "Q6_K"
    more_bits = [i for i in range(16) if types[f"model.layers.{i}.mlp.down_proj.weight"] == "Q6_K"]
    assert more_bits == [0, 1, 4, 7, 10, 13, 14, 15]  # first/last eighth, every third between
    assert all(types[f"model.layers.{i}.self_attn.v_proj.weight"] == "Q6_K" for i in more_bits)
    assert types["model.layers.2.self_attn.v_proj.weight"] == "Q4_K"
    assert len(types) == 2 + 16 * 7  # no norms

    smol = q4_k_m_types(llama_config(576, 1536, layers=30))
    assert smol["model.embed_tokens.weight"] == "Q8_0"
    assert "lm_head.weight" not in smol
    assert smol["model.layers.0.self_attn.q_proj.weight"] == "Q5_0"
    assert smol["model.layers.0.self_attn.v_proj.weight"] == "Q8_0"
    assert smol["model.layers.0.mlp.down_proj.weight"] == "Q6_K"
    assert smol["model.layers.4.mlp.down_proj.weight"] == "Q4_K"

    odd = q4_k_m_types(llama_config(256, 768, head_dim=20))
    assert odd["model.layers.0.self_attn.o_proj.weight"] == "F16"
    with pytest.raises(EdgekdError, match="multiple of 32"):
        q4_k_m_types(llama_config(80, 256))


def agreement(model_dir: Path, quantized: Path, config) -> dict[str, tuple[str, str, float]]:
    """Per HF weight: (type llama.cpp chose, type we predict, share of identical values)."""
    heads = {"q_proj": 4, "k_proj": 2}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    stored = {t.name: t for t in gguf.GGUFReader(quantized).tensors}
    ours = q4_k_m_types(config)
    out = {}
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        for hf_name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            t = stored.get(names.get_name(hf_name, try_suffixes=(".weight",)))
            if t is None:  # a tied lm_head
                continue
            theirs = torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type))
            our_type = ours.get(hf_name, "F32")
            mine = f.get_tensor(hf_name)
            if our_type != "F32":
                mine = fake_quantize(mine, our_type).detach()
            kind = hf_name.split(".")[-2]
            if kind in heads:
                mine = _permute_rope_rows(mine, heads[kind])
            same = (mine.reshape(theirs.shape) == theirs).float().mean().item()
            out[hf_name] = (t.tensor_type.name, our_type, same)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("hidden", "tied", "extra", "expected"),
    [
        (256, False, {}, {"Q4_K", "Q6_K", "F32"}),
        (288, True, {"head_dim": 20}, {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "F16", "F32"}),
    ],
    ids=["k-quants", "fallbacks"],
)
def test_matches_llama_cpp_q4_k_m_export(tmp_path, tokenizer, hidden, tied, extra, expected):
    """Rows of 288 fall back to Q5_0 / Q8_0, o_proj's rows of 4 * 20 to F16."""
    torch.manual_seed(0)
    config = llama_config(
        hidden,
        768,
        tied=tied,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )
    model_dir = tmp_path / "m"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (model_dir / "tokenizer.model").unlink(missing_ok=True)
    f16 = write_gguf(model_dir, tmp_path / "m-F16.gguf", dtype="F16")
    q4 = quantize_gguf(f16, tmp_path / "m-Q4_K_M.gguf", "Q4_K_M", threads=2)

    result = agreement(model_dir, q4, config)
    assert len(result) == 2 + 8 * 9 + (not tied)
    assert {v[0] for v in result.values()} == expected
    assert {k: v[:2] for k, v in result.items() if v[0] != v[1]} == {}
    worst = min(result.items(), key=lambda kv: kv[1][2])
    assert worst[1][2] > 0.999, worst
