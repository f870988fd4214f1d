"""ONNX export against torch, through onnxruntime: logits, KV cache, int4 and int8."""

import onnx
import pytest
import torch

from edgekd.config import ExportOnnxSettings
from edgekd.errors import EdgekdError
from edgekd.formats import onnx as onnx_module
from edgekd.formats.onnx import INT4_METHODS, Calibration, export_onnx, quantize_onnx
from edgekd.formats.ort import Ort
from tests.formats.test_gguf import CHAT, PROSE, measure, save_tiny, torch_logprobs

QUANT = ExportOnnxSettings().model_dump(
    include={"block_size", "accuracy_level", "int8_projections"}
)
DEFAULT = {**QUANT, "method": ExportOnnxSettings().int4_method, "head_bits": 8}


def greedy_torch(model, tokenizer, messages, max_tokens):
    """Argmax decoding without the KV cache, the reference for Ort.chat's cached loop."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids, eos = list(prompt), {tokenizer.eos_token_id, model.config.eos_token_id}
    for _ in range(max_tokens):
        with torch.no_grad():
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        if token in eos:
            break
        ids.append(token)
    return tokenizer.decode(ids[len(prompt) :], skip_special_tokens=True)


def _int4(onnx_dir, out, seqs, method, *, head_bits, **quant):
    """quantize_onnx's int4 by `method` (gptq calibrated on `seqs`), all 4-bit in the body, with
    QUANT's settings but for `quant`."""
    calibration = Calibration(onnx_dir, seqs) if method == "gptq" else None
    return quantize_onnx(
        onnx_dir,
        out,
        "int4",
        **{**QUANT, "int8_projections": [], **quant},
        method=method,
        head_bits=head_bits,
        calibration=calibration,
    )


def _assert_tracks_its_float_self(out, model, seqs, tokenizer, tmp_path, **shape):
    """The quantized folder's kld to its float model is under a tenth of another random model's
    of the same shape."""
    ref = torch_logprobs(model, seqs)
    q = measure(Ort(out, threads=2).logprobs(seqs), ref, seqs)
    other = save_tiny(tmp_path / "other", "llama", tokenizer, seed=1, **shape)
    assert q.kld < 0.1 * measure(torch_logprobs(other, seqs), ref, seqs).kld


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """A tiny Qwen2 (q/k/v biases, untied) and a tiny Llama (tied), exported once."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for arch, tied in (("qwen2", False), ("llama", True)):
        model = save_tiny(root / arch, arch, tokenizer, tied=tied)
        out[arch] = (model, export_onnx(root / arch, root / f"{arch}-onnx"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_export_matches_torch(exported, tokenizer, arch):
    model, onnx_dir = exported[arch]
    assert (onnx_dir / "tokenizer.json").is_file()
    assert not (onnx_dir / "tokenizer.model").exists()
    seqs = [tokenizer(PROSE)["input_ids"], tokenizer.apply_chat_template(CHAT, tokenize=True)]
    ref = torch_logprobs(model, seqs)
    got = Ort(onnx_dir, threads=2).logprobs(seqs)
    assert max((g - r).abs().max().item() for g, r in zip(got, ref, strict=True)) < 1e-3
    assert measure(got, ref, seqs).top1 == 1.0


@pytest.mark.slow
def test_generate_uses_the_cache_correctly(exported, tokenizer):
    model, onnx_dir = exported["qwen2"]
    messages = CHAT[:2]
    got = Ort(onnx_dir, threads=2, tokenizer=tokenizer).chat([messages], max_tokens=8)[0]
    assert got == greedy_torch(model, tokenizer, messages, 8)


def _bits(graph) -> dict[str, int]:
    """Bits of each quantized MatMul, keyed 'lm_head' for the one that writes the logits."""
    return {
        "lm_head" if "logits" in n.output else n.name: next(
            a.i for a in n.attribute if a.name == "bits"
        )
        for n in graph.node
        if n.op_type == "MatMulNBits"
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_quantized_loads_and_stays_close(exported, tokenizer, tmp_path, kind):
    model, onnx_dir = exported["llama"]
    out = quantize_onnx(onnx_dir, tmp_path / kind, kind, **DEFAULT)
    assert {p.name for p in out.iterdir()} == {p.name for p in onnx_dir.iterdir()}
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    # Every MatMul with a constant weight is quantized, lm_head included: the tied embedding
    # reaches it through a Transpose in optimum's graph, which quantize_onnx unties.
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    bits = _bits(graph)
    assert len(bits) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and lm_head
    assert bits.pop("lm_head") == 8
    wide = QUANT["int8_projections"] if kind == "int4" else []
    assert {
        n: 4 if kind == "int4" and not any(f"/{p}/" in n for p in wide) else 8 for n in bits
    } == bits
    # Level 4 (int8 compute) on every node: without it the 8-bit kernel is ~15x slower on CPU.
    levels = {
        a.i
        for n in graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    }
    assert levels == {QUANT["accuracy_level"]}
    ops = {n.op_type for n in graph.node}
    assert ("GatherBlockQuantized" in ops) is (kind == "int4")
    seqs = [tokenizer(PROSE)["input_ids"]]
    ref = torch_logprobs(model, seqs)
    q = measure(Ort(out, threads=2).logprobs(seqs), ref, seqs)
    other = save_tiny(tmp_path / "other", "llama", tokenizer, seed=1)
    unrelated = measure(torch_logprobs(other, seqs), ref, seqs)
    assert q.kld < (0.1 if kind == "int4" else 0.01) * unrelated.kld
    assert isinstance(
        Ort(out, threads=2, tokenizer=tokenizer).chat([CHAT[:2]], max_tokens=4)[0], str
    )


@pytest.mark.slow
def test_large_models_keep_weights_in_a_side_file(exported, tokenizer, tmp_path, monkeypatch):
    """Past 2 GiB protobuf cannot hold the weights; the same path, forced on a tiny model."""
    _, onnx_dir = exported["qwen2"]
    small = quantize_onnx(onnx_dir, tmp_path / "inline", "int4", **DEFAULT)
    monkeypatch.setattr(onnx_module, "_EXTERNAL_DATA_BYTES", 0)
    side = quantize_onnx(onnx_dir, tmp_path / "side", "int4", **DEFAULT)
    assert (side / "model.onnx").stat().st_size < 0.1 * (small / "model.onnx").stat().st_size
    seqs = [tokenizer(PROSE)["input_ids"][:20]]
    a, b = Ort(small, threads=1).logprobs(seqs)[0], Ort(side, threads=1).logprobs(seqs)[0]
    assert torch.equal(a, b)


HEAD_BITS = {"rtn_sym": 4, "rtn_asym": 32, "hqq": 8, "k_quant": 8, "gptq": 8}


@pytest.mark.slow
@pytest.mark.parametrize("method", INT4_METHODS)
def test_every_int4_method_quantizes_every_matmul(exported, tokenizer, tmp_path, method):
    """Each of onnxruntime's int4 quantizers: 4-bit body, the head at head_bits (32: float),
    the embedding in 4 bits, and a model that still tracks its float self."""
    model, onnx_dir = exported["llama"]
    seqs = [tokenizer(PROSE)["input_ids"]]
    out = _int4(onnx_dir, tmp_path / method, seqs, method, head_bits=HEAD_BITS[method])
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    bits = _bits(graph)
    head = bits.pop("lm_head", 32)
    assert head == HEAD_BITS[method]
    assert len(bits) == 2 * 7 and set(bits.values()) == {4}
    assert "GatherBlockQuantized" in {n.op_type for n in graph.node}
    _assert_tracks_its_float_self(out, model, seqs, tokenizer, tmp_path)


def test_quantize_refuses_unknown_method(tmp_path):
    with pytest.raises(EdgekdError, match="int4 method 'awq' is not one of"):
        quantize_onnx(tmp_path, tmp_path / "q", "int4", **QUANT, method="awq", head_bits=8)


def test_quantize_refuses_unknown_kind(tmp_path):
    with pytest.raises(EdgekdError, match="int3"):
        quantize_onnx(tmp_path, tmp_path / "out", "int3", **DEFAULT)


def test_quantize_refuses_bad_block_size(tmp_path):
    with pytest.raises(EdgekdError, match="block_size 48"):
        quantize_onnx(tmp_path, tmp_path / "out", "int4", **{**DEFAULT, "block_size": 48})


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(EdgekdError, match="model.onnx"):
        Ort(tmp_path, threads=1).logprobs([[1, 2, 3]])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["k_quant", "gptq"])
def test_odd_block_count_per_column(tokenizer, tmp_path, method):
    """Rows of 96 at block 32 (three blocks a column, as SmolLM2's 576 at block 64): onnxruntime
    packs such zero points across columns and fails; quantize_onnx packs them per column, and the
    model still tracks its float self."""
    model = save_tiny(tmp_path / "odd", "llama", tokenizer, hidden=96)
    onnx_dir = export_onnx(tmp_path / "odd", tmp_path / "odd-onnx")
    seqs = [tokenizer(PROSE)["input_ids"]]
    out = _int4(onnx_dir, tmp_path / method, seqs, method, head_bits=8, block_size=32)
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    q_proj = next(n for n in graph.node if n.op_type == "MatMulNBits" and "q_proj" in n.name)
    assert shapes[q_proj.input[3]] == (96, 2)  # ceil(3 blocks / 2) bytes per output column
    _assert_tracks_its_float_self(out, model, seqs, tokenizer, tmp_path, hidden=96)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rtn_asym", "gptq"])
def test_int8_projections_make_a_mixed_layout(exported, tokenizer, tmp_path, method):
    """The named projections of every layer in 8 bits, the rest of the body in 4, the head at
    head_bits; a projection the graph lacks is one clear error."""
    model, onnx_dir = exported["llama"]
    seqs = [tokenizer(PROSE)["input_ids"]]
    calibration = Calibration(onnx_dir, seqs) if method == "gptq" else None
    settings = {**QUANT, "method": method, "calibration": calibration, "head_bits": 4}
    wide = ["v_proj", "down_proj"]
    out = quantize_onnx(
        onnx_dir, tmp_path / "mixed", "int4", **{**settings, "int8_projections": wide}
    )
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    bits = _bits(graph)
    assert bits.pop("lm_head") == 4
    assert len(bits) == 2 * 7
    assert {n: b for n, b in bits.items() if b == 8} == {
        n: 8 for n in bits if any(f"/{p}/" in n for p in wide)
    }
    assert sum(b == 8 for b in bits.values()) == 2 * len(wide)
    ref = torch_logprobs(model, seqs)
    mixed = measure(Ort(out, threads=2).logprobs(seqs), ref, seqs)
    plain = quantize_onnx(
        onnx_dir, tmp_path / "plain", "int4", **{**settings, "int8_projections": []}
    )
    assert mixed.kld < measure(Ort(plain, threads=2).logprobs(seqs), ref, seqs).kld
    with pytest.raises(EdgekdError, match="no w_proj MatMul"):
        quantize_onnx(
            onnx_dir, tmp_path / "bad", "int4", **{**settings, "int8_projections": ["w_proj"]}
        )


def test_post_processing_only_below_the_protobuf_limit():
    # Qwen2.5-0.5B's and -1.5B's parameter counts: optimum's post-processing of the second
    # fails to serialize its one proto (measured by bench/real_size.py).
    assert onnx_module.post_processable(494_032_768)
    assert not onnx_module.post_processable(1_543_714_304)
