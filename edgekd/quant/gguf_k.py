"""llama.cpp's Q4_K_M export, imitated in torch so that quantization-aware training sees it.

Each `*_dequant` returns what llama.cpp's quantizer (ggml-quants.c) stores, dequantized: the same
blocks, the same scale search, the same float32 operations in the same order (sums left to right,
as the C loops add), so the values agree bit for bit. Without `importance` it is the reference path
that `llama_model_quantize` takes without an importance matrix; with one (a weight per input
column, as llama.cpp derives it from an imatrix file) it is the weighted path (quantize_row_*_impl).
`*_codes` return the stored integers of the weighted path, which `quant.ggml_pack` packs into
llama.cpp's blocks. Blocks run along the last dimension, the input features of a Hugging Face
Linear weight, as a GGUF row does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from edgekd import architectures, models
from edgekd.errors import EdgekdError
from edgekd.quant import ggml_types

# make_qkx2_quants' scale search as quantize_row_q4_K_ref calls it: iscale = (rmin + rdelta*is
# + nmax) / (max - min) for is = 0..nstep.
_Q4K_NMAX, _Q4K_RMIN, _Q4K_RDELTA, _Q4K_NSTEP = 15, -1.0, 0.1, 20
# make_qkx3_quants as quantize_row_q4_K_impl (the imatrix path) calls it.
_Q4KW_RMIN, _Q4KW_RDELTA, _Q4KW_NSTEP = -0.9, 0.05, 36
# make_qp_quants, which the imatrix path uses for the super-block's 6-bit scales and mins.
_QP_NMAX, _QP_STEPS = 63, [i for i in range(-4, 5) if i != 0]
# make_qx_quants as quantize_row_q6_K_ref calls it: iscale = -(nmax + 0.1*is) / max, is = -9..9.
_Q6K_NMAX = 32
_Q5_0_NMAX = 16
_Q6K_STEPS = [i for i in range(-9, 10) if i != 0]
_GROUP_MAX_EPS = 1e-15

# Super-blocks per chunk: small enough for the search buffers to stay in cache (1 MB each).
_CHUNK = 1024


def _seq_sum(terms: Tensor, dim: int = 0) -> Tensor:
    """Sum over `dim` left to right, as the C loops add (torch.sum adds in another order)."""
    first, *rest = terms.unbind(dim)
    total = first.clone()
    for term in rest:
        total += term
    return total


def _div(num: Tensor | float, den: Tensor | float) -> Tensor:
    """num / den rounded once, as C divides. torch computes `scalar / t` as reciprocal(t) * scalar,
    and CUDA divides by a scalar through its reciprocal: both can miss by an ulp."""
    num = num if isinstance(num, Tensor) else torch.full_like(den, num)
    den = den if isinstance(den, Tensor) else torch.full_like(num, den)
    return num / den


def _roundf(t: Tensor) -> Tensor:
    """C roundf: halves away from zero (torch.round, like llama.cpp's nearest_int, goes to even)."""
    whole = torch.trunc(t)
    return whole + torch.where((t - whole).abs() >= 0.5, torch.sign(t), torch.zeros_like(t))


def _fp16(t: Tensor) -> Tensor:
    return t.to(torch.float16).float()


def _blocks(w: Tensor, name: str) -> Tensor:
    size = ggml_types.block(name)[0]
    if w.ndim == 0 or w.shape[-1] % size:
        raise EdgekdError(
            f"{name} needs rows whose length is a multiple of {size}, got shape {tuple(w.shape)}; "
            "use q4_k_m_types to get the type llama.cpp falls back to"
        )
    return w.detach().float().reshape(-1, size)


def _chunked(fn: Callable[..., Tensor], x: Tensor, shape: torch.Size, *extra: Tensor) -> Tensor:
    parts = zip(x.split(_CHUNK), *(e.split(_CHUNK) for e in extra), strict=True)
    return torch.cat([fn(*p) for p in parts]).reshape(shape)


def _sqrtf(t: Tensor) -> Tensor:
    """C sqrtf: torch's float32 sqrt (SLEEF) can miss by an ulp; a double sqrt rounded cannot."""
    return torch.sqrt(t.double()).float()


def _column_weights(importance: Tensor | None, w: Tensor, name: str) -> Tensor | None:
    """The importance of each input column laid out like _blocks(w): one row of it per block."""
    if importance is None:
        return None
    cols = w.shape[-1]
    if importance.shape != (cols,):
        raise EdgekdError(
            f"importance for a {name} tensor of shape {tuple(w.shape)} has shape "
            f"{tuple(importance.shape)}, not ({cols},): the imatrix is not this model's"
        )
    size = ggml_types.block(name)[0]
    return importance.detach().float().reshape(-1, size).repeat(w.numel() // cols, 1)


def _fit_error(w: Tensor, q: Tensor, scale: Tensor, low: Tensor, xs: Tensor, out: Tensor) -> Tensor:
    """Sum of w * (scale * q + low - x)^2 over dim 0, computed in `out` (a buffer like xs)."""
    torch.mul(q, scale, out=out)
    out.add_(low).sub_(xs)
    out.mul_(out).mul_(w)
    return _seq_sum(out)


def _q4_k_search(
    xs: Tensor,
    w: Tensor | None = None,
    steps: tuple[float, float, int] = (_Q4K_RMIN, _Q4K_RDELTA, _Q4K_NSTEP),
) -> tuple[Tensor, Tensor, Tensor]:
    """make_qkx2_quants (w None: its own weights) or make_qkx3_quants (given weights) over
    sub-blocks xs [32, S]: each one's (scale, min, levels), min reported >= 0."""
    if w is None:
        w = _sqrtf(_seq_sum(xs * xs) / 32) + xs.abs()  # / 32 is exact
    sum_w, sum_x = _seq_sum(torch.stack([w, w * xs]), 1)
    top = xs.amax(0)
    low = xs.amin(0).clamp(max=0)
    flat = top == low
    # In-place work in fixed buffers: the loop below is most of QAT's quantization time.
    q, err_buf, sums_buf = torch.empty_like(xs), torch.empty_like(xs), xs.new_empty(3, *xs.shape)

    iscale = _div(_Q4K_NMAX, top - low)
    scale = _div(1, iscale)
    torch.sub(xs, low, out=q).mul_(iscale).round_().clamp_(0, _Q4K_NMAX)
    best = _fit_error(w, q, scale, low, xs, err_buf)
    levels = q.clone()

    rmin, rdelta, nstep = steps
    steps = torch.arange(nstep + 1, dtype=torch.float32, device=xs.device)
    steps = rmin + torch.tensor(rdelta, device=xs.device) * steps + _Q4K_NMAX
    # Not vectorizable over candidates: each one is placed against the best min found so far.
    for step in steps:
        torch.sub(xs, low, out=q).mul_(step / (top - low)).round_().clamp_(0, _Q4K_NMAX)
        wq, wq2, wqx = sums_buf
        torch.mul(w, q, out=wq)
        torch.mul(wq, q, out=wq2)
        torch.mul(wq, xs, out=wqx)
        sum_l, sum_l2, sum_xl = _seq_sum(sums_buf, 1)
        det = sum_w * sum_l2 - sum_l * sum_l
        c_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        c_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = c_min > 0
        c_scale = torch.where(positive, sum_xl / sum_l2, c_scale)
        c_min = torch.where(positive, torch.zeros_like(c_min), c_min)
        err = _fit_error(w, q, c_scale, c_min, xs, err_buf)
        better = (det > 0) & (err < best) & ~flat
        best = torch.where(better, err, best)
        scale = torch.where(better, c_scale, scale)
        low = torch.where(better, c_min, low)
        torch.where(better, q, levels, out=levels)
    levels.masked_fill_(flat, 0)
    return torch.where(flat, torch.zeros_like(scale), scale), -low, levels


def _six_bits(v: Tensor) -> tuple[Tensor, Tensor]:
    """A super-block's 8 scales (or mins) as 6-bit levels of one fp16 step: (levels, step)."""
    top = v.amax(1).clamp(min=0)
    inv = torch.where(top > 0, _div(63, top), torch.zeros_like(top))
    # llama.cpp stores nearest_int() in a uint8_t (a negative wraps around), capped at 63.
    return torch.round(inv[:, None] * v).remainder(256).clamp(max=63), _fp16(_div(top, 63))


def _q4_k_chunk(x: Tensor) -> Tensor:
    n = x.shape[0]
    scales, mins = (t.reshape(n, 8) for t in _q4_k_search(x.reshape(-1, 32).T.contiguous())[:2])
    (ls, d), (lm, dmin) = _six_bits(scales), _six_bits(mins)
    dl = (d[:, None] * ls)[..., None]
    ml = (dmin[:, None] * lm)[..., None]
    q = torch.round((x.reshape(n, 8, 32) + ml) / dl).clamp_(0, 15)
    q = torch.where(dl == 0, torch.zeros_like(q), q)
    return dl * q - ml


def _qp_levels(x: Tensor, w: Tensor, nmax: int = _QP_NMAX) -> tuple[Tensor, Tensor]:
    """make_qp_quants over rows x [N, n] >= 0 with weights w: (levels, scale) per row."""
    top = x.amax(1, keepdim=True).clamp(min=0)
    zero = top < _GROUP_MAX_EPS
    top = torch.where(zero, torch.ones_like(top), top)

    def fit(iscale: Tensor) -> tuple[Tensor, Tensor]:
        """Levels of this inverse scale (capped at nmax) and their weighted squared error."""
        levels = torch.round(iscale * x).clamp_(max=nmax)
        diff = x - _div(1, iscale) * levels
        return levels, _seq_sum((w * diff * diff).T)[:, None]

    iscale = _div(nmax, top)
    # The first levels are stored uncapped in a uint8_t (a negative wraps around).
    levels = torch.round(iscale * x).remainder(256)
    diff = x - _div(1, iscale) * levels
    best = _seq_sum((w * diff * diff).T)[:, None]
    for step in _QP_STEPS:
        c_iscale = _div(torch.tensor(0.1, dtype=torch.float32) * step + nmax, top)
        err = fit(c_iscale)[1]
        better = err < best
        best = torch.where(better, err, best)
        iscale = torch.where(better, c_iscale, iscale)
    levels = fit(iscale)[0].remainder(256)
    wx = w * x
    sum_lx = _seq_sum((wx * levels).T)[:, None]
    sum_l2 = _seq_sum((w * levels * levels).T)[:, None]
    # Up to five passes of moving one level at a time while the fit improves, in order.
    for _ in range(5):
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i : i + 1], x[:, i : i + 1], levels[:, i : i + 1]
            slx = sum_lx - wx[:, i : i + 1] * li
            sl2 = sum_l2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            new = torch.round(xi * sl2 / torch.where(ok, slx, torch.ones_like(slx)))
            new = new.clamp_(max=nmax)
            ok &= new != li
            slx = slx + wx[:, i : i + 1] * new
            sl2 = sl2 + wi * new * new
            ok &= slx * slx * sum_l2 > sum_lx * sum_lx * sl2
            levels[:, i : i + 1] = torch.where(ok, new, li)
            sum_lx = torch.where(ok, slx, sum_lx)
            sum_l2 = torch.where(ok, sl2, sum_l2)
    scale = torch.where(sum_l2 > 0, _div(sum_lx, torch.where(sum_l2 > 0, sum_l2, 1.0)), 0.0)
    levels = torch.where(zero, torch.zeros_like(levels), levels)
    return levels, torch.where(zero, torch.zeros_like(scale), scale)[:, 0]


def _q4_k_weighted_codes(x: Tensor, qw: Tensor) -> tuple[Tensor, ...]:
    """quantize_row_q4_K_impl over super-blocks x [n, 256]: (d, dmin, sc, m, levels)."""
    n = x.shape[0]
    sigma2 = 2 * _seq_sum((x * x).T) / 256
    xs = x.reshape(-1, 32).T.contiguous()
    w = qw.reshape(-1, 32).T * _sqrtf(sigma2.repeat_interleave(8)[None] + xs * xs)
    sum_w = _seq_sum(w).reshape(n, 8)
    steps = (_Q4KW_RMIN, _Q4KW_RDELTA, _Q4KW_NSTEP)
    scales, mins, levels = _q4_k_search(xs, w, steps)
    sc, d = _qp_levels(scales.reshape(n, 8), sum_w)
    m, dmin = _qp_levels(mins.reshape(n, 8), sum_w)
    dl = (_fp16(d)[:, None] * sc)[..., None]
    ml = (_fp16(dmin)[:, None] * m)[..., None]
    q = torch.round((x.reshape(n, 8, 32) + ml) / dl).clamp_(0, 15)
    # A sub-block whose scale is 0 keeps the levels of its search.
    q = torch.where(dl == 0, levels.T.reshape(n, 8, 32), q)
    return d, dmin, sc, m, q


def _q4_k_weighted_chunk(x: Tensor, qw: Tensor) -> Tensor:
    d, dmin, sc, m, q = _q4_k_weighted_codes(x, qw)
    return (_fp16(d)[:, None] * sc)[..., None] * q - (_fp16(dmin)[:, None] * m)[..., None]


def q4_k_dequant(w: Tensor, importance: Tensor | None = None) -> Tensor:
    """Q4_K as llama.cpp quantizes it, dequantized.

    Super-blocks of 256 in 8 sub-blocks of 32; each sub-block's scale and min are found like
    make_qkx2_quants (make_qkx3_quants weighted by `importance` when given), then quantized to
    6 bits against the fp16 super-block d and dmin; 4-bit codes. Rows must be a multiple of 256
    long. Returns float32 of w's shape.
    """
    x, qw = _blocks(w, "Q4_K"), _column_weights(importance, w, "Q4_K")
    if qw is None:
        return _chunked(_q4_k_chunk, x, w.shape)
    return _chunked(_q4_k_weighted_chunk, x, w.shape, qw)


def q4_k_codes(w: Tensor, importance: Tensor) -> tuple[Tensor, ...]:
    """The weighted path's stored Q4_K values per super-block: (d, dmin, sc, m, levels)."""
    x, qw = _blocks(w, "Q4_K"), _column_weights(importance, w, "Q4_K")
    parts = [_q4_k_weighted_codes(*p) for p in zip(x.split(_CHUNK), qw.split(_CHUNK), strict=True)]
    return tuple(torch.cat(t) for t in zip(*parts, strict=True))


def _qx_search(xs: Tensor, w: Tensor | None = None, nmax: int = _Q6K_NMAX) -> tuple[Tensor, Tensor]:
    """make_qx_quants(rmse_type=1) over sub-blocks xs [n, S], weighted by w (default x*x): each
    one's (scale, levels) with levels l + nmax in 0..2*nmax-1, all 0 for an all-zero block."""
    peak = xs.gather(0, xs.abs().argmax(0, keepdim=True))[0]
    w = xs * xs if w is None else w
    wx = w * xs
    q, wq, sums_buf = torch.empty_like(xs), torch.empty_like(xs), xs.new_empty(2, *xs.shape)

    def sums(iscale: Tensor) -> Tensor:
        """(sum of w*x*l, sum of w*l*l) for the levels l of this inverse scale."""
        torch.mul(xs, iscale, out=q).round_().clamp_(-nmax, nmax - 1)
        torch.mul(wx, q, out=sums_buf[0])
        torch.mul(w, q, out=wq)
        torch.mul(wq, q, out=sums_buf[1])
        return _seq_sum(sums_buf, 1)

    best_iscale = _div(-nmax, peak)
    sum_lx, sum_l2 = sums(best_iscale)
    scale = torch.where(sum_l2 != 0, sum_lx / sum_l2, torch.zeros_like(sum_lx))
    best = scale * sum_lx
    steps = nmax + torch.tensor(0.1, device=xs.device) * torch.tensor(
        _Q6K_STEPS, dtype=torch.float32, device=xs.device
    )
    for step in steps:
        iscale = -step / peak
        sum_lx, sum_l2 = sums(iscale)
        # A step replaces the best only when strictly better, in order, as the C loop does.
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        scale = torch.where(better, sum_lx / sum_l2, scale)
        best = torch.where(better, scale * sum_lx, best)
        best_iscale = torch.where(better, iscale, best_iscale)
    zero = peak.abs() < _GROUP_MAX_EPS
    levels = (xs * best_iscale).round_().clamp_(-nmax, nmax - 1) + nmax
    levels = torch.where(zero, torch.zeros_like(levels), levels)
    return torch.where(zero, torch.zeros_like(scale), scale), levels


def _q6_k_codes(x: Tensor, qw: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Q6_K over super-blocks x [n, 256]: (d, sc, levels - 32); all 0 for an all-zero block."""
    n = x.shape[0]
    xs = x.reshape(-1, 16).T.contiguous()
    scales, found = _qx_search(xs, None if qw is None else qw.reshape(-1, 16).T.contiguous())
    scales = scales.reshape(n, 16)
    top = scales.gather(1, scales.abs().argmax(1, keepdim=True))
    zero = top.abs() < _GROUP_MAX_EPS
    iscale = _div(-128, torch.where(zero, torch.ones_like(top), top))
    sc = torch.round(iscale * scales).clamp_(max=127)
    d = _fp16(_div(1, iscale))
    dl = (d * sc)[..., None]
    q = torch.round(x.reshape(n, 16, 16) / dl).clamp_(-32, 31)
    # A sub-block whose scale is 0 keeps the levels of its search.
    q = torch.where(dl == 0, found.T.reshape(n, 16, 16) - _Q6K_NMAX, q)
    d, sc = torch.where(zero, 0.0, d)[:, 0], torch.where(zero, 0.0, sc)
    return d, sc, torch.where(zero[..., None], -float(_Q6K_NMAX), q)


def _q6_k_chunk(x: Tensor, qw: Tensor | None = None) -> Tensor:
    d, sc, q = _q6_k_codes(x, qw)
    return (d[:, None] * sc)[..., None] * q


def q6_k_dequant(w: Tensor, importance: Tensor | None = None) -> Tensor:
    """Q6_K as llama.cpp quantizes it, dequantized.

    Super-blocks of 256 in 16 sub-blocks of 16; each sub-block's scale is found like
    make_qx_quants (weighted by x*x, or by `importance` when given), quantized to int8 against
    the fp16 super-block d; 6-bit codes.
    """
    x, qw = _blocks(w, "Q6_K"), _column_weights(importance, w, "Q6_K")
    return _chunked(_q6_k_chunk, x, w.shape, *([] if qw is None else [qw]))


def q6_k_codes(w: Tensor, importance: Tensor) -> tuple[Tensor, ...]:
    """The weighted path's stored Q6_K values per super-block: (d, sc, levels - 32)."""
    x, qw = _blocks(w, "Q6_K"), _column_weights(importance, w, "Q6_K")
    parts = [_q6_k_codes(*p) for p in zip(x.split(_CHUNK), qw.split(_CHUNK), strict=True)]
    return tuple(torch.cat(t) for t in zip(*parts, strict=True))


def q5_0_codes(w: Tensor, importance: Tensor) -> tuple[Tensor, Tensor]:
    """quantize_row_q5_0_impl (the imatrix path): per block of 32, (d, levels 0..31)."""
    x, qw = _blocks(w, "Q5_0"), _column_weights(importance, w, "Q5_0")
    rows = w.detach().float().reshape(-1, w.shape[-1])
    sigma2 = (_seq_sum((rows * rows).T) / w.shape[-1]).repeat_interleave(w.shape[-1] // 32)
    weights = qw * _sqrtf(sigma2[:, None] + x * x)
    out = [
        _qx_search(xs.T.contiguous(), ws.T.contiguous(), _Q5_0_NMAX)
        for xs, ws in zip(x.split(_CHUNK * 8), weights.split(_CHUNK * 8), strict=True)
    ]
    return _fp16(torch.cat([o[0] for o in out])), torch.cat([o[1].T for o in out])


def q5_0_dequant(w: Tensor, importance: Tensor | None = None) -> Tensor:
    """Q5_0 (llama.cpp's fallback for Q4_K rows not a multiple of 256): blocks of 32, 5 bits;
    with `importance`, the scale is searched like make_qx_quants weighted by it."""
    if importance is not None:
        d, levels = q5_0_codes(w, importance)
        return (d[:, None] * (levels - _Q5_0_NMAX)).reshape(w.shape)
    x = _blocks(w, "Q5_0")
    # d from the value of largest magnitude (the first one on a tie, sign kept); / -16 is exact.
    d = x.gather(1, x.abs().argmax(1, keepdim=True)) / -16
    inv = torch.where(d != 0, _div(1, d), torch.zeros_like(d))
    # The C code truncates x/d + 16.5 (an int8_t cast) and caps it at 31.
    q = torch.trunc(x * inv + 16.5).clamp_(max=31)
    return (_fp16(d) * (q - 16)).reshape(w.shape)


def q8_0_dequant(w: Tensor, importance: Tensor | None = None) -> Tensor:
    """Q8_0 (the fallback for Q6_K, and the output type when rows are not a multiple of 256).
    llama.cpp's Q8_0 has no weighted path: `importance` is accepted and unused, as in C."""
    x = _blocks(w, "Q8_0")
    d = _div(x.abs().amax(1, keepdim=True), 127)
    q = _roundf(x * torch.where(d != 0, _div(1, d), torch.zeros_like(d)))
    return (q * _fp16(d)).reshape(w.shape)


def f16_dequant(w: Tensor, importance: Tensor | None = None) -> Tensor:
    """F16: llama.cpp keeps a tensor whose rows are not a multiple of 32 unquantized."""
    return _fp16(w.detach())


DEQUANT: dict[str, Callable[..., Tensor]] = {
    "Q4_K": q4_k_dequant,
    "Q6_K": q6_k_dequant,
    "Q5_0": q5_0_dequant,
    "Q8_0": q8_0_dequant,
    "F16": f16_dequant,
}


def fake_quantize(w: Tensor, ggml_type: str, importance: Tensor | None = None) -> Tensor:
    """Straight-through fake quantization to `ggml_type` (a key of DEQUANT).

    Forward: llama.cpp's dequant(quant(w)), after rounding w to float16 as edgekd's GGUF export
    writes it before llama.cpp quantizes, weighted by `importance` (per input column, from an
    imatrix) when given; backward: identity. The result has w's dtype and device (a bfloat16 w
    gets the dequantized values rounded to bfloat16).
    """
    if ggml_type not in DEQUANT:
        raise EdgekdError(f"ggml type {ggml_type!r} is not one of {', '.join(DEQUANT)}")
    dq = DEQUANT[ggml_type](w.detach().to(torch.float16), importance).to(w.dtype)
    # dq + (w - w) is dq exactly; w + (dq - w) can round off its last bit.
    return dq + (w - w.detach())


def q4_k_m_types(config) -> dict[str, str]:
    """The ggml type llama.cpp's Q4_K_M gives each weight of a Llama-family model, by HF name.

    The rules are quant.ggml_types' (those of the size estimate): Q4_K by default; Q6_K for attn_v
    and ffn_down in use_more_bits layers; the output (and a tied embedding, which is the output)
    Q6_K, or Q8_0 when hidden_size is not a multiple of 256; other rows not a multiple of 256 fall
    back to Q5_0 (Q4_K) or Q8_0 (Q6_K), and to F16 when not a multiple of 32. Norms stay float
    (not listed).
    """
    architectures.check(config, "qat")
    if config.num_hidden_layers == 80:
        raise EdgekdError(
            "config num_hidden_layers=80: llama.cpp gives 65B/70B models extra attn_v bits that "
            "edgekd's fake quantizer does not imitate; use a student of another depth"
        )
    types = models.gguf_tensor_types(config, "Q4_K_M")
    return {ggml_types.hf_name(name): kind for name, kind in types.items() if kind != "F32"}
