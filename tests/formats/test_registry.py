"""The registry and the runtime interface: which runtime a path needs, and every registered
runtime doing all the interface asks on one tiny model."""

import inspect

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from edgekd.errors import EdgekdError
from edgekd.evaluate import HeldOut
from edgekd.formats.gguf import write_gguf
from edgekd.formats.registry import RUNTIMES, open_runtime, runtime_class, runtime_of
from edgekd.formats.runtime import (
    Runtime,
    cut_at_stop,
    next_token,
    prompt_rng,
    score_continuation,
    scoring_context,
)
from edgekd.models import param_count
from edgekd.testing import TOKEN_IDS as SEQ
from edgekd.testing import tiny_llama_config


def test_runtime_of(tiny_llama_gguf, tmp_path):
    folder, gguf_path = tiny_llama_gguf
    assert runtime_of(gguf_path) == "llama.cpp"
    assert runtime_of(folder) == "torch"
    onnx = tmp_path / "onnx"
    onnx.mkdir()
    (onnx / "model.onnx").write_bytes(b"")
    (onnx / "config.json").write_text("{}")
    assert runtime_of(onnx) == "onnxruntime"
    (onnx / "genai_config.json").write_text("{}")
    assert runtime_of(onnx) == "onnxruntime-genai"
    with pytest.raises(EdgekdError, match="neither a .gguf"):
        runtime_of(tmp_path)
    with pytest.raises(EdgekdError, match="unknown runtime 'tflite'"):
        runtime_class("tflite")


@pytest.mark.parametrize("name", list(RUNTIMES))
def test_every_runtime_implements_the_whole_interface(name):
    cls = RUNTIMES[name]
    assert issubclass(cls, Runtime) and cls.name == name
    assert not inspect.isabstract(cls), sorted(cls.__abstractmethods__)
    generate = inspect.signature(cls.generate).parameters
    assert list(generate) == list(inspect.signature(Runtime.generate).parameters)


def test_small_shared_rules():
    assert scoring_context([[1, 2, 3], [1] * 10]) == 18
    logits = np.array([0.0, 3.0, 1.0], dtype=np.float32)
    assert next_token(logits, 0.0, prompt_rng(0, 0)) == 1
    draws = [next_token(logits, 1.0, prompt_rng(7, i)) for i in range(20)]
    assert draws == [next_token(logits, 1.0, prompt_rng(7, i)) for i in range(20)]
    assert len(set(draws)) > 1


def test_continuation_scores_and_stop_strings():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    scored = score_continuation(logits, [1, 0])
    expected = logits.log_softmax(-1)[0, 1] + logits.log_softmax(-1)[1, 0]
    assert scored.logprob == pytest.approx(float(expected)) and scored.greedy
    assert not score_continuation(logits, [2, 0]).greedy
    assert cut_at_stop("Paris.\nQuestion: x", ["Question:", "\n"]) == ("Paris.", True)
    assert cut_at_stop("Paris", ["", "\n"]) == ("Paris", False)


@pytest.mark.slow
def test_untied_embedding_is_only_looked_up(tmp_path, tokenizer):
    config = tiny_llama_config(tokenizer, num_layers=1)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").unlink(missing_ok=True)
    embedding = 4 * config.vocab_size * config.hidden_size
    cost = runtime_class("torch").token_cost(tmp_path)
    assert cost.weights_read_bytes == 4 * param_count(config) - embedding
    gguf_path = write_gguf(tmp_path, tmp_path / "m.gguf", dtype="F32")
    cost = runtime_class("llama.cpp").token_cost(gguf_path)
    assert cost.weights_read_bytes == 4 * param_count(config) - embedding


@pytest.fixture(scope="module")
def every_runtime(tiny_llama_gguf, tiny_onnx, tmp_path_factory):
    """The tiny model in each registered runtime's format."""
    from edgekd.formats.onnx import build_genai

    folder, gguf_path = tiny_llama_gguf
    genai = build_genai(folder, tmp_path_factory.mktemp("tiny-genai") / "genai", precision="fp32")
    paths = {"torch": folder, "llama.cpp": gguf_path, "onnxruntime": tiny_onnx}
    paths["onnxruntime-genai"] = genai
    assert set(paths) == set(RUNTIMES), "a registered runtime has no model in this test"
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNTIMES))
def test_every_runtime_runs_a_tiny_model(every_runtime, tokenizer, name):
    path = every_runtime[name]
    assert runtime_of(path) == name
    runtime = open_runtime(path, threads=1, n_ctx=64)
    assert runtime.tokenize(["Hello world"]) == [tokenizer("Hello world")["input_ids"]]
    vocab = len(tokenizer)
    logits = runtime.logits([SEQ, SEQ[:5]])
    assert [tuple(x.shape) for x in logits] == [(len(SEQ), vocab), (5, vocab)]
    assert all(x.dtype == torch.float32 for x in logits)
    logprobs = runtime.logprobs([SEQ])[0]
    assert torch.allclose(logprobs.exp().sum(-1), torch.ones(len(SEQ)), atol=1e-4)
    positions = torch.tensor([3, 7])
    heldout = HeldOut([SEQ], [positions], [torch.tensor(SEQ)[positions + 1]])
    picked = runtime.heldout_logprobs(heldout)[0]
    assert picked.shape == (2, vocab)
    assert torch.allclose(picked, logprobs[positions], atol=1e-3)
    chats = [[{"role": "user", "content": "Hi"}]]
    replies = runtime.chat(chats, max_tokens=3)
    assert len(replies) == 1 and isinstance(replies[0], str)
    answers = runtime.generate(chats, max_tokens=3, temperature=0.0, seed=0, parallel=1)
    assert len(answers) == 1 and isinstance(answers[0], str)
    runtime.load()
    token = runtime.first(SEQ)
    assert isinstance(token, int) and isinstance(runtime.next(token), int)
    assert all(f.is_file() for f in runtime.weight_files(path))
    cost = runtime.token_cost(path)
    assert cost.weights_bytes > 0 and cost.weights_read_bytes > 0
    assert cost.kv_bytes_per_position > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNTIMES))
def test_every_runtime_scores_continuations_and_completes_raw_prompts(
    every_runtime, tokenizer, name
):
    """What the harness backend asks of a runtime: a continuation's log-prob from its own
    full-vocabulary scores, greedy text after a raw prompt cut at a stop string, its begin and
    end tokens, its chat template as text."""
    runtime = open_runtime(every_runtime[name], threads=1, n_ctx=64)
    logprobs = runtime.logprobs([SEQ[:-1]])[0]
    requests = [(SEQ, 5), (SEQ[:8], 1), (SEQ[:8], 7)]
    for (ids, start), got in zip(requests, runtime.continuations(requests), strict=True):
        want = sum(float(logprobs[i - 1, ids[i]]) for i in range(start, len(ids)))
        assert got.logprob == pytest.approx(want, abs=1e-3)
        greedy = all(int(logprobs[i - 1].argmax()) == ids[i] for i in range(start, len(ids)))
        assert got.greedy == greedy
    [full] = runtime.complete([SEQ], max_tokens=6, stop=[])
    assert isinstance(full, str)
    stop = full.strip()[1:3]
    if stop:
        [cut] = runtime.complete([SEQ], max_tokens=6, stop=[stop])
        assert cut == full[: full.find(stop)]
    specials = runtime.specials()
    assert (specials.bos_id, specials.eos_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert specials.eos_text == tokenizer.eos_token
    text = runtime.chat_text([{"role": "user", "content": "Hi"}])
    assert "Hi" in text and text.startswith("<|im_start|>")
