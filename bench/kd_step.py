"""The naive full-logit KD step against edgekd's chunked step: same models, batch and length.

    python bench/kd_step.py [--vocab 128256] [--batch 4] [--seq 256] [--steps 5] [--threads 2]
                            [--chunk 64] [--divergence forward_kl]

Each variant runs in its own child process (so peak RSS is its own): a random Llama student and a
larger teacher sharing a large vocabulary, one AdamW step per iteration on a chat-like batch (the
first 30% of each sequence is prompt, labelled -100; the last sequence is padded to 3/4 length).
naive: both models' full fp32 logits and kd_loss (the training loop before
scale.loss_chunk_tokens); edgekd: train.kd_step_loss with the chunked loss, fp32; edgekd-bf16: the
same under bf16 autocast (scale.mixed_precision=bf16; fast only on CPUs with native bf16 matmuls).
Prints tokens/s (median over --steps after one untimed step), peak RSS and the ratios variant /
naive.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

VARIANTS = ("naive", "edgekd", "edgekd-bf16")


def _models(vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(hidden, layers, seed):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=3 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            num_key_value_heads=hidden // 128,
            tie_word_embeddings=True,
            pad_token_id=0,
        )
        return LlamaForCausalLM(config)

    # Small trunks, large vocabulary, and more tokens per batch than hidden dims, as at real scale
    # (8k tokens per micro-batch against 1.5k-4k hidden): the logits dominate memory.
    student = llama(128, 2, seed=0).train()
    teacher = llama(256, 4, seed=1).eval().requires_grad_(False)
    return student, teacher


def _batch(vocab: int, batch: int, seq: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, vocab, (batch, seq), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, 3 * seq // 4 :] = 0
    input_ids[attention_mask == 0] = 0
    labels = input_ids.clone()
    labels[:, : 3 * seq // 10] = -100
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def child(variant: str, args) -> dict:
    """One variant's timings and peak RSS, measured in this process."""
    import torch

    from edgekd.benchmark import rss_bytes
    from edgekd.config import TrainSettings
    from edgekd.train import kd_step_loss

    torch.set_num_threads(args.threads)
    student, teacher = _models(args.vocab)
    batch = _batch(args.vocab, args.batch, args.seq)
    chunk = 0 if variant == "naive" else args.chunk
    settings = TrainSettings(scale={"loss_chunk_tokens": chunk}, kd={"divergence": args.divergence})
    # What accelerate's mixed_precision=bf16 does around the loss (and the model's forward).
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "edgekd-bf16")
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    setup_rss = rss_bytes("VmHWM")
    head = student.get_output_embeddings()
    seconds = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        with autocast:
            out, _ = kd_step_loss(student, head, teacher, batch, settings, alpha=settings.kd.alpha)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - start)
    tokens = int(batch["attention_mask"].sum())
    return {
        "variant": variant,
        "loss": out.loss.item(),
        "tokens": tokens,
        "labelled": int(out.tokens),
        "tokens_per_s": tokens / statistics.median(seconds[1:]),
        "peak_rss_mb": rss_bytes("VmHWM") / 2**20,
        "setup_rss_mb": setup_rss / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=None, help="default: TrainSettings' default")
    ap.add_argument(
        "--divergence",
        default="forward_kl",
        help="forward_kl/reverse_kl take the closed-form gradient, the others autograd per chunk",
    )
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.chunk is None:
        from edgekd.config import TrainSettings

        args.chunk = TrainSettings().scale.loss_chunk_tokens
    if args.variant:
        print(json.dumps(child(args.variant, args)))
        return
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant]
        for key in ("vocab", "batch", "seq", "steps", "threads", "chunk", "divergence"):
            cmd += [f"--{key}", str(getattr(args, key))]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.splitlines()[-1])
    n = results["naive"]
    print(
        f"vocab {args.vocab}, batch {args.batch} x {args.seq} ({n['tokens']} tokens, "
        f"{n['labelled']} labelled), {args.threads} threads, chunk {args.chunk}, "
        f"{args.divergence}, median of {args.steps} steps"
    )
    head = f"{'':12}{'tok/s':>8}{'peak RSS MB':>13}{'setup RSS MB':>14}{'loss':>9}"
    print(f"{head}{'tok/s':>8}{'peak':>7}")
    for r in results.values():
        print(
            f"{r['variant']:12}{r['tokens_per_s']:>8.1f}{r['peak_rss_mb']:>13.0f}"
            f"{r['setup_rss_mb']:>14.0f}{r['loss']:>9.4f}"
            f"{r['tokens_per_s'] / n['tokens_per_s']:>7.2f}x"
            f"{r['peak_rss_mb'] / n['peak_rss_mb']:>6.2f}x"
        )
    print("ratios are variant / naive: tokens/s (median step) and peak RSS of the whole process")


if __name__ == "__main__":
    main()
