"""Speculative decoding with a draft model: the accepted prefix, the output equals the target's
greedy text, and acceptance is total for a draft identical to the target."""

import pytest
import torch
from transformers import LlamaForCausalLM

from edgekd.evaluate import HeldOut
from edgekd.speculative import (
    greedy_acceptance,
    heldout_prompts,
    speculative_decode,
)
from edgekd.testing import tiny_llama_config
from edgekd.tokens import common_prefix


def _model(tokenizer, seed, layers=2):
    torch.manual_seed(seed)
    config = tiny_llama_config(tokenizer, num_layers=layers)
    config.tie_word_embeddings = False  # a random tied model only repeats its last token
    return LlamaForCausalLM(config).eval()


def test_accepted_prefix():
    assert common_prefix([1, 2, 3, 4], [1, 2, 9, 4, 5]) == 2
    assert common_prefix([1, 2, 3, 4], [1, 2, 3, 4, 5]) == 4
    assert common_prefix([7, 2], [1, 2, 3]) == 0


def test_heldout_prompts_cut_before_the_first_scored_token():
    heldout = HeldOut(
        [[1, 2, 3, 4, 5], [6, 7, 8, 9]],
        [torch.tensor([2, 3]), torch.tensor([0, 1, 2])],
        [torch.tensor([4, 5]), torch.tensor([7, 8, 9])],
    )
    assert heldout_prompts(heldout, 5) == [[1, 2, 3], [6, 7]]
    assert heldout_prompts(heldout, 1) == [[1, 2, 3]]


def test_output_is_the_targets_greedy_text(tokenizer):
    draft, target = _model(tokenizer, 1), _model(tokenizer, 2, layers=3)
    target.generation_config.eos_token_id = None  # decode the full length
    prompt = tokenizer("The sky is blue because")["input_ids"]
    tokens, accepted = speculative_decode(draft, target, prompt, draft_len=4, max_new_tokens=12)
    with torch.no_grad():
        ref = target.generate(
            torch.tensor([prompt]), max_new_tokens=len(tokens), do_sample=False, pad_token_id=0
        )
    assert tokens == ref[0, len(prompt) :].tolist()
    assert len(tokens) >= 12 and len(tokens) == sum(accepted) + len(accepted)
    assert all(0 <= n <= 4 for n in accepted)


def test_acceptance_of_itself_is_total_and_of_another_model_lower(tokenizer):
    target = _model(tokenizer, 2)
    target.generation_config.eos_token_id = None
    prompts = [tokenizer(t)["input_ids"] for t in ("Once upon a time", "What is 2 plus 3?")]
    same = greedy_acceptance(target, target, prompts, draft_len=4, max_new_tokens=10)
    assert same["acceptance_rate"] == 1.0 and same["mean_accepted_length"] == 4.0
    assert same["tokens_per_target_forward"] == 5.0 and same["rounds"] == 2 * 2
    other = greedy_acceptance(_model(tokenizer, 3), target, prompts, draft_len=4, max_new_tokens=10)
    assert other["acceptance_rate"] < 1.0
    assert other["mean_accepted_length"] == pytest.approx(4 * other["acceptance_rate"])
    assert other["drafted"] == 4 * other["rounds"]
