"""The memory verdict under the budget's own cap, for real: a cgroup this host sets (as root) and
the kernel enforces."""

import os
from pathlib import Path

import pytest

from edgekd import benchmark, memcap
from edgekd.benchmark import MIB
from edgekd.report.text import capped_line
from edgekd.testing import TOKEN_IDS

METHOD, WHY = memcap.cap_method()
needs_cap = pytest.mark.skipif(METHOD is None, reason=f"no memory cap on this host: {WHY}")


def _job(gguf: Path) -> benchmark.Job:
    return benchmark.Job("llama.cpp", str(gguf), 1, 128, TOKEN_IDS * 2, 4, 1, 0, [], 1)


@needs_cap
def test_a_child_over_the_cap_is_killed_and_the_peak_measured():
    done = memcap.run_capped(["python3", "-c", "b = bytearray(200 << 20)"], 64 * MIB)
    assert done.killed and done.returncode != 0
    assert 60 * MIB <= done.peak_bytes <= 64 * MIB
    done = memcap.run_capped(["python3", "-c", "b = bytearray(20 << 20); print('ok')"], 256 * MIB)
    assert not done.killed and done.stdout.strip() == "ok"
    assert 20 * MIB < done.peak_bytes < 256 * MIB


@pytest.mark.slow
@needs_cap
def test_verdict_of_a_tiny_model_under_a_cap_too_small_and_one_that_fits(tiny_llama_gguf, tmp_path):
    _, gguf = tiny_llama_gguf
    small = benchmark.measure_capped(_job(gguf), tmp_path, 40 * MIB, [gguf])
    assert small["killed"] and not small["fits"] and small["method"] == METHOD
    line = capped_line({"name": gguf.name, "capped": small})
    assert line.startswith(f"FAIL {gguf.name} was killed at ") and "over the 40 MB cap" in line
    assert small["peak_bytes"] > 35 * MIB  # measured at the cap, not assumed
    roomy = benchmark.measure_capped(_job(gguf), tmp_path, 2048 * MIB, [gguf])
    assert roomy["fits"] and not roomy["killed"]
    assert roomy["peak_rss_bytes"] <= roomy["peak_bytes"] < 2048 * MIB
    assert roomy["speed"]["decode_tps"]["n"] == 1
    line = capped_line({"name": gguf.name, "capped": roomy})
    assert line.startswith(f"PASS {gguf.name} ran within the 2048 MB cap (peak ")
    assert not list(Path("/sys/fs/cgroup/memory").glob(f"edgekd-{os.getpid()}-*"))


def test_no_cap_keeps_the_estimate_labelled():
    line = capped_line(
        {"name": "m.gguf", "capped": {"cap_bytes": 480 * MIB, "method": None, "how": "not root"}}
    )
    assert line == (
        "NO CAP m.gguf: no memory cap could be set on this host (not root); the verdict above "
        "is an estimate"
    )
