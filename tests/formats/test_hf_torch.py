"""The torch runtime: its cached token steps, byte counts, and batched generate() (greedy,
sampling options, beam search)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edgekd.formats.hf_torch import HfTorch, decoding_options
from edgekd.models import kv_cache_bytes, param_count
from edgekd.testing import tiny_llama_config
from tests.formats.conftest import assert_steps_follow_the_full_pass


def test_steps_greedily_with_its_cache(tiny_llama_gguf):
    runtime = HfTorch(tiny_llama_gguf[0], threads=1, n_ctx=64)

    def full(seq):
        with torch.no_grad():
            return runtime.model(torch.tensor([seq])).logits[0].log_softmax(-1)

    assert_steps_follow_the_full_pass(runtime, full)


def test_token_cost(tiny_llama_gguf):
    folder, _ = tiny_llama_gguf
    config = LlamaForCausalLM.from_pretrained(folder).config
    cost = HfTorch.token_cost(folder)
    assert cost.weights_read_bytes == 4 * param_count(config)
    assert cost.kv_bytes_per_position == kv_cache_bytes(config, 1, bytes_per_value=4)
    assert cost.read_per_token(10) == cost.weights_read_bytes + 10 * cost.kv_bytes_per_position
    assert [f.name for f in HfTorch.weight_files(folder)] == ["model.safetensors"]


def test_decoding_options():
    with pytest.raises(ValueError, match="do not mix"):
        decoding_options(temperature=0.5, num_beams=2)
    assert decoding_options(temperature=0.0, num_beams=3)["num_beams"] == 3


def _untied(tokenizer, seed: int):
    # Untied embeddings: a random tied model just repeats its last input token ("\n").
    config = tiny_llama_config(tokenizer)
    config.tie_word_embeddings = False
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def test_generate_batches_like_single(tokenizer):
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    runtime = HfTorch.from_model(LlamaForCausalLM(config).eval(), tokenizer)
    chats = [
        [{"role": "user", "content": p}]
        for p in ("Hi", "What is the capital of France?", "List three colors.")
    ]
    kw = {"max_tokens": 4, "seed": 0, "temperature": 0.0}
    batched = runtime.generate(chats, parallel=3, **kw)
    assert runtime.generate(chats, parallel=1, **kw) == batched
    assert runtime.chat(chats, max_tokens=4) == [a.strip() for a in batched]
    # Reference: one unpadded greedy generate per prompt.
    for messages, ours in zip(chats, batched, strict=True):
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt"
        )
        out = runtime.model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        assert reply and ours.strip() == reply
    assert len({a.strip() for a in batched}) == 3


def test_beam_search_matches_generate(tokenizer):
    model = _untied(tokenizer, seed=0)
    chats = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "What is the capital of France?"}],
    ]
    kw = {"max_tokens": 5, "seed": 0, "temperature": 0.0, "parallel": 1}
    beam = HfTorch.from_model(model, tokenizer).generate(chats, beams=3, **kw)
    for messages, ours in zip(chats, beam, strict=True):
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt"
        )
        out = model.generate(
            ids, max_new_tokens=5, do_sample=False, num_beams=3, pad_token_id=0, top_k=None
        )
        reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        assert ours.strip() == reply
