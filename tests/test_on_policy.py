"""On-policy batches and self-distillation: which batches are sampled, what a sampled example
holds, the frozen copy and the sharpened targets."""

import torch
from transformers import LlamaForCausalLM

from edgekd.config import DistillSettings, OnPolicySettings, QLoraSettings, SelfDistillSettings
from edgekd.data import IGNORE, TokenizedExample
from edgekd.on_policy import (
    is_on_policy,
    prompt_part,
    sampled_examples,
    teacher_targets,
    training_examples,
    training_teacher,
)
from edgekd.testing import tiny_llama_config


def _model(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = tiny_llama_config(tokenizer)
    config.tie_word_embeddings = False
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # peaked distributions: near-uniform ones give the same samples
        model.lm_head.weight.mul_(50)
    return model


def _chat(prompt_len, answer_len):
    ids = list(range(10, 10 + prompt_len + answer_len))
    return TokenizedExample(ids, [IGNORE] * prompt_len + ids[prompt_len:])


def test_on_policy_share_is_close_and_repeatable():
    chosen = [is_on_policy(0.3, 0, m) for m in range(2000)]
    assert abs(sum(chosen) / 2000 - 0.3) < 0.04
    assert chosen == [is_on_policy(0.3, 0, m) for m in range(2000)]
    assert chosen != [is_on_policy(0.3, 1, m) for m in range(2000)]
    assert not any(is_on_policy(0.0, 0, m) for m in range(50))
    assert all(is_on_policy(1.0, 0, m) for m in range(50))


def test_prompt_part():
    assert prompt_part(_chat(5, 3)) == [10, 11, 12, 13, 14]
    text = TokenizedExample([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6])
    assert prompt_part(text) == [1, 2, 3]


def test_sampled_examples_keep_the_prompt_and_target_only_the_sample(tokenizer):
    model = _model(tokenizer)
    model.generation_config.eos_token_id = None
    examples = [_chat(5, 3), _chat(8, 2)]
    kw = {"temperature": 1.0, "max_tokens": 6, "max_len": 20, "pad_id": 0}
    out = sampled_examples(model, examples, seed=3, **kw)
    for ex, new in zip(examples, out, strict=True):
        prompt = prompt_part(ex)
        assert new.input_ids[: len(prompt)] == prompt and len(new.input_ids) == len(prompt) + 6
        assert new.labels == [IGNORE] * len(prompt) + new.input_ids[len(prompt) :]
    assert sampled_examples(model, examples, seed=3, **kw) == out
    assert sampled_examples(model, examples, seed=4, **kw) != out
    # No room left for a sample under max_len: the examples are used as they are.
    assert sampled_examples(model, examples, seed=3, **{**kw, "max_len": 8}) is examples


def test_samples_end_at_the_end_token(tokenizer):
    model = _model(tokenizer)
    first = sampled_examples(
        model, [_chat(5, 3)], temperature=1.0, max_tokens=6, max_len=20, pad_id=0, seed=3
    )[0]
    end = first.input_ids[6]  # the second sampled token becomes the end token
    model.generation_config.eos_token_id = end
    again = sampled_examples(
        model, [_chat(5, 3)], temperature=1.0, max_tokens=6, max_len=20, pad_id=0, seed=3
    )[0]
    assert again.input_ids == first.input_ids[: first.input_ids.index(end) + 1]


def test_self_distillation_teacher_is_a_frozen_copy_with_sharper_targets(tokenizer):
    student = _model(tokenizer)
    settings = DistillSettings(
        self_distill=SelfDistillSettings(enabled=True, target_temperature=0.5)
    )
    teacher = training_teacher(lambda: None, student, settings)
    assert teacher is not student and not any(p.requires_grad for p in teacher.parameters())
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(teacher(input_ids=ids).logits, student(input_ids=ids).logits)
    with torch.no_grad():
        next(student.parameters()).add_(1.0)
    assert not torch.equal(next(teacher.parameters()), next(student.parameters()))
    logits = torch.randn(2, 5)
    torch.testing.assert_close(teacher_targets(logits, settings), logits * 2)
    # Without self-distillation the loaded teacher scores, unchanged.
    plain = QLoraSettings()
    assert training_teacher(lambda: "teacher", student, plain) == "teacher"
    assert teacher_targets(logits, plain) is logits


def test_training_examples_pick_the_sampling_model(tokenizer):
    student, frozen = _model(tokenizer, 0), _model(tokenizer, 1)
    for m in (student, frozen):
        m.generation_config.eos_token_id = None
    examples = [_chat(5, 3), _chat(6, 3)]
    kw = {"student": student, "teacher": frozen, "micro_step": 0, "max_len": 20, "pad_id": 0}
    same, sampled = training_examples(examples, DistillSettings(), **kw)
    assert same is examples and not sampled
    on = DistillSettings(on_policy=OnPolicySettings(fraction=1.0, max_tokens=4))
    by_student, sampled = training_examples(examples, on, **kw)
    assert sampled and all(
        len(e.input_ids) == len(prompt_part(x)) + 4
        for e, x in zip(by_student, examples, strict=True)
    )
    self = DistillSettings(
        self_distill=SelfDistillSettings(enabled=True), on_policy=OnPolicySettings(max_tokens=4)
    )
    by_frozen, sampled = training_examples(examples, self, **kw)
    assert sampled and by_frozen != by_student
    expected = sampled_examples(
        frozen, examples, temperature=1.5, max_tokens=4, max_len=20, pad_id=0, seed=0
    )
    assert by_frozen == expected
