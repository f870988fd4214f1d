"""llama.cpp's llama-bench output as the bench's measures: its prompt test's times as the time to
first token, its decode test's as the decode times, run by run; what it does not measure is None.
"""

from __future__ import annotations

from pathlib import Path

from edgekd.errors import EdgekdError

# What llama-bench does not measure: its rows name these rather than fill them.
NOT_MEASURED = ("held-out quality", "exact match", "peak memory")


def _test(output: list[dict], prompt: bool, path: Path) -> dict:
    for test in output:
        if (test["n_prompt"] > 0) == prompt and (test["n_gen"] > 0) != prompt:
            return test
    kind = "prompt (-p)" if prompt else "decode (-n)"
    raise EdgekdError(f"{path}: llama-bench's JSON has no {kind} test; is it llama.cpp's own?")


def measures(output: list[dict], prompt_tokens: int, path: Path) -> dict:
    """The measures `benchmark.artifact_row` takes, from llama-bench's `-o json` list (one prompt
    test of `prompt_tokens` tokens, one decode test)."""
    pp, tg = _test(output, True, path), _test(output, False, path)
    if pp["n_prompt"] != prompt_tokens:
        raise EdgekdError(
            f"{path}: llama-bench measured a {pp['n_prompt']}-token prompt, not {prompt_tokens}"
        )
    return {
        "baseline_rss_bytes": None,
        "peak_rss_bytes": None,
        "load_s": None,
        "ttft_s": [ns / 1e9 for ns in pp["samples_ns"]],
        "decode_s": [ns / 1e9 for ns in tg["samples_ns"]],
        "quality": None,
        "exact_match": {"correct": 0, "total": 0, "items": []},
    }
