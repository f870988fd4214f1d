"""How much faster is batched teacher generation than one prompt at a time? Prints tokens/s.

Answers the same shipped prompts with the embedded SmolLM2-135M GGUF teacher twice: the old
sequential path (one Llama.create_chat_completion per prompt) and
edgekd.formats.llama_cpp.LlamaCpp.generate (continuous batching, `parallel` sequences per decode).
Both are greedy; runs alternate so both see the same machine load, and medians are reported.
Tokens are counted by re-tokenizing each answer, the same way for both paths. llama.cpp's
OpenMP threads busy-wait by default, which is much slower when other processes share the
cores; run with passive waiting:

    OMP_WAIT_POLICY=PASSIVE python bench/teacher_generation.py [--prompts 16] [--runs 3]
        [--parallel 8 16 32]
"""

import argparse
import statistics
import time
from pathlib import Path

from llama_cpp import Llama

from edgekd.config import GenerationSettings
from edgekd.data import default_prompts
from edgekd.formats.llama_cpp import LlamaCpp
from edgekd.models import embedded_teacher_gguf


def sequential(gguf: Path, prompts: list[dict], max_tokens: int, threads: int) -> list[str]:
    """The previous implementation: one create_chat_completion per prompt."""
    vocab = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    longest = max(len(vocab.tokenize(p["prompt"].encode())) for p in prompts)
    llm = Llama(
        model_path=str(gguf), n_ctx=longest + 256 + max_tokens, n_threads=threads, verbose=False
    )
    answers = []
    for p in prompts:
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": p["prompt"]}],
            max_tokens=max_tokens,
            temperature=0.0,
        )
        answers.append((out["choices"][0]["message"]["content"] or "").strip())
    return answers


def main() -> None:
    defaults = GenerationSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--parallel", type=int, nargs="+", default=[defaults.parallel])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    gguf = embedded_teacher_gguf()
    prompts = default_prompts()[: args.prompts]
    vocab = Llama(model_path=str(gguf), vocab_only=True, verbose=False)

    def count(answers: list[str]) -> int:
        return sum(len(vocab.tokenize(a.encode(), add_bos=False)) for a in answers)

    paths = {"sequential": lambda: sequential(gguf, prompts, args.max_tokens, args.threads)}
    for width in args.parallel:
        paths[f"batched x{width}"] = lambda width=width: [
            answer.strip()
            for answer in LlamaCpp(gguf, threads=args.threads).generate(
                [[{"role": "user", "content": p["prompt"]}] for p in prompts],
                max_tokens=args.max_tokens,
                seed=0,
                temperature=0.0,
                parallel=width,
            )
        ]
    rates: dict[str, list[float]] = {name: [] for name in paths}
    answers: dict[str, list[str]] = {}
    for run in range(args.runs):
        for name, generate in paths.items():
            start = time.perf_counter()
            answers[name] = generate()
            seconds = time.perf_counter() - start
            rates[name].append(count(answers[name]) / seconds)
            print(f"run {run + 1} {name:>14}: {rates[name][-1]:6.1f} tok/s ({seconds:.1f} s)")

    base = statistics.median(rates["sequential"])
    print(f"\n{len(prompts)} prompts, max_tokens {args.max_tokens}, {args.threads} threads")
    for name, r in rates.items():
        same = sum(a == b for a, b in zip(answers[name], answers["sequential"], strict=True))
        print(
            f"{name:>14}: median {statistics.median(r):6.1f} tok/s, "
            f"x{statistics.median(r) / base:.2f}, same answer as sequential {same}/{len(prompts)}"
        )


if __name__ == "__main__":
    main()
