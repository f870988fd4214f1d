"""Slicing tiny Llama, Qwen2 and Mistral models: the pruned model computes what its kept weights
compute, loads in transformers as a plain folder, and exports to GGUF and ONNX unchanged."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from edgekd.errors import EdgekdError
from edgekd.formats.gguf import write_gguf
from edgekd.formats.llama_cpp import LlamaCpp
from edgekd.surgery import Keep, Shape, reshaped_config, shape_of, slice_model
from tests.formats.test_gguf import ARCHS, PROSE, parity, save_tiny, torch_logprobs

# hidden 64 -> 32, intermediate 128 -> 64, 4 query heads over 2 KV heads -> 2 (one per group).
CHANNELS = list(range(0, 64, 2))
NEURONS = [list(range(1, 128, 2)), list(range(64))]
HEADS = [[0, 3], [1, 2]]


def _ids():
    return torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_dropped_units_that_carry_nothing_change_nothing(tmp_path, tokenizer, arch):
    """With the dropped neurons' and heads' output weights zeroed, the sliced model's logits are
    the full model's: a slice of the wrong rows or columns would change them."""
    model = save_tiny(tmp_path / "m", arch, tokenizer, tied=arch != "mistral")
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            dropped = [n for n in range(128) if n not in NEURONS[i]]
            layer.mlp.down_proj.weight[:, dropped] = 0
            for h in set(range(4)) - set(HEADS[i]):
                layer.self_attn.o_proj.weight[:, h * 16 : (h + 1) * 16] = 0
    keep = Keep(layers=[0, 1], channels=list(range(64)), neurons=NEURONS, heads=HEADS)
    pruned = slice_model(model, keep)
    assert shape_of(pruned.config) == Shape(2, 64, 64, 2)
    with torch.no_grad():
        assert torch.allclose(pruned(_ids()).logits, model(_ids()).logits, atol=1e-5)


def _hand_built(model, keep: Keep):
    """The reference: a fresh model of the smaller config, each weight indexed by hand."""
    config = model.config
    small = ARCHS[config.model_type][0](
        **{
            **config.to_dict(),
            "hidden_size": len(keep.channels),
            "intermediate_size": len(keep.neurons[0]),
            "num_attention_heads": len(keep.heads[0]),
            "num_hidden_layers": len(keep.layers),
            "head_dim": 16,
            "layer_types": None,
        }
    )
    ref = type(model)(small).eval()
    ch = keep.channels
    with torch.no_grad():
        ref.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight[:, ch])
        ref.model.norm.weight.copy_(model.model.norm.weight[ch])
        if not config.tie_word_embeddings:
            ref.lm_head.weight.copy_(model.lm_head.weight[:, ch])
        for j, i in enumerate(keep.layers):
            a, b = model.model.layers[i], ref.model.layers[j]
            q = [h * 16 + d for h in keep.heads[j] for d in range(16)]
            n = keep.neurons[j]
            b.input_layernorm.weight.copy_(a.input_layernorm.weight[ch])
            b.post_attention_layernorm.weight.copy_(a.post_attention_layernorm.weight[ch])
            b.self_attn.q_proj.weight.copy_(a.self_attn.q_proj.weight[q][:, ch])
            b.self_attn.k_proj.weight.copy_(a.self_attn.k_proj.weight[:, ch])
            b.self_attn.v_proj.weight.copy_(a.self_attn.v_proj.weight[:, ch])
            b.self_attn.o_proj.weight.copy_(a.self_attn.o_proj.weight[ch][:, q])
            if a.self_attn.q_proj.bias is not None:
                b.self_attn.q_proj.bias.copy_(a.self_attn.q_proj.bias[q])
                b.self_attn.k_proj.bias.copy_(a.self_attn.k_proj.bias)
                b.self_attn.v_proj.bias.copy_(a.self_attn.v_proj.bias)
            b.mlp.gate_proj.weight.copy_(a.mlp.gate_proj.weight[n][:, ch])
            b.mlp.up_proj.weight.copy_(a.mlp.up_proj.weight[n][:, ch])
            b.mlp.down_proj.weight.copy_(a.mlp.down_proj.weight[ch][:, n])
    return ref


@pytest.mark.parametrize(("arch", "tied"), [("llama", True), ("qwen2", False), ("mistral", False)])
def test_slice_matches_a_hand_built_reference_and_reloads(tmp_path, tokenizer, arch, tied):
    model = save_tiny(tmp_path / "m", arch, tokenizer, tied=tied)
    keep = Keep(layers=[1], channels=CHANNELS, neurons=NEURONS[:1], heads=HEADS[:1])
    pruned = slice_model(model, keep)
    ref = _hand_built(model, keep)
    with torch.no_grad():
        expected = ref(_ids()).logits
        assert torch.allclose(pruned(_ids()).logits, expected, atol=1e-5)
        # Not the full model's logits: the hidden channels really went.
        assert not torch.allclose(model(_ids()).logits, expected, atol=1e-2)
    assert (pruned.lm_head.weight is pruned.model.embed_tokens.weight) is tied
    pruned.save_pretrained(tmp_path / "pruned")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert type(loaded) is type(model)
    assert (loaded.config.hidden_size, loaded.config.head_dim) == (32, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(_ids()).logits, expected, atol=1e-5)


def test_reshaped_config_keeps_head_dim_and_kv_heads(tmp_path, tokenizer):
    model = save_tiny(tmp_path / "m", "llama", tokenizer)
    config = reshaped_config(model.config, Shape(1, 32, 64, 2))
    assert (config.head_dim, config.num_key_value_heads, config.num_hidden_layers) == (16, 2, 1)
    assert model.config.hidden_size == 64  # a copy


def test_refuses_heads_not_even_per_group(tmp_path, tokenizer):
    model = save_tiny(tmp_path / "m", "llama", tokenizer)
    with pytest.raises(EdgekdError, match="not kept evenly per key/value group"):
        slice_model(model, Keep([0], list(range(64)), [list(range(128))], [[0, 1]]))
    with pytest.raises(EdgekdError, match="do not divide evenly over 2 key/value heads"):
        slice_model(model, Keep([0], list(range(64)), [list(range(128))], [[0, 1, 2]]))


@pytest.fixture(scope="module")
def pruned_dirs(tmp_path_factory, tokenizer):
    """Each architecture's tiny model with width pruned on every axis, saved as a plain folder."""
    root = tmp_path_factory.mktemp("pruned")
    out = {}
    for arch, tied in (("llama", True), ("qwen2", False), ("mistral", False)):
        model = save_tiny(root / f"{arch}-full", arch, tokenizer, tied=tied)
        keep = Keep(layers=[0, 1], channels=CHANNELS, neurons=NEURONS, heads=HEADS)
        pruned = slice_model(model, keep)
        pruned.save_pretrained(root / arch)
        tokenizer.save_pretrained(root / arch)
        (root / arch / "tokenizer.model").unlink(missing_ok=True)
        out[arch] = (pruned, root / arch)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_pruned_model_matches_itself_in_llama_cpp(pruned_dirs, tokenizer, arch):
    model, folder = pruned_dirs[arch]
    out = write_gguf(folder, folder.parent / f"{arch}.gguf", dtype="F32")
    seqs = [tokenizer(PROSE)["input_ids"]]
    kld, top1 = parity(LlamaCpp(out, threads=2).logprobs(seqs), torch_logprobs(model, seqs), seqs)
    assert kld < 1e-4
    assert top1 == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_pruned_model_matches_itself_in_onnxruntime(pruned_dirs, tokenizer, arch):
    from edgekd.formats.onnx import export_onnx
    from edgekd.formats.ort import Ort

    model, folder = pruned_dirs[arch]
    onnx_dir = export_onnx(folder, folder.parent / f"{arch}-onnx")
    seqs = [tokenizer(PROSE)["input_ids"]]
    ref = torch_logprobs(model, seqs)
    got = Ort(onnx_dir, threads=2).logprobs(seqs)
    assert max((g - r).abs().max().item() for g, r in zip(got, ref, strict=True)) < 1e-3
