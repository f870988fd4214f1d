"""llama.cpp's Q4_K_M export, imitated in torch so that quantization-aware training sees it.

Each `*_dequant` returns what llama.cpp's reference quantizer (ggml-quants.c, the path that
`llama_model_quantize` takes without an importance matrix) stores, dequantized: the same blocks,
the same scale search, the same float32 operations in the same order (sums left to right, as the
C loops add), so the values agree bit for bit. Blocks run along the last dimension, the input
features of a Hugging Face Linear weight, as a GGUF row does.
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
# make_qx_quants as quantize_row_q6_K_ref calls it: iscale = -(nmax + 0.1*is) / max, is = -9..9.
_Q6K_NMAX = 32
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


def _chunked(fn: Callable[[Tensor], Tensor], x: Tensor, shape: torch.Size) -> Tensor:
    return torch.cat([fn(c) for c in x.split(_CHUNK)]).reshape(shape)


def _fit_error(w: Tensor, q: Tensor, scale: Tensor, low: Tensor, xs: Tensor, out: Tensor) -> Tensor:
    """Sum of w * (scale * q + low - x)^2 over dim 0, computed in `out` (a buffer like xs)."""
    torch.mul(q, scale, out=out)
    out.add_(low).sub_(xs)
    out.mul_(out).mul_(w)
    return _seq_sum(out)


def _q4_k_search(xs: Tensor) -> tuple[Tensor, Tensor]:
    """make_qkx2_quants over sub-blocks xs [32, S]: each one's (scale, min), min reported >= 0."""
    sum_x2 = _seq_sum(xs * xs)
    # torch's float32 sqrt (SLEEF) can miss by an ulp; sqrtf cannot, nor can this (/ 32 is exact).
    w = torch.sqrt((sum_x2 / 32).double()).float() + xs.abs()
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

    steps = torch.arange(_Q4K_NSTEP + 1, dtype=torch.float32, device=xs.device)
    steps = _Q4K_RMIN + torch.tensor(_Q4K_RDELTA, device=xs.device) * steps + _Q4K_NMAX
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
    return torch.where(flat, torch.zeros_like(scale), scale), -low


def _six_bits(v: Tensor) -> tuple[Tensor, Tensor]:
    """A super-block's 8 scales (or mins) as 6-bit levels of one fp16 step: (levels, step)."""
    top = v.amax(1).clamp(min=0)
    inv = torch.where(top > 0, _div(63, top), torch.zeros_like(top))
    # llama.cpp stores nearest_int() in a uint8_t (a negative wraps around), capped at 63.
    return torch.round(inv[:, None] * v).remainder(256).clamp(max=63), _fp16(_div(top, 63))


def _q4_k_chunk(x: Tensor) -> Tensor:
    n = x.shape[0]
    scales, mins = (t.reshape(n, 8) for t in _q4_k_search(x.reshape(-1, 32).T.contiguous()))
    (ls, d), (lm, dmin) = _six_bits(scales), _six_bits(mins)
    dl = (d[:, None] * ls)[..., None]
    ml = (dmin[:, None] * lm)[..., None]
    q = torch.round((x.reshape(n, 8, 32) + ml) / dl).clamp_(0, 15)
    q = torch.where(dl == 0, torch.zeros_like(q), q)
    return dl * q - ml


def q4_k_dequant(w: Tensor) -> Tensor:
    """Q4_K as llama.cpp quantizes it (reference CPU path, no imatrix), dequantized.

    Super-blocks of 256 in 8 sub-blocks of 32; each sub-block's scale and min are found like
    make_qkx2_quants, then quantized to 6 bits against the fp16 super-block d and dmin; 4-bit
    codes. Rows must be a multiple of 256 long. Returns float32 of w's shape.
    """
    return _chunked(_q4_k_chunk, _blocks(w, "Q4_K"), w.shape)


def _q6_k_search(xs: Tensor) -> Tensor:
    """make_qx_quants(nmax=32, rmse_type=1) over sub-blocks xs [16, S]: each one's scale."""
    peak = xs.gather(0, xs.abs().argmax(0, keepdim=True))[0]
    w = xs * xs
    wx = w * xs
    q, wq, sums_buf = torch.empty_like(xs), torch.empty_like(xs), xs.new_empty(2, *xs.shape)

    def sums(iscale: Tensor) -> Tensor:
        """(sum of w*x*l, sum of w*l*l) for the levels l of this inverse scale."""
        torch.mul(xs, iscale, out=q).round_().clamp_(-_Q6K_NMAX, _Q6K_NMAX - 1)
        torch.mul(wx, q, out=sums_buf[0])
        torch.mul(w, q, out=wq)
        torch.mul(wq, q, out=sums_buf[1])
        return _seq_sum(sums_buf, 1)

    sum_lx, sum_l2 = sums(_div(-_Q6K_NMAX, peak))
    scale = torch.where(sum_l2 != 0, sum_lx / sum_l2, torch.zeros_like(sum_lx))
    best = scale * sum_lx
    steps = _Q6K_NMAX + torch.tensor(0.1, device=xs.device) * torch.tensor(
        _Q6K_STEPS, dtype=torch.float32, device=xs.device
    )
    for step in steps:
        sum_lx, sum_l2 = sums(-step / peak)
        # A step replaces the best only when strictly better, in order, as the C loop does.
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        scale = torch.where(better, sum_lx / sum_l2, scale)
        best = torch.where(better, scale * sum_lx, best)
    return torch.where(peak.abs() < _GROUP_MAX_EPS, torch.zeros_like(scale), scale)


def _q6_k_chunk(x: Tensor) -> Tensor:
    n = x.shape[0]
    scales = _q6_k_search(x.reshape(-1, 16).T.contiguous()).reshape(n, 16)
    top = scales.gather(1, scales.abs().argmax(1, keepdim=True))
    iscale = _div(-128, top)
    sc = torch.round(iscale * scales).clamp_(max=127)
    dl = (_fp16(_div(1, iscale)) * sc)[..., None]
    q = torch.round(x.reshape(n, 16, 16) / dl).clamp_(-32, 31)
    q = torch.where(dl == 0, torch.zeros_like(q), q)
    out = dl * q
    return torch.where(top.abs()[..., None] < _GROUP_MAX_EPS, torch.zeros_like(out), out)


def q6_k_dequant(w: Tensor) -> Tensor:
    """Q6_K as llama.cpp quantizes it (reference path, no imatrix), dequantized.

    Super-blocks of 256 in 16 sub-blocks of 16; each sub-block's scale is found like
    make_qx_quants, quantized to int8 against the fp16 super-block d; 6-bit codes.
    """
    return _chunked(_q6_k_chunk, _blocks(w, "Q6_K"), w.shape)


def q5_0_dequant(w: Tensor) -> Tensor:
    """Q5_0 (llama.cpp's fallback for Q4_K rows not a multiple of 256): blocks of 32, 5 bits."""
    x = _blocks(w, "Q5_0")
    # d from the value of largest magnitude (the first one on a tie, sign kept); / -16 is exact.
    d = x.gather(1, x.abs().argmax(1, keepdim=True)) / -16
    inv = torch.where(d != 0, _div(1, d), torch.zeros_like(d))
    # The C code truncates x/d + 16.5 (an int8_t cast) and caps it at 31.
    q = torch.trunc(x * inv + 16.5).clamp_(max=31)
    return (_fp16(d) * (q - 16)).reshape(w.shape)


def q8_0_dequant(w: Tensor) -> Tensor:
    """Q8_0 (the fallback for Q6_K, and the output type when rows are not a multiple of 256)."""
    x = _blocks(w, "Q8_0")
    d = _div(x.abs().amax(1, keepdim=True), 127)
    q = _roundf(x * torch.where(d != 0, _div(1, d), torch.zeros_like(d)))
    return (q * _fp16(d)).reshape(w.shape)


def f16_dequant(w: Tensor) -> Tensor:
    """F16: llama.cpp keeps a tensor whose rows are not a multiple of 32 unquantized."""
    return _fp16(w.detach())


DEQUANT: dict[str, Callable[[Tensor], Tensor]] = {
    "Q4_K": q4_k_dequant,
    "Q6_K": q6_k_dequant,
    "Q5_0": q5_0_dequant,
    "Q8_0": q8_0_dequant,
    "F16": f16_dequant,
}


def fake_quantize(w: Tensor, ggml_type: str) -> Tensor:
    """Straight-through fake quantization to `ggml_type` (a key of DEQUANT).

    Forward: llama.cpp's dequant(quant(w)), after rounding w to float16 as edgekd's GGUF export
    writes it before llama.cpp quantizes; backward: identity. The result has w's dtype and
    device (a bfloat16 w gets the dequantized values rounded to bfloat16).
    """
    if ggml_type not in DEQUANT:
        raise EdgekdError(f"ggml type {ggml_type!r} is not one of {', '.join(DEQUANT)}")
    dq = DEQUANT[ggml_type](w.detach().to(torch.float16)).to(w.dtype)
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
