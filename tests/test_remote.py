"""Faults between the host and the device, for real, against an OpenSSH server on 127.0.0.1: each
is one line naming the device and what to do, the host bench's rows stand, and nothing is left
running or lying on the device."""

import os
import subprocess
from pathlib import Path

import pytest

from edgekd import device, remote
from edgekd.benchmark import Artifact
from edgekd.config import BenchSettings, DeviceSettings, load_profile
from edgekd.device_runner import content_sha256
from edgekd.errors import EdgekdError
from edgekd.testing import TOKEN_IDS, kill_on_device, tmpfs

SETTINGS = BenchSettings(
    runs=1, warmup_runs=0, prompt_tokens=16, decode_tokens=4, questions=0, threads=1
)


def _bench(server, artifact: Path, **settings) -> dict:
    profile = load_profile("phone-1gb").model_copy(update={"context_length": 256})
    return device.bench_on_device(
        DeviceSettings(**server.device(**settings)),
        [Artifact(artifact.name, "llama.cpp", artifact, shipped=True)],
        profile=profile,
        settings=SETTINGS,
        prompt=(TOKEN_IDS * 2)[:16],
        questions=[],
    )


def _fault(part: dict) -> str:
    lines = ([part["error"]] if "error" in part else []) + list(part["errors"].values())
    assert len(lines) == 1 and not part["rows"], part
    assert "\n" not in lines[0]
    return lines[0]


def _nothing_left(server) -> None:
    runs = server.folder / "device" / "runs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"{server.folder / 'device'}/runs/" not in ps, ps  # this device's runners


def test_unreachable_host(ssh_server, tiny_llama_gguf):
    line = _fault(_bench(ssh_server, tiny_llama_gguf[1], host="ssh://root@board.invalid"))
    assert "is unreachable" in line and "board.invalid" in line


def test_wrong_port(ssh_server, tiny_llama_gguf):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = _fault(_bench(ssh_server, tiny_llama_gguf[1], host=f"ssh://root@127.0.0.1:{port}"))
    assert "refused the connection" in line and "port" in line


def test_refused_key(ssh_server, tiny_llama_gguf, tmp_path):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    config = tmp_path / "ssh_config"
    config.write_text(
        ssh_server.ssh_config.read_text().replace(str(ssh_server.client_key), str(other))
    )
    line = _fault(_bench(ssh_server, tiny_llama_gguf[1], ssh_config=str(config)))
    assert "refused the SSH key" in line and "never asks for a password" in line


def test_unknown_host_key(ssh_server, tiny_llama_gguf, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    options = [f"UserKnownHostsFile={empty}"]
    line = _fault(_bench(ssh_server, tiny_llama_gguf[1], ssh_options=options))
    assert "host key is not in known_hosts" in line and "once by hand" in line
    assert empty.read_text() == ""  # nothing accepted behind the user's back


def test_no_python(ssh_server, tiny_llama_gguf):
    line = _fault(_bench(ssh_server, tiny_llama_gguf[1], python="/opt/nothing/python3"))
    assert "has no Python at '/opt/nothing/python3'" in line and "pkg install python" in line


def test_python_without_the_runtime(ssh_server, tiny_llama_gguf):
    bare = "/usr/bin/python3"  # Debian's, without numpy or llama-cpp-python
    if subprocess.run([bare, "-c", "import numpy"], capture_output=True).returncode == 0:
        pytest.skip(f"{bare} has numpy here")
    line = _fault(_bench(ssh_server, tiny_llama_gguf[1], python=bare))
    assert "lacks numpy, llama_cpp" in line and "pip install llama-cpp-python" in line


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small file system needs root")
def test_out_of_disk(ssh_server, tiny_llama_gguf, tmp_path):
    with tmpfs(tmp_path / "small", 2) as small:
        line = _fault(_bench(ssh_server, tiny_llama_gguf[1], workdir=str(small)))
        assert "is out of disk" in line and "device.workdir" in line
        store = small / "artifacts"
        assert not store.exists() or not any(store.iterdir())


def test_out_of_memory_before_copying():
    ssh = remote.Ssh.of(DeviceSettings(host="pi@board"))
    info = {"python": "3.11", "numpy": "2", "llama_cpp": "0.3", "onnxruntime": None}
    info |= {"cached": True, "disk_free_bytes": 10**12, "mem_available_bytes": 100 << 20}
    info |= {"workdir": "~/.cache/edgekd"}
    with pytest.raises(EdgekdError, match=r"out of memory: 105 MB available, .* needs 600 MB"):
        remote.check(ssh, info, "llama.cpp", need_bytes=600_000_000, copy_bytes=0)
    with pytest.raises(EdgekdError, match=r"lacks onnxruntime; pip install onnxruntime"):
        remote.check(ssh, info, "onnxruntime", need_bytes=0, copy_bytes=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("what", "said"),
    [("runner", "the runner was killed there"), ("connection", "dropped while measuring")],
)
def test_killed_mid_run(what, said, ssh_server, tiny_llama_gguf):
    _killed_mid_run(what, said, ssh_server, tiny_llama_gguf)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("what", "said"),
    [("runner", "the runner was killed there"), ("connection", "dropped while measuring")],
)
def test_llama_bench_killed_mid_run(what, said, ssh_server, tiny_llama_gguf, llama_bench_bin):
    """The runner's llama-bench child does not outlive a killed runner or a dropped connection."""
    _killed_mid_run(what, said, ssh_server, tiny_llama_gguf, binary=str(llama_bench_bin))


def _killed_mid_run(what, said, ssh_server, tiny_llama_gguf, binary=None):
    _, gguf = tiny_llama_gguf
    ssh = remote.Ssh.of(DeviceSettings(**ssh_server.device()))
    job = {
        "name": gguf.name, "runtime": "llama.cpp", "threads": 1, "n_ctx": 256,
        "prompt": TOKEN_IDS, "decode_tokens": 64, "runs": 400, "warmup_runs": 0,
        "conversations": [], "answer_max_tokens": 1, "heldout": None,
    }  # fmt: skip
    if binary:
        job.update(runtime="llama-bench", binary=binary, decode_tokens=256)
    killer = kill_on_device(ssh_server.folder / "device", what)
    with pytest.raises(EdgekdError, match=said) as err:
        remote.measure(ssh, remote.Kept(gguf, content_sha256(gguf), False), job, None)
    killer.join()
    assert "\n" not in str(err.value)
    _nothing_left(ssh_server)
