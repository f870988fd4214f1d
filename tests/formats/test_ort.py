"""The onnxruntime runtime: its cached token steps, byte counts and seeded sampling."""

import pytest
from transformers import AutoConfig

from edgekd.errors import EdgekdError
from edgekd.formats.ort import Ort
from edgekd.models import kv_cache_bytes, param_count
from tests.formats.conftest import assert_steps_follow_the_full_pass


@pytest.mark.slow
def test_steps_greedily_with_its_cache(tiny_onnx):
    runtime = Ort(tiny_onnx, threads=1, n_ctx=64)
    assert_steps_follow_the_full_pass(runtime, lambda seq: runtime.logprobs([seq])[0])


@pytest.mark.slow
def test_token_cost(tiny_llama_gguf, tiny_onnx):
    cost = Ort.token_cost(tiny_onnx)
    config = AutoConfig.from_pretrained(tiny_llama_gguf[0])
    assert cost.kv_bytes_per_position == kv_cache_bytes(config, 1, bytes_per_value=4)
    # fp32 weights, the tied embedding read whole: every parameter once (less the identical
    # all-ones norm weights of a fresh model, which the exporter stores once)
    assert cost.weights_read_bytes == pytest.approx(4 * param_count(config), rel=1e-3)
    assert [f.name for f in Ort.weight_files(tiny_onnx)] == ["model.onnx"]


@pytest.mark.slow
def test_generate_greedy_is_chat_and_sampling_is_seeded(tiny_onnx):
    runtime = Ort(tiny_onnx, threads=1)
    chats = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "2+2?"}]]
    kw = {"max_tokens": 6, "parallel": 2}
    assert runtime.generate(chats, temperature=0.0, seed=0, **kw) == runtime.chat(
        chats, max_tokens=6
    )
    sampled = runtime.generate(chats, temperature=1.0, seed=3, **kw)
    assert runtime.generate(chats, temperature=1.0, seed=3, **kw) == sampled
    with pytest.raises(EdgekdError, match="no beam search"):
        runtime.generate(chats, temperature=0.0, seed=0, beams=2, **kw)
