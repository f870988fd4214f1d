import math

import pytest
import torch
from transformers import LlamaForCausalLM

from edgekd.config import TrainSettings
from edgekd.feature_kd import (
    MethodLosses,
    Projections,
    attention_loss,
    feature_loss,
    group_heads,
    layer_pairs,
    pooled,
    relation_loss,
    value_relation,
    value_relation_loss,
)
from edgekd.testing import tiny_llama_config


def test_layer_pairs_uniform_last_k_and_explicit():
    assert layer_pairs(2, 4, "uniform", 1) == [(1, 2), (2, 4)]
    assert layer_pairs(3, 5, "uniform", 1) == [(1, 1), (2, 3), (3, 5)]
    assert layer_pairs(4, 2, "uniform", 1) == [(1, 1), (2, 1), (3, 1), (4, 2)]
    assert layer_pairs(3, 8, "last_k", 2) == [(2, 7), (3, 8)]
    assert layer_pairs(3, 8, {3: 8, 1: 2}, 1) == [(1, 2), (3, 8)]
    with pytest.raises(ValueError, match="last_k=4"):
        layer_pairs(3, 8, "last_k", 4)
    with pytest.raises(ValueError, match="out of range"):
        layer_pairs(3, 8, {4: 8}, 1)


def test_feature_loss_mse_and_cosine_skip_padding():
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])
    t = torch.tensor([[[0.0, 0.0], [0.0, 1.0], [-9.0, 5.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the last position is padding
    # mse: token 0 (1 + 0) / 2 = 0.5, token 1 (0 + 1) / 2 = 0.5
    assert feature_loss([s], [t], mask, "mse").item() == pytest.approx(0.5)
    # cosine: token 0 has a zero teacher vector (cos 0 by the eps convention), token 1 cos 1
    assert feature_loss([s], [t], mask, "cosine").item() == pytest.approx(0.5)
    # Two layer pairs are averaged.
    assert feature_loss([s, t], [t, t], mask, "mse").item() == pytest.approx(0.25)


def test_projections_map_widths_and_train():
    proj = Projections(2, 3, 5)
    out = proj([torch.ones(1, 2, 3), torch.ones(1, 2, 3)])
    assert [o.shape for o in out] == [torch.Size([1, 2, 5])] * 2
    same = Projections(2, 4, 4)
    assert not list(same.parameters())
    x = torch.randn(1, 2, 4)
    assert same([x, x])[0] is x
    # Gradients reach the projection through the feature loss.
    loss = feature_loss(out, [torch.zeros(1, 2, 5)] * 2, torch.ones(1, 2), "mse")
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())


def test_attention_loss_hand_computed_with_grouped_heads():
    # One query row that is real, one that is padding; 2 student heads vs 4 teacher heads.
    q = torch.tensor([0.5, 0.5])
    p1, p2 = torch.tensor([0.9, 0.1]), torch.tensor([0.5, 0.5])
    student = torch.stack([q, q]).expand(1, 2, 2, 2).clone()  # [B, H, L, L]
    student[0, :, 1] = torch.tensor([0.3, 0.7])  # the padding row: must not count
    teacher = torch.stack([p1, p2, p1, p1]).view(1, 4, 1, 2).expand(1, 4, 2, 2).clone()
    mask = torch.tensor([[1, 0]])
    g = group_heads(teacher, 2)
    assert torch.allclose(g[0, 0, 0], (p1 + p2) / 2) and torch.allclose(g[0, 1, 0], p1)

    def kl(p, q):
        return float((p * (p / q).log()).sum())

    want = (kl((p1 + p2) / 2, q) + kl(p1, q)) / 2
    assert attention_loss([student], [teacher], mask).item() == pytest.approx(want, rel=1e-5)


def test_attention_loss_handles_exact_zeros_of_masked_keys():
    # Causal maps: the first query sees only the first key, exact zeros elsewhere.
    p = torch.tensor([[1.0, 0.0], [0.25, 0.75]]).view(1, 1, 2, 2)
    q = torch.tensor([[1.0, 0.0], [0.5, 0.5]]).view(1, 1, 2, 2)
    loss = attention_loss([q], [p], torch.ones(1, 2))
    want = (0.25 * math.log(0.5) + 0.75 * math.log(1.5)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert attention_loss([p], [p], torch.ones(1, 2)).item() == pytest.approx(0, abs=1e-7)
    # Exact zeros in the student's map leave finite gradients.
    q = q.clone().requires_grad_(True)
    attention_loss([q], [p], torch.ones(1, 2)).backward()
    assert torch.isfinite(q.grad).all()


def test_value_relation_matches_minilm_formula_with_padding():
    torch.manual_seed(0)
    v = torch.randn(2, 3, 4)  # [B, L, D], 2 relation heads of width 2
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rel = value_relation(v, 2, mask).exp()
    vh = v[1, :, 2:]  # second example, second head
    scores = vh @ vh.T / math.sqrt(2)
    # Query 1 sees keys 0 and 1 (causal); key 2 is padding in this example.
    want = scores[1, :2].softmax(-1)
    assert torch.allclose(rel[1, 1, 1, :2], want, atol=1e-6)
    assert rel[1, 1, 1, 2] == 0 and rel[0, 0, 0, 1] == 0
    assert torch.allclose(rel.sum(-1), torch.ones(2, 2, 3))


def test_value_relation_loss_different_widths():
    torch.manual_seed(0)
    t = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    assert value_relation_loss([t], [t], mask, 2).item() == pytest.approx(0, abs=1e-6)
    s = torch.randn(2, 4, 6, requires_grad=True)  # a narrower student: 2 heads of 3 vs 2 of 4
    loss = value_relation_loss([s], [t], mask, 2)
    assert loss.item() > 0
    loss.backward()
    assert s.grad.abs().sum() > 0
    # Changing a padded position's values changes nothing.
    s2 = s.detach().clone()
    s2[1, 3] = 100.0
    assert value_relation_loss([s2], [t], mask, 2).item() == pytest.approx(loss.item())


def test_relation_loss_hand_computed():
    mask = torch.tensor([[1, 1], [1, 0]])
    # Pooled: a -> mean((1,0),(0,1)) = (0.5, 0.5); b -> (1, 0) (second position is padding).
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [5.0, 5.0]]])
    assert torch.allclose(pooled(student, mask), torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    teacher = torch.tensor([[[2.0, 0.0], [2.0, 0.0]], [[3.0, 0.0], [0.0, 7.0]]])  # cos = 1
    want = (1 - 1 / math.sqrt(2)) ** 2  # both off-diagonal entries differ by this
    assert relation_loss(student, teacher, mask).item() == pytest.approx(want, rel=1e-5)
    # Widths may differ: only similarities are compared.
    wide = torch.cat([teacher, torch.zeros(2, 2, 3)], -1)
    assert relation_loss(student, wide, mask).item() == pytest.approx(want, rel=1e-5)
    assert relation_loss(student[:1], teacher[:1], mask[:1]).item() == 0


def _tiny(tokenizer, layers, hidden, heads, kv):
    torch.manual_seed(layers + hidden)
    config = tiny_llama_config(tokenizer, layers, hidden)
    config.num_attention_heads, config.num_key_value_heads = heads, kv
    return LlamaForCausalLM(config)


def test_method_losses_on_models_of_different_shapes(tokenizer):
    student = _tiny(tokenizer, 2, 32, 2, 2)
    teacher = _tiny(tokenizer, 4, 64, 4, 2)
    teacher.requires_grad_(False)
    settings = TrainSettings.model_validate(
        {
            "feature": {"weight": 1.0, "loss": "cosine"},
            "attention": {"weight": 1.0, "value_weight": 1.0, "layers": {2: 4}},
            "relation": {"weight": 1.0},
        }
    )
    methods = MethodLosses(settings, student.config, teacher.config)
    assert methods.feature_pairs == [(1, 2), (2, 4)]
    assert methods.relation_heads == 2
    assert methods.model_kwargs == {"output_hidden_states": True, "output_attentions": True}
    methods.attach(student, teacher)
    assert student.config._attn_implementation == "eager"
    batch = {
        "input_ids": torch.randint(0, 100, (3, 5)),
        "attention_mask": torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 4 + [0]]),
    }
    with torch.no_grad():
        t_out = teacher(**batch, **methods.model_kwargs)
    s_out = student(**batch, **methods.model_kwargs)
    total, terms = methods(
        s_out.hidden_states,
        t_out.hidden_states,
        s_out.attentions,
        t_out.attentions,
        batch["attention_mask"],
    )
    assert set(terms) == {"feature", "attention", "value", "relation"}
    assert all(v > 0 for v in terms.values())
    assert total.item() == pytest.approx(sum(terms.values()), rel=1e-5)
    total.backward()
    assert all(p.grad is not None for p in methods.parameters())
    assert student.model.layers[1].self_attn.v_proj.weight.grad.abs().sum() > 0
    methods.detach()
    assert student.config._attn_implementation != "eager"
    assert not student.model.layers[1].self_attn.v_proj._forward_hooks


def test_method_losses_off_by_default(tokenizer):
    config = tiny_llama_config(tokenizer, 2, 32)
    methods = MethodLosses(TrainSettings(), config, config)
    assert not methods.active and not list(methods.parameters())
    assert methods.model_kwargs == {"output_hidden_states": False, "output_attentions": False}
