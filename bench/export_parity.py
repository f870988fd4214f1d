"""How faithful are the GGUF and ONNX exports of the embedded teacher? Prints the numbers.

Takes SmolLM2-135M-Instruct (the embedded GGUF, dequantized by transformers), saves it in
Hugging Face layout, then:
- GGUF: writes F16 with edgekd.formats.gguf, counts tokenization mismatches against the
  Hugging Face tokenizer on ~50 varied texts (and the original GGUF's own tokenizer), measures
  KL(torch || llama.cpp) and top1 agreement, quantizes to Q4_K_M (size, time, same measures);
- ONNX: exports with optimum-onnx (time, max abs log-prob difference, KL), quantizes to int4 and
  int8 (size, time, KL, top1).
Runs on CPU in a few minutes:

    python bench/export_parity.py [--threads 2]
"""

import argparse
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgekd.config import ExportOnnxSettings
from edgekd.evaluate import quality
from edgekd.formats import gguf, onnx
from edgekd.formats.llama_cpp import LlamaCpp
from edgekd.formats.ort import Ort
from edgekd.models import embedded_teacher_gguf, load_tokenizer, resolve_source

PROSE = [
    "The water cycle describes how water moves between the oceans, the air and the land.",
    "Q: What is the capital of France?\nA: The capital of France is Paris.",
    "To make a cup of tea, boil fresh water and pour it over the tea bag or leaves.",
    "Photosynthesis is the process by which green plants use sunlight to make glucose.",
    "Dear Maria,\nThank you for your letter.\nBest wishes,\nTom",
]
CODE = [
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name HAVING COUNT(*) > 2;",
    '<div class="box">\n  <p>Hello &amp; welcome</p>\n</div>',
    '{"key": [1, 2.5, -3e10, null, true], "nested": {"a": "b"}}',
]
NUMBERS = [
    "7 42 1234567 3.14159 1,000,000 -0.5e-10 0x1F 0b1010 007",
    "2024-06-01T12:34:56Z and 12:30pm, 1/2, 3/4, 99.9%",
    "½ ¼ ² ³ ¹⁰ ① ② ٣٤٥ ８９ ⅓",
    "x²+y³=z and H₂O, 10⁻⁹ m",
    "Call +1 (555) 123-4567 or 555.123.4567",
]
UNICODE = [
    "café naïve résumé — “quotes” ‘single’ … ñ ü ß ø å æ œ ç",
    "中文文本测试，还有日本語のテキスト、한국어 텍스트",
    "Кириллица и ελληνικά και العربية עברית हिन्दी ไทย",
    "Emoji 🚀🦙😶\u200d🌫️ ✅ 👍🏽 family 👨\u200d👩\u200d👧 flags 🇫🇷🇯🇵",
    "Zero\u200bwidth, non\u00a0breaking, soft\u00adhyphen, BOM\ufeff, RTL \u202ehello",
    "Math ∀x∈ℝ: x²≥0, ∑ᵢ aᵢ, √2 ≈ 1.414, ∞ ≠ ∅",
]
WHITESPACE = [
    "   leading and trailing   ",
    "tabs\tand\t\ttabs\nnewlines\n\n\nand\r\nwindows\r\n",
    "a\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \nb",
    "        eight spaces then text",
    " ",
    "\n",
    "",
]
ODD = [
    "I've been 'told he's there, 'RE you sure? We'Ve a'lL",
    "!!!???...,,,;;;:::---===+++***###@@@",
    "CamelCaseWords snake_case_words kebab-case-words SHOUTING_CASE",
    "URL https://example.com/path?q=1&b=two#frag and email a.b@c.org",
    "text with <|endoftext|> inside and <|im_end|> and <|im_start|>",
    "<file_sep><filename>main.py<gh_stars>100",
]
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "Écris un haïku sur la mer."}],
    [{"role": "user", "content": "Write code:\n```py\nprint(1)\n```"}],
    [{"role": "user", "content": "  spaces  \n\n and newlines \n"}],
]


def texts(tokenizer) -> list[str]:
    rng = random.Random(0)
    pool = "".join(PROSE + CODE + NUMBERS + UNICODE + WHITESPACE + ODD)
    shuffled = ["".join(rng.choice(pool) for _ in range(80)) for _ in range(11)]
    chats = [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=i % 2 == 0)
        for i, c in enumerate(CHATS)
    ]
    return PROSE + CODE + NUMBERS + UNICODE + WHITESPACE + ODD + chats + shuffled


def mismatches(got: list[list[int]], tokenizer, items: list[str]) -> list[str]:
    return [t for t, ids in zip(items, got, strict=True) if tokenizer(t)["input_ids"] != ids]


def measure(name: str, logprobs: list[torch.Tensor], reference: list[torch.Tensor], seqs) -> None:
    targets = [torch.tensor(s[1:]) for s in seqs]
    q = quality([lp[:-1] for lp in logprobs], [r[:-1] for r in reference], targets)
    diff = max((lp - r).abs().max().item() for lp, r in zip(logprobs, reference, strict=True))
    print(
        f"  {name:<14} kld {q.kld:.2e}  top1 {q.top1:.4f}  ppl {q.ppl:7.2f}  "
        f"max|dlogp| {diff:.2e}  ({q.tokens} tokens)"
    )


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.name.startswith("model.")]
    return sum(p.stat().st_size for p in files) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    teacher = embedded_teacher_gguf()
    tmp = Path(tempfile.mkdtemp(prefix="edgekd-export-parity-"))
    hf = tmp / "hf"
    model = AutoModelForCausalLM.from_pretrained(
        teacher.parent, gguf_file=teacher.name, dtype=torch.float32
    ).eval()
    # edgekd's loader, which repairs the special tokens transformers gets wrong from a GGUF.
    tokenizer = load_tokenizer(resolve_source("embedded", role="teacher"))
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    (hf / "tokenizer.model").unlink(missing_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    print(f"teacher {teacher.name} -> {hf}")

    seqs = [tokenizer(t)["input_ids"] for t in PROSE + CODE[:2] + [texts(tokenizer)[-7]]]
    with torch.no_grad():
        reference = [torch.log_softmax(model(torch.tensor([s])).logits[0], -1) for s in seqs]

    print("GGUF")
    t = time.perf_counter()
    f16 = gguf.write_gguf(hf, tmp / "model-F16.gguf")
    print(f"  write F16      {time.perf_counter() - t:.1f} s, {size_mb(f16):.1f} MB")
    items = texts(tokenizer)
    bad = mismatches(LlamaCpp(f16, threads=args.threads).tokenize(items), tokenizer, items)
    print(f"  tokenization   {len(bad)} of {len(items)} texts differ (HF vs written GGUF)")
    drift = mismatches(LlamaCpp(teacher, threads=args.threads).tokenize(items), tokenizer, items)
    print(
        f"  tokenization   {len(drift)} of {len(items)} texts differ (HF from GGUF vs the "
        f"original GGUF in llama.cpp): {[d[:30] for d in drift]}"
    )
    measure(
        "F16",
        LlamaCpp(f16, threads=args.threads).logprobs(seqs),
        reference,
        seqs,
    )
    measure(
        "original Q4_1",
        LlamaCpp(teacher, threads=args.threads).logprobs(seqs),
        reference,
        seqs,
    )
    t = time.perf_counter()
    q4 = gguf.quantize_gguf(f16, tmp / "model-Q4_K_M.gguf", "Q4_K_M", threads=args.threads)
    print(f"  Q4_K_M         {time.perf_counter() - t:.1f} s, {size_mb(q4):.1f} MB")
    # Rows whose length is not a multiple of 256 cannot take K-quants: llama.cpp falls back.
    types = Counter(
        (t.name.split(".")[-2] if t.name.startswith("blk.") else t.name, t.tensor_type.name)
        for t in GGUFReader(q4).tensors
    )
    print("  Q4_K_M types  ", ", ".join(f"{n} {k} x{c}" for (n, k), c in sorted(types.items())))
    measure(
        "Q4_K_M",
        LlamaCpp(q4, threads=args.threads).logprobs(seqs),
        reference,
        seqs,
    )
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    print(
        "  Q4_K_M says   ",
        repr(LlamaCpp(q4, threads=args.threads, n_ctx=256).chat([chat], max_tokens=24)[0]),
    )

    print("ONNX")
    t = time.perf_counter()
    fp32 = onnx.export_onnx(hf, tmp / "onnx")
    print(f"  export fp32    {time.perf_counter() - t:.1f} s, {size_mb(fp32):.1f} MB")
    measure("fp32", Ort(fp32, threads=args.threads).logprobs(seqs), reference, seqs)
    for kind in ("int4", "int8"):
        t = time.perf_counter()
        settings = ExportOnnxSettings()
        out = onnx.quantize_onnx(
            fp32,
            tmp / f"onnx-{kind}",
            kind,
            block_size=settings.block_size,
            accuracy_level=settings.accuracy_level,
            method=settings.int4_method,
            head_bits=settings.head_bits,
            int8_projections=settings.int8_projections,
        )
        print(f"  {kind:<14} {time.perf_counter() - t:.1f} s, {size_mb(out):.1f} MB")
        measure(kind, Ort(out, threads=args.threads).logprobs(seqs), reference, seqs)
        print(
            f"  {kind} says     ",
            repr(
                Ort(out, threads=args.threads, tokenizer=tokenizer).chat([chat], max_tokens=24)[0]
            ),
        )
    print(f"artifacts in {tmp}")


if __name__ == "__main__":
    main()
