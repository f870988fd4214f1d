"""The llama.cpp runtime: its cached token steps, byte counts, the chat prompts of batched
generation, and the teacher's batched generation on the embedded GGUF."""

import pytest
from transformers import LlamaForCausalLM

from edgekd.data import default_prompts
from edgekd.errors import EdgekdError
from edgekd.formats.llama_cpp import LlamaCpp, _chat_prompts, _llama
from edgekd.models import embedded_teacher_gguf, kv_cache_bytes
from tests.formats.conftest import assert_steps_follow_the_full_pass


def test_steps_greedily_with_its_cache(tiny_llama_gguf):
    _, gguf_path = tiny_llama_gguf
    runtime = LlamaCpp(gguf_path, threads=1, n_ctx=64)
    assert_steps_follow_the_full_pass(runtime, lambda seq: runtime.logprobs([seq])[0])


def test_token_cost(tiny_llama_gguf):
    folder, gguf_path = tiny_llama_gguf
    model = LlamaForCausalLM.from_pretrained(folder)
    # F16 matrices and F32 norms, tied embedding read whole (it is the output matrix too)
    expected = sum(p.numel() * (2 if p.dim() == 2 else 4) for p in model.parameters())
    cost = LlamaCpp.token_cost(gguf_path)
    assert cost.weights_read_bytes == expected
    assert cost.weights_bytes == gguf_path.stat().st_size > expected
    assert cost.kv_bytes_per_position == kv_cache_bytes(model.config, 1, bytes_per_value=2)
    assert LlamaCpp.weight_files(gguf_path) == [gguf_path]


def _llm(**kw):
    # One thread: OpenMP threads that busy-wait on shared cores made these tests 5x slower.
    return _llama(embedded_teacher_gguf(), n_threads=1, **kw)


def test_chat_prompt_ids_match_create_chat_completion():
    llm = _llm(vocab_only=True)
    fed = []

    class Fed(Exception):
        pass

    def record(tokens, *args, **kwargs):  # the ids create_chat_completion hands to the model
        fed.append(list(tokens))
        raise Fed

    llm.generate = record
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Explain <b>tags</b> & café, 2+2=?\n\nThanks"}],
    ]
    for messages in conversations:
        with pytest.raises(Fed):
            llm.create_chat_completion(messages, max_tokens=1)
    ids = _chat_prompts(_llm(vocab_only=True), embedded_teacher_gguf(), conversations)
    assert ids == fed
    assert (
        llm.detokenize(ids[0], special=True)
        .decode()
        .endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    )


def test_refuses_beam_search_and_a_missing_file(tmp_path):
    chat = [[{"role": "user", "content": "Hi"}]]
    kw = {"max_tokens": 2, "temperature": 0.0, "seed": 0, "parallel": 1}
    with pytest.raises(EdgekdError, match="no beam search"):
        LlamaCpp(embedded_teacher_gguf(), threads=1).generate(chat, beams=2, **kw)
    with pytest.raises(EdgekdError, match="not found"):
        LlamaCpp(tmp_path / "missing.gguf", threads=1).generate(chat, **kw)


@pytest.mark.slow
def test_generate_on_the_real_teacher():
    # Five prompts through three slots: finished answers free slots that later prompts reuse.
    conversations = [[{"role": "user", "content": p["prompt"]}] for p in default_prompts()[:5]]
    teacher = LlamaCpp(embedded_teacher_gguf(), threads=1)
    kw = {"max_tokens": 24, "seed": 0, "parallel": 3}
    first = teacher.generate(conversations, temperature=0.0, **kw)
    assert teacher.generate(conversations, temperature=0.0, **kw) == first
    # Reference: the one-prompt-at-a-time path this replaced. Batches of other sizes add the
    # same logits in another order, so a near-tie can flip a later token: most answers must be
    # identical, and every one must start the same way.
    llm = _llm(n_ctx=512)
    identical = 0
    for messages, ours in zip(conversations, first, strict=True):
        out = llm.create_chat_completion(messages, max_tokens=24, temperature=0.0)
        reply = out["choices"][0]["message"]["content"].strip()
        assert reply
        identical += ours.strip() == reply
        assert ours.split()[:5] == reply.split()[:5], (ours, reply)
    assert identical >= len(conversations) - 1
    sampled = teacher.generate(conversations, temperature=1.0, **kw)
    assert sampled == teacher.generate(conversations, temperature=1.0, **kw)
    assert sampled != first
