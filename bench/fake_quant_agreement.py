"""Does edgekd's fake quantizer give the values llama.cpp's Q4_K_M export stores? Prints a table.

For each model: saves it in Hugging Face layout, writes an F16 GGUF with edgekd.formats.gguf,
quantizes it to Q4_K_M with llama.cpp's own quantizer, reads every tensor back with gguf-py and
compares it with edgekd.quant.gguf_k.fake_quantize applied to the same Hugging Face weight (rows
of attn_q / attn_k permuted the way llama.cpp lays them out). Per tensor: the type llama.cpp chose
and the one q4_k_m_types predicts, the share of identical values, and the largest difference in
quantization steps (the block's scale d*sc, or the float16 spacing for F16).

Models: the embedded teacher SmolLM2-135M (hidden 576, not a multiple of 256, so most of its
tensors fall back to Q5_0 / Q8_0) and a random tiny Llama whose widths are multiples of 256
(real Q4_K / Q6_K, untied output). Then times fake_quantize on a 576x1536 matrix.
Runs on CPU in a few minutes:

    python bench/fake_quant_agreement.py [--threads 2] [--summary]
"""

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from edgekd.formats.gguf import _permute_rope_rows, quantize_gguf, write_gguf
from edgekd.models import load_model, load_tokenizer, resolve_source, save_model
from edgekd.quant.gguf_k import fake_quantize, q4_k_m_types

Q = gguf.GGMLQuantizationType


@dataclass
class Row:
    name: str
    shape: tuple[int, ...]
    llama_type: str
    our_type: str
    identical: float
    max_steps: float


def block_steps(raw: np.ndarray, qtype: Q, values: np.ndarray) -> np.ndarray:
    """The quantization step of each value of a tensor, read from its stored blocks."""
    rows = raw.shape[0]
    if qtype in (Q.Q8_0, Q.Q5_0):
        size = gguf.GGML_QUANT_SIZES[qtype][1]
        d = raw.reshape(-1, size)[:, :2].copy().view(np.float16).astype(np.float32)
        return np.repeat(np.abs(d), 32, axis=1).reshape(rows, -1)
    if qtype == Q.Q4_K:
        blocks = raw.reshape(-1, 144)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        sc, _ = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16].copy())
        return np.repeat(d * sc, 32, axis=1).reshape(rows, -1)
    if qtype == Q.Q6_K:
        blocks = raw.reshape(-1, 210)
        sc = blocks[:, 192:208].copy().view(np.int8).astype(np.float32)
        d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)
        return np.repeat(np.abs(d * sc), 16, axis=1).reshape(rows, -1)
    return np.spacing(values.astype(np.float16)).astype(np.float32)


def agreement(model_dir: Path, quantized: Path) -> list[Row]:
    """Compare every quantized tensor of `quantized` with fake_quantize of model_dir's weights."""
    config = AutoConfig.from_pretrained(model_dir)
    n_head = config.num_attention_heads
    heads = {"q_proj": n_head, "k_proj": config.num_key_value_heads or n_head}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    stored = {t.name: t for t in gguf.GGUFReader(quantized).tensors}
    ours = q4_k_m_types(config)
    rows = []
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        for hf_name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
            if gguf_name not in stored:  # a tied lm_head, written once as token_embd
                continue
            t = stored[gguf_name]
            theirs = gguf.quants.dequantize(t.data, t.tensor_type).reshape(t.data.shape[0], -1)
            our_type = ours.get(hf_name, "F32")
            w = f.get_tensor(hf_name)
            mine = w.float() if our_type == "F32" else fake_quantize(w, our_type).detach()
            kind = hf_name.split(".")[-2]
            if kind in heads:
                mine = _permute_rope_rows(mine, heads[kind])
            mine = mine.reshape(theirs.shape).numpy()
            steps = block_steps(t.data, t.tensor_type, theirs)
            diff = np.abs(mine - theirs)
            off = diff > 0
            rows.append(
                Row(
                    hf_name,
                    tuple(w.shape),
                    t.tensor_type.name,
                    our_type,
                    float(1 - off.mean()),
                    float((diff[off] / steps[off]).max()) if off.any() else 0.0,
                )
            )
    return rows


def quantized_pair(model_dir: Path, threads: int) -> Path:
    f16 = write_gguf(model_dir, model_dir.with_suffix(".F16.gguf"), dtype="F16")
    return quantize_gguf(f16, model_dir.with_suffix(".Q4_K_M.gguf"), "Q4_K_M", threads=threads)


def print_table(title: str, rows: list[Row], summary: bool) -> None:
    print(f"\n## {title}")
    if not summary:
        print(f"{'tensor':48} {'shape':>13} {'llama.cpp':>9} {'ours':>5} {'identical':>10} steps")
        for r in rows:
            shape = "x".join(map(str, r.shape))
            print(
                f"{r.name:48} {shape:>13} {r.llama_type:>9} {r.our_type:>5} "
                f"{100 * r.identical:9.4f}% {r.max_steps:.3g}"
            )
    quantized = [r for r in rows if r.llama_type != "F32"]
    same_type = sum(r.llama_type == r.our_type for r in rows)
    by_type: dict[str, int] = {}
    for r in quantized:
        by_type[r.llama_type] = by_type.get(r.llama_type, 0) + 1
    worst = min(quantized, key=lambda r: r.identical)
    print(
        f"types agree on {same_type}/{len(rows)} tensors ({by_type}); "
        f"identical values: worst tensor {100 * worst.identical:.4f}% ({worst.name}), "
        f"largest difference {max(r.max_steps for r in rows):.3g} steps"
    )


def timings(threads: int) -> None:
    print(f"\n## fake_quantize on a 576x1536 matrix, CPU, {threads} threads (best of 5)")
    w = (torch.randn(576, 1536) * 0.02).requires_grad_()
    for ggml_type in ("Q4_K", "Q6_K", "Q5_0", "Q8_0"):
        fwd, bwd = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            out = fake_quantize(w, ggml_type)
            t1 = time.perf_counter()
            out.sum().backward()
            fwd.append(t1 - t0)
            bwd.append(time.perf_counter() - t1)
        print(f"{ggml_type}: forward {1000 * min(fwd):.0f} ms, backward {1000 * min(bwd):.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--summary", action="store_true", help="one line per model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = resolve_source("embedded", role="teacher")
    tokenizer = load_tokenizer(source)
    with tempfile.TemporaryDirectory(prefix="edgekd-fq-") as tmp:
        smol = Path(tmp) / "smollm2"
        save_model(load_model(source), tokenizer, smol)
        print_table(
            "SmolLM2-135M (hidden 576, tied)",
            agreement(smol, quantized_pair(smol, args.threads)),
            args.summary,
        )

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        tiny = Path(tmp) / "tiny"
        save_model(LlamaForCausalLM(config), tokenizer, tiny)
        print_table(
            "random tiny Llama (hidden 256, ffn 768, 8 layers, untied)",
            agreement(tiny, quantized_pair(tiny, args.threads)),
            args.summary,
        )
    timings(args.threads)


if __name__ == "__main__":
    main()
