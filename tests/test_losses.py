"""KD losses against independent pure-Python references, and the properties training relies on."""

import math

import pytest
import torch
import torch.nn.functional as F

from edgekd.config import KDSettings, load_recipe
from edgekd.errors import EdgekdError
from edgekd.losses import DIVERGENCES, Divergence, kd_loss, shift_for_next_token, token_divergence

ARGS = {"skew_alpha": 0.1, "jsd_beta": 0.3}  # beta != 0.5 so a swapped JSD convention fails


def _div(name: str, **knobs) -> Divergence:
    return Divergence(name, **(ARGS | knobs))


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    e = [math.exp(x - top) for x in row]
    return [x / sum(e) for x in e]


def _kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)


def _reference(divergence, zs, zt, temperature, skew_alpha, jsd_beta) -> float:
    """One position, straight from the definitions, in float64 Python."""
    q = _softmax([x / temperature for x in zs])
    p = _softmax([x / temperature for x in zt])
    mix = lambda a, b, w: [w * x + (1 - w) * y for x, y in zip(a, b, strict=True)]  # noqa: E731
    if divergence == "forward_kl":
        return _kl(p, q)
    if divergence == "reverse_kl":
        return _kl(q, p)
    if divergence == "skew_forward_kl":
        return _kl(p, mix(p, q, skew_alpha))
    if divergence == "skew_reverse_kl":
        return _kl(q, mix(q, p, skew_alpha))
    if divergence == "jsd":
        m = mix(p, q, jsd_beta)
        return jsd_beta * _kl(p, m) + (1 - jsd_beta) * _kl(q, m)
    if divergence == "tv":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q, strict=True))
    return sum((s / temperature - t / temperature) ** 2 for s, t in zip(zs, zt, strict=True)) / len(
        zs
    )


def _logits(*shape, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("divergence", list(DIVERGENCES))
def test_matches_reference(divergence, temperature):
    zs, zt = _logits(2, 3, 7, seed=1), _logits(2, 3, 7, seed=2)
    got = token_divergence(zs, zt, divergence=_div(divergence), temperature=temperature)
    assert got.shape == (2, 3) and got.dtype == torch.float32
    want = [
        [
            _reference(divergence, zs[b, t].tolist(), zt[b, t].tolist(), temperature, **ARGS)
            for t in range(3)
        ]
        for b in range(2)
    ]
    assert torch.allclose(
        got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6
    )
    assert got.abs().max() > 1e-3  # the comparison is not between zeros


@pytest.mark.parametrize("divergence", list(DIVERGENCES))
def test_zero_for_identical_and_nonnegative(divergence):
    z = _logits(4, 11, seed=3)
    same = token_divergence(z, z.clone(), divergence=_div(divergence), temperature=2.0)
    assert same.abs().max() < 1e-6
    other = token_divergence(
        z, _logits(4, 11, seed=4), divergence=_div(divergence), temperature=2.0
    )
    assert (other > 0).all()


def test_jsd_symmetric_at_half_and_skew_zero_is_plain_kl():
    a, b = _logits(5, 9, seed=5), _logits(5, 9, seed=6)
    knobs = {"skew_alpha": 0.0, "jsd_beta": 0.5}
    jsd = _div("jsd", **knobs)
    ab = token_divergence(a, b, divergence=jsd, temperature=1.5)
    assert torch.allclose(ab, token_divergence(b, a, divergence=jsd, temperature=1.5), atol=1e-6)
    for skew, plain in [("skew_forward_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")]:
        assert torch.allclose(
            token_divergence(a, b, divergence=_div(skew, **knobs), temperature=1.5),
            token_divergence(a, b, divergence=_div(plain, **knobs), temperature=1.5),
            atol=1e-6,
        )


def test_forward_kl_gradient_is_q_minus_p_over_t():
    zs, zt = _logits(3, 8, seed=7).requires_grad_(), _logits(3, 8, seed=8)
    token_divergence(zs, zt, divergence=_div("forward_kl"), temperature=2.0).sum().backward()
    want = (torch.softmax(zs.detach() / 2, -1) - torch.softmax(zt / 2, -1)) / 2
    assert torch.allclose(zs.grad, want, atol=1e-6)


def _batch(seed=0, vocab=13):
    zs, zt = _logits(2, 6, vocab, seed=seed), _logits(2, 6, vocab, seed=seed + 1)
    labels = torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(seed))
    labels[0, :2] = -100  # prompt
    labels[1, 4:] = -100  # padding
    return zs, zt, labels


def test_alpha_zero_is_cross_entropy_and_needs_no_teacher():
    zs, zt, labels = _batch()
    want = F.cross_entropy(zs.view(-1, 13), labels.view(-1), ignore_index=-100)
    for teacher in (zt, None):
        out = kd_loss(zs, teacher, labels, temperature=2.0, alpha=0.0, divergence=_div("jsd"))
        assert torch.allclose(out.loss, want, rtol=1e-6)
        assert out.kd == 0 and out.tokens == 8


def test_alpha_one_is_t2_forward_kl_mean_and_mixing_is_linear():
    zs, zt, labels = _batch(seed=2)
    zs.requires_grad_()
    kept = [(b, t) for b in range(2) for t in range(6) if labels[b, t] != -100]
    kl = sum(_reference("forward_kl", zs[i].tolist(), zt[i].tolist(), 2.0, **ARGS) for i in kept)
    kw = {"temperature": 2.0, "divergence": _div("forward_kl")}
    pure = kd_loss(zs, zt, labels, alpha=1.0, **kw)
    assert math.isclose(pure.loss.item(), 4.0 * kl / len(kept), rel_tol=1e-5)
    mixed = kd_loss(zs, zt, labels, alpha=0.3, **kw)
    ce = F.cross_entropy(zs.detach().view(-1, 13), labels.view(-1), ignore_index=-100)
    assert math.isclose(mixed.loss.item(), 0.3 * pure.loss.item() + 0.7 * ce.item(), rel_tol=1e-5)
    assert math.isclose(mixed.ce.item(), ce.item(), rel_tol=1e-6)
    assert not mixed.kd.requires_grad and not mixed.ce.requires_grad and mixed.loss.requires_grad


@pytest.mark.parametrize("divergence", list(DIVERGENCES))
def test_ignored_positions_change_nothing(divergence):
    zs, zt, labels = _batch(seed=4)
    kw = {"temperature": 2.0, "alpha": 0.5, "divergence": _div(divergence)}
    a = zs.clone().requires_grad_()
    out_a = kd_loss(a, zt, labels, **kw)
    out_a.loss.backward()
    ignored = labels == -100
    zs2, zt2 = zs.clone(), zt.clone()
    zs2[ignored] = 1e6  # even absurd values at ignored positions must not leak in
    zt2[ignored] = float("nan")
    b = zs2.requires_grad_()
    out_b = kd_loss(b, zt2, labels, **kw)
    out_b.loss.backward()
    assert torch.equal(out_a.loss, out_b.loss)
    assert torch.equal(a.grad, b.grad) and (a.grad[ignored] == 0).all()


def test_no_labelled_position_gives_zero_loss_with_grad_path():
    zs = _logits(2, 3, 5).requires_grad_()
    labels = torch.full((2, 3), -100)
    out = kd_loss(zs, _logits(2, 3, 5, seed=1), labels, temperature=2.0, alpha=0.5,
                  divergence=_div("forward_kl"))  # fmt: skip
    out.loss.backward()
    assert out.loss.item() == 0 and out.tokens == 0 and (zs.grad == 0).all()


def test_t_squared_keeps_gradient_scale():
    """Hinton: for small z/T, dKL/dz_s ~ (z_s - z_t) / (V T^2), so T^2 * KL is T-invariant."""
    zs, zt = _logits(4, 50, scale=0.5, seed=9), _logits(4, 50, scale=0.5, seed=10)
    labels = torch.zeros(4, dtype=torch.long)
    scaled, raw = [], []
    for temperature in (2.0, 4.0, 8.0):
        s = zs.clone().requires_grad_()
        kd_loss(s, zt, labels, temperature=temperature, alpha=1.0,
                divergence=_div("forward_kl")).loss.backward()  # fmt: skip
        scaled.append(s.grad.norm().item())
        raw.append(scaled[-1] / temperature**2)
    assert max(scaled) / min(scaled) < 2
    assert 8 < raw[0] / raw[2] < 32  # ~16 = (8/2)^2 without the T^2 factor


@pytest.mark.parametrize("divergence", list(DIVERGENCES))
def test_huge_and_masked_logits_stay_finite(divergence):
    zs, zt, labels = _batch(seed=6, vocab=16)
    zs, zt = zs * 1e4, zt * 1e4
    zs[..., :3] = zt[..., :3] = float("-inf")  # a masked slice of the vocabulary
    labels[labels != -100] = labels[labels != -100].clamp(min=3)  # targets are unmasked tokens
    zs = zs.requires_grad_()
    out = kd_loss(zs, zt, labels, temperature=2.0, alpha=0.5, divergence=_div(divergence))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(zs.grad).all()
    if divergence != "mse":  # mse averages over the full vocabulary, masked entries included
        kw = {"divergence": _div(divergence), "temperature": 2.0}
        full = token_divergence(zs.detach(), zt, **kw)
        assert torch.allclose(full, token_divergence(zs.detach()[..., 3:], zt[..., 3:], **kw))


def test_teacher_only_mask_is_finite_for_bounded_divergences():
    zs, zt = _logits(3, 10, seed=11).requires_grad_(), _logits(3, 10, seed=12)
    zt[:, 0] = float("-inf")
    for divergence in ("forward_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "tv"):
        d = token_divergence(zs, zt, divergence=_div(divergence), temperature=1.0).sum()
        (grad,) = torch.autograd.grad(d, zs)
        assert torch.isfinite(d) and torch.isfinite(grad).all()


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("temperature", {"temperature": 0.0}), ("alpha", {"alpha": 1.5})],
)
def test_bad_arguments_name_the_argument(name, kwargs):
    zs, zt, labels = _batch()
    args = {"temperature": 2.0, "alpha": 0.5, "divergence": _div("forward_kl"), **kwargs}
    with pytest.raises(ValueError, match=name):
        kd_loss(zs, zt, labels, **args)
    with pytest.raises(TypeError, match="losses.Divergence"):
        kd_loss(zs, zt, labels, temperature=2.0, alpha=0.5, divergence="forward_kl")


@pytest.mark.parametrize(
    ("name", "knobs"),
    [
        ("skew_alpha", {"skew_alpha": -0.1}),
        ("jsd_beta", {"jsd_beta": 2.0}),
        ("skew_alpha", {"name": "skew_forward_kl", "skew_alpha": 1.0}),
        ("jsd_beta", {"name": "jsd", "jsd_beta": 0.0}),
    ],
)
def test_bad_knobs_name_the_knob(name, knobs):
    with pytest.raises(ValueError, match=name):
        _div(knobs.pop("name", "forward_kl"), **knobs)


def test_unknown_divergence_is_refused_not_a_fallback():
    with pytest.raises(ValueError, match="divergence='kl' is unknown; use one of forward_kl"):
        _div("kl")
    with pytest.raises(EdgekdError, match=r"'distill.kd.divergence' = 'kl': .*use one of"):
        load_recipe(None, ["distill.kd.divergence=kl"])


def test_config_choices_are_the_registry():
    for name in DIVERGENCES:
        kd = KDSettings(divergence=name)
        assert Divergence.of(kd) == Divergence(name, skew_alpha=0.1, jsd_beta=0.5)
    assert KDSettings().divergence in DIVERGENCES


def test_shape_mismatches_are_rejected():
    zs, zt, labels = _batch()
    kw = {"temperature": 2.0, "alpha": 0.5, "divergence": _div("forward_kl")}
    with pytest.raises(ValueError, match="teacher_logits"):
        kd_loss(zs, zt[..., :-1], labels, **kw)
    with pytest.raises(ValueError, match="labels"):
        kd_loss(zs, zt, labels[:, :-1], **kw)


def test_shift_for_next_token():
    logits, labels = torch.randn(2, 5, 7), torch.arange(10).view(2, 5)
    shifted_logits, shifted_labels = shift_for_next_token(logits, labels)
    assert shifted_logits.shape == (2, 4, 7) and shifted_labels.shape == (2, 4)
    assert torch.equal(shifted_logits, logits[:, :4]) and torch.equal(shifted_labels, labels[:, 1:])
