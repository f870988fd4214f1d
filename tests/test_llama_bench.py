"""llama-bench's JSON as the bench's measures, from the real binary's output."""

import json
import subprocess
from pathlib import Path

import pytest

from edgekd import llama_bench
from edgekd.errors import EdgekdError


def test_measures_of_the_real_binary(llama_bench_bin, tiny_llama_gguf):
    _, gguf = tiny_llama_gguf
    argv = [str(llama_bench_bin), "-m", str(gguf), "-p", "8", "-n", "4", "-t", "1", "-r", "2"]
    out = subprocess.run([*argv, "-o", "json"], capture_output=True, text=True, check=True)
    output = json.loads(out.stdout)
    m = llama_bench.measures(output, 8, gguf)
    assert len(m["ttft_s"]) == len(m["decode_s"]) == 2
    tg = next(t for t in output if t["n_gen"] == 4)
    assert [4 / t for t in m["decode_s"]] == pytest.approx(tg["samples_ts"], rel=1e-3)
    assert m["quality"] is None and m["peak_rss_bytes"] is None
    with pytest.raises(EdgekdError, match="8-token prompt, not 16"):
        llama_bench.measures(output, 16, gguf)
    decode_only = [t for t in output if t["n_prompt"] == 0]
    with pytest.raises(EdgekdError, match=r"no prompt \(-p\) test"):
        llama_bench.measures(decode_only, 8, Path("x.gguf"))
