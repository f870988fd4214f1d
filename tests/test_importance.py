"""Minitron's activation importance: the aggregation by hand, and scores that see what a model
cannot use."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edgekd.importance import aggregate, measure, top


def test_aggregate_is_batch_l2_then_sequence_mean():
    act = torch.tensor([[[3.0, 1.0], [0.0, 2.0]], [[4.0, 1.0], [5.0, 0.0]]])  # [2, 2, 2]
    # position 0: sqrt(9+16)=5, sqrt(1+1); position 1: sqrt(0+25)=5, sqrt(4+0)=2
    expected = torch.tensor([(5 + 5) / 2, (2**0.5 + 2) / 2])
    assert torch.allclose(aggregate(act), expected)


def test_aggregate_ignores_padding():
    act = torch.tensor([[[3.0], [100.0]], [[4.0], [100.0]]])
    mask = torch.tensor([[1, 0], [1, 0]])
    assert aggregate(act, mask).item() == pytest.approx(5.0)
    # A position one sequence pads still counts the other's token alone.
    mask = torch.tensor([[1, 1], [1, 0]])
    assert aggregate(act, mask).item() == pytest.approx((5.0 + 100.0) / 2)


def test_top_keeps_index_order_and_breaks_ties_low():
    assert top(torch.tensor([0.1, 0.9, 0.5, 0.9]), 2) == [1, 3]
    assert top(torch.tensor([1.0, 1.0, 1.0]), 2) == [0, 1]


def test_scores_are_zero_for_units_that_carry_nothing():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[5] = 0  # neuron 5 of layer 0 is always 0
        model.model.layers[1].self_attn.v_proj.weight[8:16] = 0  # KV group 1: heads 2 and 3
        for layer in model.model.layers:  # channel 7 normalized to 0 everywhere
            layer.input_layernorm.weight[7] = 0
            layer.post_attention_layernorm.weight[7] = 0
    batches = [
        {"input_ids": torch.randint(0, 64, (2, 9))},
        {"input_ids": torch.randint(0, 64, (3, 5))},
    ]
    scores = measure(model, batches)
    assert scores.neurons[0][5] == 0 and (scores.neurons[0].count_nonzero() == 47)
    assert scores.neurons[1].count_nonzero() == 48
    assert scores.heads[1][2:].tolist() == [0, 0] and (scores.heads[1][:2] > 0).all()
    assert (scores.heads[0] > 0).all()
    assert scores.channels[7] == 0 and scores.channels.count_nonzero() == 31
    assert 7 not in top(scores.channels, 31) and 5 not in top(scores.neurons[0], 47)
