"""Tests for edgekd.models: sources, loading, tokenizer checks, layer pruning and sizing."""

import ctypes
import json
import re
import shutil

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
)

from edgekd.errors import EdgekdError
from edgekd.models import (
    ModelSource,
    block_drop_scores,
    check_same_tokenizer,
    check_weights,
    embedded_teacher_gguf,
    gguf_bytes_estimate,
    kept_layers_kld,
    kv_cache_bytes,
    layers_that_fit,
    load_config,
    load_model,
    load_tokenizer,
    param_count,
    prune_layers,
    resolve_source,
    with_layers,
)


def smollm2_config(**overrides) -> LlamaConfig:
    """SmolLM2-135M's shape, built without loading anything."""
    shape = dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    return LlamaConfig(**{**shape, **overrides})


# --- sources ---------------------------------------------------------------------------------


def test_embedded_teacher_gguf_is_the_smollm2_file():
    path = embedded_teacher_gguf()
    assert path.is_file() and path.suffix == ".gguf" and "SmolLM2-135M" in path.name
    src = resolve_source("embedded", role="teacher")
    assert src == ModelSource("gguf", "embedded", path)


def test_resolve_missing_path_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(EdgekdError, match=re.escape(f"teacher {missing} does not exist")):
        resolve_source(str(missing), role="teacher")


def test_resolve_folder_without_config_names_it(tmp_path):
    with pytest.raises(EdgekdError, match=re.escape(f"student folder {tmp_path} has no config")):
        resolve_source(str(tmp_path), role="student")


def test_resolve_non_gguf_file_names_it(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(EdgekdError, match=re.escape(f"{weights} is a file but not a .gguf")):
        resolve_source(str(weights), role="teacher")


def test_resolve_kinds(tmp_path, tiny_teacher_dir):
    (tmp_path / "m.gguf").write_bytes(b"")
    assert resolve_source(str(tmp_path / "m.gguf"), role="teacher").kind == "gguf"
    folder = resolve_source(str(tiny_teacher_dir), role="teacher")
    assert (folder.kind, folder.path) == ("hf_folder", tiny_teacher_dir)
    hub = resolve_source("HuggingFaceTB/SmolLM2-135M", role="teacher")
    assert (hub.kind, hub.path) == ("hub", None)
    assert hub.describe() == "hub model HuggingFaceTB/SmolLM2-135M"


def test_hub_id_not_cached_says_offline():
    src = resolve_source("edgekd-tests/not-a-real-model", role="teacher")
    for load in (load_config, load_tokenizer, load_model):
        with pytest.raises(EdgekdError, match="not-a-real-model could not be loaded offline"):
            load(src)


def test_cached_hub_model_loads_like_a_folder(tmp_path, monkeypatch, tiny_teacher_dir):
    """A hub id found in the local Hugging Face cache loads without any network."""
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_teacher_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    src = resolve_source("org/tiny", role="teacher")
    assert load_config(src).num_hidden_layers == 4
    assert load_model(src).config.num_hidden_layers == 4


# --- loading ---------------------------------------------------------------------------------


def test_load_tiny_teacher_folder(tiny_teacher_dir, tokenizer):
    src = resolve_source(str(tiny_teacher_dir), role="teacher")
    config = load_config(src)
    model = load_model(src)
    assert config.num_hidden_layers == 4 and not model.training
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == param_count(config)
    assert load_tokenizer(src).get_vocab() == tokenizer.get_vocab()
    ids = torch.tensor([[1, 2, 3, 4]])
    assert model(ids).logits.shape == (1, 4, config.vocab_size)


def test_pickle_only_folder_needs_allow_pickle(tmp_path, tiny_teacher_dir):
    reference = load_model(resolve_source(str(tiny_teacher_dir), role="teacher"))
    shutil.copy(tiny_teacher_dir / "config.json", tmp_path / "config.json")
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    src = resolve_source(str(tmp_path), role="teacher")
    with pytest.raises(
        EdgekdError, match=r"only pickle weights \(pytorch_model\.bin\).*allow_pickle"
    ):
        load_model(src)
    model = load_model(src, allow_pickle=True)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_folder_with_config_only_holds_no_weights(tmp_path, tiny_teacher_dir):
    shutil.copy(tiny_teacher_dir / "config.json", tmp_path / "config.json")
    src = resolve_source(str(tmp_path), role="student")
    assert load_config(src).num_hidden_layers == 4  # dry runs need only the config
    with pytest.raises(EdgekdError, match=re.escape(f"{tmp_path} holds no weights")):
        load_model(src)


# --- tokenizers ------------------------------------------------------------------------------


def test_same_tokenizer_passes(tokenizer, tiny_teacher_dir):
    student_tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    check_same_tokenizer(tokenizer, student_tok, teacher_name="t", student_name="s")


def test_tokenizer_with_extra_tokens_fails(tokenizer, tokenizer_dir):
    other = AutoTokenizer.from_pretrained(tokenizer_dir)
    other.add_tokens(["<extra_a>", "<extra_b>", "<extra_c>"])
    with pytest.raises(EdgekdError, match="teacher T .*student S .*differ in 3 tokens.*shared"):
        check_same_tokenizer(tokenizer, other, teacher_name="T", student_name="S")


def test_tokenizer_with_other_eos_fails(tokenizer, tokenizer_dir):
    other = AutoTokenizer.from_pretrained(tokenizer_dir, eos_token="<|endoftext|>")
    assert other.eos_token_id != tokenizer.eos_token_id
    with pytest.raises(EdgekdError, match="eos_token_id is .* in teacher T but 0 in student S"):
        check_same_tokenizer(tokenizer, other, teacher_name="T", student_name="S")


# --- layer selection and pruning -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny_teacher_dir):
    return load_model(resolve_source(str(tiny_teacher_dir), role="teacher"))


@pytest.fixture(scope="module")
def batches(tiny_model):
    gen = torch.Generator().manual_seed(0)
    vocab = tiny_model.config.vocab_size
    a = torch.randint(0, vocab, (2, 12), generator=gen)
    b = torch.randint(0, vocab, (1, 9), generator=gen)
    a_labels = a.clone()
    a_labels[:, :6] = -100  # a prompt: only the second half are targets
    return [{"input_ids": a, "labels": a_labels}, {"input_ids": b, "labels": b.clone()}]


def manual_kld(full_model, pruned_model, batches) -> float:
    """KL(full || pruned) summed over targets (labels unshifted), averaged over targets."""
    total, count = 0.0, 0
    for batch in batches:
        with torch.no_grad():
            p_log = full_model(batch["input_ids"]).logits[:, :-1].log_softmax(-1)
            q_log = pruned_model(batch["input_ids"]).logits[:, :-1].log_softmax(-1)
        mask = batch["labels"][:, 1:] != -100
        total += (p_log.exp() * (p_log - q_log)).sum(-1)[mask].sum().item()
        count += mask.sum().item()
    return total / count


def test_block_drop_scores_zero_drop_is_zero(tiny_model, batches):
    assert block_drop_scores(tiny_model, batches, 0) == [(s, 0.0) for s in range(5)]


def test_block_drop_scores_match_pruned_models(tiny_model, batches):
    before = tiny_model(batches[0]["input_ids"]).logits
    scores = block_drop_scores(tiny_model, batches, 2)
    assert [s for s, _ in scores] == [0, 1, 2]
    for start, kld in scores:
        keep = [i for i in range(4) if not start <= i < start + 2]
        expected = manual_kld(tiny_model, prune_layers(tiny_model, keep), batches)
        assert kld > 0
        assert kld == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # The model is left as it was.
    assert len(tiny_model.model.layers) == 4
    assert torch.equal(tiny_model(batches[0]["input_ids"]).logits, before)


def test_kept_layers_kld_matches_pruned_model(tiny_model, batches):
    keep = [0, 3]
    expected = manual_kld(tiny_model, prune_layers(tiny_model, keep), batches)
    assert kept_layers_kld(tiny_model, batches, keep) == pytest.approx(expected, rel=1e-4)


def test_block_drop_too_many_layers(tiny_model, batches):
    with pytest.raises(EdgekdError, match="cannot drop 5 of the model's 4 decoder layers"):
        block_drop_scores(tiny_model, batches, 5)


def test_prune_layers_copies_the_kept_weights(tiny_model):
    keep = [0, 2, 3]
    pruned = prune_layers(tiny_model, keep)
    assert type(pruned) is type(tiny_model)
    assert pruned.config.num_hidden_layers == 3
    assert tiny_model.config.num_hidden_layers == 4 and len(tiny_model.model.layers) == 4
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2]
    for new, old in enumerate(keep):
        new_params = dict(pruned.model.layers[new].named_parameters())
        old_params = dict(tiny_model.model.layers[old].named_parameters())
        assert new_params.keys() == old_params.keys()
        for name, p in new_params.items():
            assert torch.equal(p, old_params[name]), name
            assert p.data_ptr() != old_params[name].data_ptr()  # copied, not shared
    assert torch.equal(pruned.model.embed_tokens.weight, tiny_model.model.embed_tokens.weight)
    assert torch.equal(pruned.model.norm.weight, tiny_model.model.norm.weight)
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight  # still tied


def test_pruned_model_decodes_with_cache(tiny_model):
    """Renumbered layer_idx: incremental decoding with a KV cache equals a full forward."""
    pruned = prune_layers(tiny_model, [1, 3])
    ids = torch.tensor([[5, 17, 300, 42, 9, 77]])
    with torch.no_grad():
        full = pruned(ids).logits[:, -1]
        prefix = pruned(ids[:, :-1], use_cache=True)
        step = pruned(ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True)
    assert len(prefix.past_key_values) == 2
    torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-4, atol=1e-5)


def test_prune_layers_trims_layer_types():
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
    )
    model = Qwen2ForCausalLM(config).eval()
    assert config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    pruned = prune_layers(model, [0, 3])
    assert pruned.config.layer_types == ["full_attention", "sliding_attention"]
    assert model.config.layer_types == config.layer_types
    assert pruned(torch.tensor([[1, 2, 3, 4, 5, 6]])).logits.shape == (1, 6, 128)


@pytest.mark.parametrize("keep", [[], [2, 1], [0, 0, 1], [0, 4]])
def test_prune_layers_rejects_bad_keep(tiny_model, keep):
    with pytest.raises(EdgekdError, match="must be increasing, unique indices in 0..3"):
        prune_layers(tiny_model, keep)


# --- sizing ----------------------------------------------------------------------------------


SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3)


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(
            **SMALL, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
        ),
        LlamaConfig(
            **SMALL, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False
        ),
        LlamaConfig(
            **SMALL,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=32,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=False,
        ),
        Qwen2Config(
            **SMALL, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
        ),
        Qwen3Config(
            **SMALL,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            tie_word_embeddings=False,
        ),
    ],
    ids=["llama-tied", "llama-untied", "llama-bias-headdim", "qwen2-tied", "qwen3-untied"],
)
def test_param_count_matches_built_model(config):
    model = AutoModelForCausalLM.from_config(config)
    assert param_count(config) == sum(p.numel() for p in model.parameters())


def test_param_count_smollm2():
    assert param_count(smollm2_config()) == 134_515_008  # SmolLM2-135M's published count


def test_param_count_rejects_other_architectures():
    with pytest.raises(EdgekdError, match="model_type 'gpt2'.*supported are llama"):
        param_count(GPT2Config())


def test_kv_cache_bytes_by_hand():
    # K and V, 30 layers, 2048 positions, 3 KV heads of 64 values, 2 bytes each.
    assert kv_cache_bytes(smollm2_config(), 2048) == 2 * 30 * 2048 * 3 * 64 * 2 == 47_185_920
    assert kv_cache_bytes(smollm2_config(), 2048, bytes_per_value=1) == 23_592_960
    tiny = LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=1, head_dim=32)
    assert kv_cache_bytes(tiny, 100) == 2 * 3 * 100 * 1 * 32 * 2


def test_gguf_estimate_by_hand():
    """Hidden 256 (whole Q4_K blocks), 8 layers, untied output."""
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    norms = 4 * 256 * (1 + 2 * 8)  # F32: output_norm + attn_norm and ffn_norm per layer
    # F16: 2 bytes per weight. q, o: 256x256; k, v: 256x128; gate, up, down: 256x512.
    f16_layer = 2 * (2 * 65536 + 2 * 32768 + 3 * 131072)
    f16 = 2 * 2 * 131072 + 8 * f16_layer + norms
    # Q4_K_M: Q4_K (144 B per 256) except output -> Q6_K (210 B per 256), and attn_v and ffn_down
    # -> Q6_K in the use_more_bits layers: i < 8/8, i >= 7*8/8, (i - 1) % 3 == 2 -> 0, 3, 6, 7.
    q4k_layer = 144 * (2 * 256 + 2 * 128 + 3 * 512)
    more_bits = (210 - 144) * (128 + 512)
    q4_k_m = 144 * 512 + 210 * 512 + 8 * q4k_layer + 4 * more_bits + norms
    # Q8_0: 34 B per 32 for every matrix.
    q8_0 = 34 * (2 * 131072 + 8 * (f16_layer // 2)) // 32 + norms
    est = {q: gguf_bytes_estimate(config, q) for q in ("F16", "Q4_K_M", "Q8_0")}
    # The header (metadata, tensor list) is the same for every quant type; the data differs.
    assert est["Q4_K_M"] - est["F16"] == q4_k_m - f16
    assert est["Q8_0"] - est["F16"] == q8_0 - f16
    assert est["F16"] > f16


def test_gguf_estimate_rejects_unknown_quant_and_odd_rows():
    with pytest.raises(EdgekdError, match="unknown GGUF quant type 'Q3_K_M'"):
        gguf_bytes_estimate(smollm2_config(), "Q3_K_M")
    with pytest.raises(EdgekdError, match="rows of 48 values.*Q8_0"):
        gguf_bytes_estimate(smollm2_config(hidden_size=48, num_attention_heads=3), "Q8_0")


def test_layers_that_fit_is_monotone_and_tight():
    config = smollm2_config()
    budgets = [0, *range(20_000_000, 200_000_001, 5_000_000)]
    fits = [layers_that_fit(config, b, 2048, "Q4_K_M") for b in budgets]
    assert fits == sorted(fits) and fits[0] == 0 and fits[-1] == 30
    assert len(set(fits)) > 10
    budget = 80_000_000
    n = layers_that_fit(config, budget, 2048, "Q4_K_M")

    def total(k):
        sized = with_layers(config, k)
        return gguf_bytes_estimate(sized, "Q4_K_M") + kv_cache_bytes(sized, 2048)

    assert 0 < n < 30 and total(n) <= budget < total(n + 1)


def test_with_layers_copies():
    config = smollm2_config()
    fewer = with_layers(config, 12)
    assert (fewer.num_hidden_layers, config.num_hidden_layers) == (12, 30)
    assert param_count(config) - param_count(fewer) == 18 * (
        param_count(with_layers(config, 1)) - param_count(with_layers(config, 0))
    )


# --- the estimate against llama.cpp's own quantizer ------------------------------------------

LLAMA_FTYPES = {
    "F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q5_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
}


def llama_quantize(src, dst, quant: str, prune: list[int] = ()) -> int:
    """Run llama.cpp's quantizer; returns the output file's size."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[quant]
    params.allow_requantize = True
    params.nthread = 2
    if prune:
        layers = (ctypes.c_int32 * (len(prune) + 1))(*prune, -1)
        params.prune_layers = ctypes.cast(layers, ctypes.POINTER(ctypes.c_int32))
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0
    return dst.stat().st_size


def write_random_f16_gguf(path, config: LlamaConfig) -> None:
    """A Llama GGUF with random F16 weights and F32 norms, shaped like `config` (no tokenizer)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    rng = np.random.default_rng(0)

    def add(name, *torch_shape):
        dtype = np.float16 if len(torch_shape) == 2 else np.float32
        writer.add_tensor(name, rng.standard_normal(torch_shape).astype(dtype))

    add("token_embd.weight", config.vocab_size, hidden)
    add("output_norm.weight", hidden)
    if not config.tie_word_embeddings:
        add("output.weight", config.vocab_size, hidden)
    for i in range(config.num_hidden_layers):
        add(f"blk.{i}.attn_norm.weight", hidden)
        add(f"blk.{i}.attn_q.weight", hidden, hidden)
        add(f"blk.{i}.attn_k.weight", kv, hidden)
        add(f"blk.{i}.attn_v.weight", kv, hidden)
        add(f"blk.{i}.attn_output.weight", hidden, hidden)
        add(f"blk.{i}.ffn_norm.weight", hidden)
        add(f"blk.{i}.ffn_gate.weight", inter, hidden)
        add(f"blk.{i}.ffn_up.weight", inter, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, inter)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    "shape",
    [
        dict(
            hidden_size=256, intermediate_size=512, num_hidden_layers=8, tie_word_embeddings=False
        ),
        dict(hidden_size=96, intermediate_size=256, num_hidden_layers=9, tie_word_embeddings=True),
    ],
    ids=["k-quant-rows-untied", "fallback-rows-tied"],
)
def test_gguf_estimate_matches_llama_cpp_on_tiny_models(tmp_path, shape):
    """Every tensor's type decides the size: the estimate's differences between quant types
    equal those of the files llama.cpp writes (same header in each)."""
    config = LlamaConfig(vocab_size=512, num_attention_heads=4, num_key_value_heads=2, **shape)
    write_random_f16_gguf(tmp_path / "src.gguf", config)
    real = {
        q: llama_quantize(tmp_path / "src.gguf", tmp_path / f"{q}.gguf", q) for q in LLAMA_FTYPES
    }
    for q in ("Q8_0", "Q4_K_M", "Q5_K_M"):
        estimated = gguf_bytes_estimate(config, q) - gguf_bytes_estimate(config, "F16")
        assert estimated == real[q] - real["F16"], q


# --- the real embedded teacher (slow) --------------------------------------------------------


@pytest.fixture(scope="module")
def embedded():
    return resolve_source("embedded", role="teacher")


@pytest.mark.slow
def test_load_embedded_teacher(embedded):
    config = load_config(embedded)
    model = load_model(embedded)
    assert (config.num_hidden_layers, config.hidden_size, config.tie_word_embeddings) == (
        30,
        576,
        True,
    )
    assert sum(p.numel() for p in model.parameters()) == param_count(config) == 134_515_008
    assert not model.training


@pytest.mark.slow
def test_embedded_tokenizer_matches_llama_cpp(embedded):
    """The GGUF's own special tokens and add_bos_token, and llama.cpp's token ids."""
    tok = load_tokenizer(embedded)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    runtime = llama_cpp.Llama(str(embedded.path), vocab_only=True, verbose=False)
    for text in [
        "Hello world",
        "def f(x):\n    return x * 2",
        "naïve café 🙂",
        "<|im_start|>user\nHi<|im_end|>\n",
    ]:
        assert tok(text).input_ids == runtime.tokenize(text.encode(), add_bos=False, special=True)


@pytest.mark.slow
def test_gguf_estimate_matches_llama_cpp_on_smollm2(tmp_path, embedded):
    """llama.cpp requantizes the embedded Q4_1 file; the estimate must match every quant type."""
    config = load_config(embedded)
    real = {q: llama_quantize(embedded.path, tmp_path / f"{q}.gguf", q) for q in LLAMA_FTYPES}
    for q, size in real.items():
        assert abs(gguf_bytes_estimate(config, q) - size) <= 8192, q  # metadata allowance only
        assert (
            gguf_bytes_estimate(config, q) - gguf_bytes_estimate(config, "F16")
            == size - real["F16"]
        )
    # A natively 20-layer file (llama.cpp's prune keeps the old layer count for ffn_down's rule,
    # so prune to F16 first, then quantize the 20-layer file).
    f16 = llama_quantize(embedded.path, tmp_path / "p-f16.gguf", "F16", list(range(9, 19)))
    q4 = llama_quantize(tmp_path / "p-f16.gguf", tmp_path / "p-q4.gguf", "Q4_K_M")
    pruned = with_layers(config, 20)
    assert gguf_bytes_estimate(pruned, "Q4_K_M") - gguf_bytes_estimate(pruned, "F16") == q4 - f16


def _cut(src, dst, keep: int):
    with open(src, "rb") as f:
        dst.write_bytes(f.read(keep))
    return dst


@pytest.mark.parametrize("damage", ["truncate", "garbage header"])
def test_broken_safetensors_is_a_clear_error(tmp_path, tiny_teacher_dir, damage):
    folder = tmp_path / "t"
    shutil.copytree(tiny_teacher_dir, folder)
    weights = folder / "model.safetensors"
    if damage == "truncate":
        _cut(tiny_teacher_dir / "model.safetensors", weights, weights.stat().st_size - 100)
    else:
        weights.write_bytes((10**9).to_bytes(8, "little") + b"{not json")
    src = resolve_source(str(folder), role="teacher")
    pattern = rf"teacher weights {re.escape(str(weights))} is truncated or malformed"
    with pytest.raises(EdgekdError, match=pattern):
        check_weights(src, allow_pickle=False, role="teacher")
    with pytest.raises(EdgekdError, match="truncated or malformed"):
        load_model(src)


@pytest.mark.slow
@pytest.mark.parametrize("keep", [3, 5000, "all but 16 bytes"])
def test_broken_gguf_is_a_clear_error(tmp_path, keep):
    src = embedded_teacher_gguf()
    keep = src.stat().st_size - 16 if isinstance(keep, str) else keep
    cut = _cut(src, tmp_path / "cut.gguf", keep)
    source = resolve_source(str(cut), role="teacher")
    with pytest.raises(EdgekdError, match=rf"GGUF file {re.escape(str(cut))} is truncated"):
        load_config(source)


def test_model_that_needs_remote_code_is_refused_and_its_code_never_runs(
    tmp_path, tiny_teacher_dir
):
    folder = tmp_path / "t"
    shutil.copytree(tiny_teacher_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil_llama", auto_map={"AutoConfig": "evil.EvilConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    src = resolve_source(str(folder), role="teacher")
    with pytest.raises(EdgekdError, match="trust_remote_code.*never runs"):
        load_config(src)
    assert not marker.exists()


def test_student_pickle_needs_allow_pickle_from_the_cli(tmp_path, tiny_teacher_dir):
    from edgekd.config import load_recipe

    assert not load_recipe(None, []).student.allow_pickle
    from typer.testing import CliRunner

    from edgekd.cli import app

    folder = tmp_path / "s"
    shutil.copytree(tiny_teacher_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    args = ["build", "--profile", "phone-1gb", "--teacher", str(tiny_teacher_dir), "--stages"]
    args += ["distill", "--set", f"student.source={folder}", "--data", str(tmp_path / "none.jsonl")]
    args += ["--out", str(tmp_path / "run")]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "student folder" in refused.output
    assert "only pickle weights (pytorch_model.bin)" in refused.output
    allowed = CliRunner().invoke(app, [*args, "--allow-pickle"])
    # Past the weights check, preflight stops at the next problem: the missing data file.
    assert allowed.exit_code == 2 and "none.jsonl: no such file" in allowed.output
