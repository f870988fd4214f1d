"""The chunked KD loss gives the plain loss's value and gradients, on tensors and on tiny Llamas."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edgekd.chunked_kd import chunked_kd_loss, head_logits
from edgekd.config import TrainSettings
from edgekd.feature_kd import MethodLosses
from edgekd.losses import DIVERGENCES, Divergence, kd_loss
from edgekd.train import kd_step_loss

ARGS = {"skew_alpha": 0.1, "jsd_beta": 0.3}


def _div(name: str) -> Divergence:
    return Divergence(name, **ARGS)


VOCAB = 97


def _tensors(seed=0, d=8):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 6, d, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(VOCAB, d, generator=g) * 0.7).requires_grad_()
    bias = torch.randn(VOCAB, generator=g).requires_grad_()
    t_hidden, t_weight = torch.randn(2, 6, 5, generator=g), torch.randn(VOCAB, 5, generator=g)
    labels = torch.randint(0, VOCAB, (2, 6), generator=g)
    labels[0, :2] = -100  # prompt
    labels[1, 4:] = -100  # padding
    return hidden, weight, bias, t_hidden, t_weight, labels


def _grads(loss, params):
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("divergence", list(DIVERGENCES))
def test_matches_plain_loss_and_gradients(divergence, alpha, temperature):
    # forward_kl and reverse_kl take the closed-form gradient (which folds CE's softmax into the
    # divergence's at T=1); the others autograd, chunk by chunk.
    hidden, weight, bias, t_hidden, t_weight, labels = _tensors()
    kw = {"temperature": temperature, "alpha": alpha, "divergence": _div(divergence)}
    plain = kd_loss(
        torch.nn.functional.linear(hidden, weight, bias), t_hidden @ t_weight.T, labels, **kw
    )
    plain_grads = _grads(plain.loss, [hidden, weight, bias])
    keep = labels != -100
    for chunk in (1, 3, 100):
        got = chunked_kd_loss(
            hidden, weight, bias, labels, head_logits(t_hidden[keep], t_weight),
            chunk_tokens=chunk, **kw,
        )  # fmt: skip
        assert torch.allclose(got.loss, plain.loss, atol=1e-5, rtol=1e-5)
        assert torch.allclose(got.kd, plain.kd, atol=1e-5) and torch.allclose(got.ce, plain.ce)
        assert got.tokens == plain.tokens == 8
        for g, want in zip(_grads(got.loss, [hidden, weight, bias]), plain_grads, strict=True):
            assert torch.allclose(g, want, atol=1e-5, rtol=1e-4)
            assert want.abs().max() > 1e-3  # the comparison is not between zeros
        assert got.loss.item() > 0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_masked_vocabulary_matches_plain_and_stays_finite(divergence, temperature):
    hidden, weight, bias, t_hidden, t_weight, labels = _tensors(seed=2)
    mask = torch.zeros(VOCAB)
    mask[:3] = float("-inf")  # a vocabulary slice both models mask (as a grammar would)
    labels[labels != -100] = labels[labels != -100].clamp(min=3)
    bias = (bias.detach() + mask).requires_grad_()
    keep = labels != -100
    t_rows = head_logits(t_hidden[keep], t_weight, mask)
    kw = {"temperature": temperature, "alpha": 0.5, "divergence": _div(divergence)}
    plain = kd_loss(torch.nn.functional.linear(hidden, weight, bias), t_hidden @ t_weight.T + mask,
                    labels, **kw)  # fmt: skip
    got = chunked_kd_loss(hidden, weight, bias, labels, t_rows, chunk_tokens=3, **kw)
    assert torch.isfinite(got.loss) and torch.allclose(got.loss, plain.loss, atol=1e-5)
    pairs = zip(
        _grads(got.loss, [hidden, weight]), _grads(plain.loss, [hidden, weight]), strict=True
    )
    for g, want in pairs:
        assert torch.isfinite(g).all() and torch.allclose(g, want, atol=1e-5, rtol=1e-4)


def test_backward_scales_with_the_incoming_gradient_and_frozen_head_gets_none():
    hidden, weight, _, t_hidden, t_weight, labels = _tensors(seed=1)
    weight.requires_grad_(False)
    kw = {"temperature": 1.0, "alpha": 0.7, "divergence": _div("forward_kl")}
    teacher = head_logits(t_hidden[labels != -100], t_weight)
    once = _grads(
        chunked_kd_loss(hidden, weight, None, labels, teacher, chunk_tokens=3, **kw).loss, [hidden]
    )
    out = chunked_kd_loss(hidden, weight, None, labels, teacher, chunk_tokens=3, **kw)
    (thrice,) = _grads(3 * out.loss, [hidden])
    assert torch.allclose(thrice, 3 * once[0], atol=1e-6)


def test_no_labelled_position_is_zero_loss_with_zero_gradients():
    hidden, weight, bias, t_hidden, t_weight, labels = _tensors()
    labels[:] = -100
    out = chunked_kd_loss(
        hidden, weight, bias, labels, head_logits(t_hidden[:0], t_weight), chunk_tokens=4,
        temperature=2.0, alpha=0.5, divergence=_div("jsd"),
    )  # fmt: skip
    out.loss.backward()
    assert out.loss.item() == 0 and out.tokens == 0
    assert hidden.grad.abs().max() == 0


def test_refuses_bad_arguments():
    hidden, weight, bias, _, _, labels = _tensors()
    kw = {"temperature": 2.0, "divergence": _div("tv")}
    with pytest.raises(ValueError, match="teacher is None"):
        chunked_kd_loss(hidden, weight, bias, labels, None, chunk_tokens=4, alpha=0.5, **kw)
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        chunked_kd_loss(hidden, weight, bias, labels, None, chunk_tokens=0, alpha=0.0, **kw)
    with pytest.raises(ValueError, match="labels"):
        chunked_kd_loss(hidden, weight, bias, labels[:, 1:], None, chunk_tokens=4, alpha=0, **kw)


def _llama(hidden, layers, tie, seed):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        pad_token_id=0,
        initializer_range=0.2,  # peaked distributions, so gradients are far from zero
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def models_and_batch():
    student = _llama(32, 2, tie=True, seed=0).train()
    teacher = _llama(48, 3, tie=False, seed=1).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, VOCAB, (3, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # right padding
    input_ids[1, 6:] = 0
    labels = input_ids.clone()
    labels[:, :3] = -100  # the prompt
    labels[attention_mask == 0] = -100
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return student, teacher, batch


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("divergence", list(DIVERGENCES))
def test_training_step_matches_plain_path_on_tiny_llama(models_and_batch, divergence, alpha):
    student, teacher, batch = models_and_batch
    params = [p for p in student.parameters() if p.requires_grad]
    results = []
    for chunk in (0, 5):
        settings = TrainSettings(
            scale={"loss_chunk_tokens": chunk},
            kd={"alpha": alpha, "divergence": divergence, "temperature": 2.0, **ARGS},
        )
        out, _ = kd_step_loss(
            student, student.get_output_embeddings(), teacher, batch, settings, alpha=alpha
        )
        results.append((out, _grads(out.loss, params)))
    (plain, plain_grads), (chunked, chunked_grads) = results
    assert torch.allclose(chunked.loss, plain.loss, atol=1e-5, rtol=1e-5)
    assert torch.allclose(chunked.kd, plain.kd, atol=1e-5) and chunked.tokens == plain.tokens
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    assert "model.embed_tokens.weight" in names  # tied: the head's gradient lands here too
    for name, g, want in zip(names, chunked_grads, plain_grads, strict=True):
        assert torch.allclose(g, want, atol=1e-5, rtol=1e-4), name
    assert max(g.abs().max() for g in plain_grads) > 1e-2


def test_step_with_extra_terms_and_cached_logits_matches_plain_path(models_and_batch):
    """The feature/relation terms and a precomputed teacher (the logit cache's form) give the
    same loss on the chunked path as on the plain one."""
    student, teacher, batch = models_and_batch
    head = student.get_output_embeddings()
    with torch.no_grad():
        cached = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    cached = cached.logits[:, :-1]
    losses = {}
    for chunk in (0, 5):
        settings = TrainSettings(
            scale={"loss_chunk_tokens": chunk},
            kd={"alpha": 0.5, **ARGS},
            feature={"weight": 1.0, "layers": "last_k", "last_k": 1},
            relation={"weight": 1.0},
        )
        torch.manual_seed(0)  # the same projections (widths 32 -> 48) for both paths
        methods = MethodLosses(settings, student.config, teacher.config)
        methods.attach(student, teacher)
        out, terms = kd_step_loss(
            student, head, teacher, batch, settings, alpha=0.5, methods=methods, extra_loss=methods
        )
        methods.detach()
        assert set(terms) == {"feature", "relation"} and all(v > 0 for v in terms.values())
        from_cache, _ = kd_step_loss(student, head, None, batch, settings, alpha=0.5, cached=cached)
        losses[chunk] = (out.loss, out.loss - sum(terms.values()), from_cache.loss)
    (plain, plain_kd, plain_cached), (chunked, chunked_kd, chunked_cached) = losses.values()
    assert torch.allclose(chunked, plain, atol=1e-5, rtol=1e-5)
    assert torch.allclose(chunked_cached, plain_cached, atol=1e-5, rtol=1e-5)
    assert torch.allclose(plain_cached, plain_kd, atol=1e-5, rtol=1e-5)
