"""The device over SSH: ask it what it has, copy an artifact to it once, run the device runner
there and bring its measures back.

Everything goes through the system's OpenSSH client (`ssh`) with the user's own configuration,
keys and known_hosts, and `BatchMode=yes`: nothing ever prompts, no password is asked for or
stored, and a host key is checked as ssh checks it. Each failure ssh reports becomes one line that
names the device and says what to do. The device needs Python with numpy and the artifact's runtime
(llama-cpp-python or onnxruntime), or only Python's standard library where a `llama-bench` binary
there measures GGUF files; edgekd sends `device_runner.py`, never itself.

On the device, `workdir/artifacts/<sha256>/` keeps each artifact and the build's held-out slice (a
second bench of the same bytes copies nothing) and `workdir/runs/<id>/` one run's runner and job;
the run folder is removed afterwards, and its runner's process group (llama-bench included)
killed, whatever happened.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import subprocess
import tarfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from edgekd import device_runner
from edgekd.config import DeviceSettings
from edgekd.errors import EdgekdError

RUNNER = Path(device_runner.__file__)
# What each runtime the runner knows needs imported on the device, and how to get it there.
RUNTIME_MODULES = {"llama.cpp": "llama_cpp", "onnxruntime": "onnxruntime"}
# The runner's runtimes and the modules each needs there: llama-bench is a binary, the runner
# only starts it.
_NEEDS = {
    "llama.cpp": ("numpy", "llama_cpp"),
    "onnxruntime": ("numpy", "onnxruntime"),
    "llama-bench": (),
}
_INSTALL = {
    "numpy": "pip install numpy (Termux: pkg install python-numpy)",
    "llama_cpp": "pip install llama-cpp-python (it compiles; Termux: pkg install clang cmake "
    "first)",
    "onnxruntime": "pip install onnxruntime (wheels exist for 64-bit ARM Linux)",
}
_NO_PYTHON = (
    "install Python 3 (Raspberry Pi OS: sudo apt install python3 python3-numpy; Termux: pkg "
    "install python) or name the device's interpreter in the profile's device.python"
)
_SLACK = 64 << 20  # disk and memory the device keeps beyond what the artifact needs
_EXTRACT = (
    "import pathlib,sys,tarfile;d=pathlib.Path(sys.argv[1]).expanduser();"
    "d.mkdir(parents=True);tarfile.open(fileobj=sys.stdin.buffer,mode='r|').extractall(d)"
)
# Kills the run's process group (a llama-bench the runner started stays in it after a runner killed
# alone) if a member still names the run's folder (the pid may have been reused), else the runner
# alone if it still names it, and removes the run's folder.
_CLEANUP = """
import os, pathlib, shutil, signal, sys
d = pathlib.Path(sys.argv[1]).expanduser()
def names_run(p):
    try:
        return str(d).encode() in (p / "cmdline").read_bytes()
    except OSError:
        return False
def group(p):
    try:
        return os.getpgid(int(p.name))
    except (OSError, ValueError):
        return None
try:
    pid = int((d / "pid").read_text())
    if any(group(p) == pid and names_run(p) for p in pathlib.Path("/proc").glob("[0-9]*")):
        os.killpg(pid, signal.SIGKILL)
    elif names_run(pathlib.Path(f"/proc/{pid}")):
        os.kill(pid, signal.SIGKILL)
except (OSError, ValueError):
    pass
shutil.rmtree(d, ignore_errors=True)
"""


@dataclass(frozen=True)
class Ssh:
    """How to reach one device: the ssh destination and the options around it."""

    label: str
    destination: str
    port: int | None
    options: tuple[str, ...]
    python: str
    workdir: str
    run_timeout_s: int

    @classmethod
    def of(cls, device: DeviceSettings) -> Ssh:
        if device.host.startswith("ssh://"):
            parts = urlsplit(device.host)
            user = f"{parts.username}@" if parts.username else ""
            destination, port = f"{user}{parts.hostname}", parts.port
        else:
            destination, port = device.host, None
        options = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={device.connect_timeout_s}"]
        # A device that stops answering ends the session in 15 s instead of hanging the bench.
        options += ["-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
        if device.ssh_config:
            options += ["-F", str(Path(device.ssh_config).expanduser())]
        for option in device.ssh_options:
            options += ["-o", option]
        return cls(
            device.label,
            destination,
            port,
            tuple(options),
            device.python,
            device.workdir,
            device.run_timeout_s,
        )

    def argv(self, command: str) -> list[str]:
        port = ["-p", str(self.port)] if self.port else []
        return ["ssh", *self.options, *port, self.destination, command]

    def where(self) -> str:
        """The device as the user would ssh to it."""
        return f"ssh{f' -p {self.port}' if self.port else ''} {self.destination}"


def remote_path(path: str) -> str:
    """A device path for its shell: quoted, with a leading ~ left for the shell to expand."""
    if path == "~" or path.startswith("~/"):
        return '"$HOME"' + (shlex.quote(path[1:]) if len(path) > 1 else "")
    return shlex.quote(path)


def python_command(ssh: Ssh, *args: str) -> str:
    """`exec PYTHON ARGS...` for the device's shell (exec: the runner leads its process group)."""
    quoted = [remote_path(a) if a.startswith("~") else shlex.quote(a) for a in args]
    return " ".join(["exec", shlex.join(shlex.split(ssh.python)), *quoted])


def explain(ssh: Ssh, returncode: int, stderr: str, doing: str) -> EdgekdError:
    """One line for a failed ssh command, from ssh's own words."""
    return _ssh_fault(ssh, returncode, stderr, doing) or _failed(ssh, returncode, stderr, doing)


def _failed(ssh: Ssh, returncode: int, stderr: str, doing: str) -> EdgekdError:
    tail = " ".join(stderr.strip().splitlines()[-2:]) or f"exit code {returncode}"
    return EdgekdError(f"device {ssh.label}: {doing} failed with exit code {returncode}: {tail}")


def _ssh_fault(ssh: Ssh, returncode: int, stderr: str, doing: str) -> EdgekdError | None:
    """The line for a fault ssh itself reports (reaching, trusting, keeping the connection), or
    a missing Python; None for anything else."""
    tail = " ".join(stderr.strip().splitlines()[-2:]) or f"exit code {returncode}"
    at = f"device {ssh.label} ({ssh.where()})"
    if returncode == 255:
        if "Could not resolve hostname" in stderr or "Name or service not known" in stderr:
            return EdgekdError(f"{at} is unreachable: its name does not resolve; check device.host")
        if "Connection refused" in stderr:
            return EdgekdError(
                f"{at} refused the connection: no SSH server listens on that port; check the "
                "port in device.host and that sshd runs there"
            )
        unreachable = ("timed out", "No route to host", "Network is unreachable")
        if any(s in stderr for s in unreachable) and "Timeout, server" not in stderr:
            return EdgekdError(f"{at} is unreachable ({tail}); check that it is on the network")
        if "Host key verification failed" in stderr or "IDENTIFICATION HAS CHANGED" in stderr:
            return EdgekdError(
                f"{at}: its host key is not in known_hosts (or has changed), so ssh refuses it; "
                f"run `{ssh.where()}` once by hand to check and accept the key, or add it to "
                "~/.ssh/known_hosts"
            )
        if "Permission denied" in stderr:
            return EdgekdError(
                f"{at} refused the SSH key ({tail}); install your public key there (ssh-copy-id) "
                "or name it in ~/.ssh/config (IdentityFile): edgekd never asks for a password"
            )
        if any(s in stderr for s in ("closed by remote host", "Broken pipe", "reset by peer")) or (
            "Timeout, server" in stderr
        ):
            return EdgekdError(f"the connection to {at} dropped while {doing} ({tail})")
    if returncode == 127:
        return EdgekdError(f"{at} has no Python at {ssh.python!r} ({tail}); {_NO_PYTHON}")
    return None


def ssh_run(ssh: Ssh, command: str, doing: str, stdin: bytes = b"", timeout: float = 600) -> str:
    """Run `command` on the device; its stdout, or an EdgekdError naming the fault."""
    try:
        proc = subprocess.run(ssh.argv(command), input=stdin, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EdgekdError(f"device {ssh.label}: {doing} took over {timeout:.0f} s") from None
    except FileNotFoundError:
        raise EdgekdError(
            "no ssh client on this host; install OpenSSH (Debian: apt install openssh-client)"
        ) from None
    err = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise explain(ssh, proc.returncode, err, doing)
    return proc.stdout.decode(errors="replace")


def last_json(stdout: str) -> dict:
    """The runner's answer: its last line of output (libraries may print before it)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    return json.loads(lines[-1])


def probe(ssh: Ssh, *shas: str) -> dict:
    """What the device has: Python, numpy and the runtimes, memory, disk, CPU, and which of `shas`
    it keeps already ("cached": the first)."""
    command = python_command(ssh, "-", "probe", ssh.workdir, *shas)
    out = ssh_run(ssh, command, "asking what it has", RUNNER.read_bytes(), timeout=120)
    return last_json(out)


def check(
    ssh: Ssh, info: dict, runtime: str, need_bytes: int, copy_bytes: int, run_bytes: int = 0
) -> None:
    """One line saying what the device lacks for this artifact (`need_bytes` of memory; on disk
    `copy_bytes` unless cached, and `run_bytes` for the run's files), and how to get it."""
    at = f"device {ssh.label} ({ssh.where()})"
    if runtime not in _NEEDS:
        raise EdgekdError(
            f"{at}: the device runner runs GGUF files (llama-cpp-python) and ONNX folders "
            f"(onnxruntime), not {runtime} artifacts"
        )
    missing = [m for m in _NEEDS[runtime] if not info.get(m)]
    if missing:
        how = "; ".join(_INSTALL[m] for m in missing)
        raise EdgekdError(
            f"{at}: its Python {info['python']} ({ssh.python}) lacks {', '.join(missing)}; {how}"
        )
    free = info.get("disk_free_bytes") or 0
    disk = (0 if info.get("cached") else copy_bytes) + run_bytes + _SLACK
    if free < disk:
        raise EdgekdError(
            f"{at} is out of disk: {free / 1e6:.0f} MB free in {info['workdir']}, the artifact "
            f"and the run's files need {disk / 1e6:.0f} MB; free space there or set "
            "device.workdir"
        )
    available = info.get("mem_available_bytes")
    if available is not None and available < need_bytes:
        raise EdgekdError(
            f"{at} is out of memory: {available / 1e6:.0f} MB available, the artifact needs "
            f"{need_bytes / 1e6:.0f} MB (weights + KV cache); close apps there or lower the "
            "profile's context_length"
        )


def check_binary(ssh: Ssh, path: str) -> None:
    """One line unless `path` is an executable file on the device (the profile's llama-bench)."""
    quoted = remote_path(path) if path.startswith("~") else shlex.quote(path)
    answer = ssh_run(
        ssh,
        f"test -f {quoted} && test -x {quoted} && echo yes || echo no",
        "checking device.llama_bench",
    )
    if answer.strip() != "yes":
        raise EdgekdError(
            f"device {ssh.label} ({ssh.where()}) has no executable llama-bench at {path!r} "
            "(device.llama_bench): build it there (llama.cpp's cmake target llama-bench; "
            "scripts/build_llama_tools.sh does it for this host) and name its path, or unset "
            "device.llama_bench to bench with llama-cpp-python"
        )


def _tar(entries: list[tuple[str, Path | bytes]]) -> bytes:
    """A tar stream of files and folders (Path) and small files (bytes), by archive name."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, item in entries:
            if isinstance(item, Path):
                tar.add(item, arcname=name)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(item)
                tar.addfile(info, io.BytesIO(item))
    return buffer.getvalue()


@dataclass(frozen=True)
class Kept:
    """A file or folder the device keeps by sha256 in workdir/artifacts (copied once)."""

    path: Path
    sha: str
    cached: bool  # already there

    def on_device(self) -> str:
        """Its path relative to a run's folder."""
        return f"../../artifacts/{self.sha}/{self.path.name}"


@dataclass(frozen=True)
class RemoteRun:
    """One artifact measured on the device, and what the remote path cost."""

    result: dict  # what the runner sent back
    copy_s: float | None  # None: the same sha256 was already on the device
    copy_bytes: int
    heldout_copy_s: float | None  # None: no held-out slice, or already on the device
    heldout_copy_bytes: int
    setup_s: float  # sending the runner and the job
    run_s: float  # the runner's whole run, its start and the measures in it


def _pump(stream, sink: list[bytes]) -> threading.Thread:
    thread = threading.Thread(target=lambda: sink.append(stream.read()), daemon=True)
    thread.start()
    return thread


def measure(ssh: Ssh, artifact: Kept, job: dict, heldout: Kept | None) -> RemoteRun:
    """Send the runner and the job, the artifact and the held-out slice unless the device keeps
    them, run the job and clean up. The runner lives as long as this ssh session's stdin stays
    open."""
    run_dir = f"{ssh.workdir}/runs/{uuid.uuid4().hex[:12]}"
    job = {**job, "path": artifact.on_device()}
    if heldout is not None:
        job["heldout"] = heldout.on_device()
    files: list[tuple[str, Path | bytes]] = [
        ("device_runner.py", RUNNER.read_bytes()),
        ("job.json", json.dumps(job).encode()),
    ]
    runner = f"{run_dir}/device_runner.py"
    try:
        start = time.perf_counter()
        ssh_run(ssh, python_command(ssh, "-c", _EXTRACT, run_dir), "sending the job", _tar(files))
        setup_s = time.perf_counter() - start
        copy_s, sent = _keep(ssh, runner, artifact)
        held_s, held_sent = (None, 0) if heldout is None else _keep(ssh, runner, heldout)
        start = time.perf_counter()
        result = _run(ssh, python_command(ssh, runner, "run", f"{run_dir}/job.json"), job)
        run_s = time.perf_counter() - start
        return RemoteRun(result, copy_s, sent, held_s, held_sent, setup_s, run_s)
    finally:
        cleanup(ssh, run_dir)


def _keep(ssh: Ssh, runner: str, kept: Kept) -> tuple[float | None, int]:
    """Copy a file or folder into the device's sha256 store unless it is there: seconds, bytes."""
    if kept.cached:
        return None, 0
    start = time.perf_counter()
    stream = _tar([(kept.path.name, kept.path)])
    command = python_command(ssh, runner, "receive", ssh.workdir, kept.sha)
    ssh_run(ssh, command, f"copying {kept.path.name}", stream, timeout=3600)
    return time.perf_counter() - start, len(stream)


def _run(ssh: Ssh, command: str, job: dict) -> dict:
    proc = subprocess.Popen(
        ssh.argv(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out: list[bytes] = []
    err: list[bytes] = []
    readers = [_pump(proc.stdout, out), _pump(proc.stderr, err)]
    try:
        proc.wait(timeout=ssh.run_timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise EdgekdError(
            f"device {ssh.label}: measuring {job['name']} took over device.run_timeout_s="
            f"{ssh.run_timeout_s} s and was stopped"
        ) from None
    finally:
        for reader in readers:
            reader.join(timeout=10)
        proc.stdin.close()  # the runner's lifeline: it stops if it still runs
    if proc.returncode != 0:
        raise _run_failed(ssh, proc.returncode, b"".join(err).decode(errors="replace"), job)
    return last_json(b"".join(out).decode(errors="replace"))


def _run_failed(ssh: Ssh, returncode: int, stderr: str, job: dict) -> EdgekdError:
    at = f"device {ssh.label} ({ssh.where()})"
    fault = _ssh_fault(ssh, returncode, stderr, f"measuring {job['name']}")
    if fault is not None:
        return fault
    if returncode == 255:
        # ssh passes a signal that ended the remote command on as exit 255, saying nothing.
        return EdgekdError(
            f"{at}: the runner was killed there while measuring {job['name']} (by a signal; "
            "out of memory? see dmesg on the device)"
        )
    if returncode in (137, -9):
        return EdgekdError(
            f"{at}: the runner was killed there while measuring {job['name']} (SIGKILL: out of "
            "memory? see dmesg on the device)"
        )
    return _failed(ssh, returncode, stderr, f"measuring {job['name']}")


def cleanup(ssh: Ssh, run_dir: str) -> None:
    """Kill the run's runner if it still runs and remove its folder; a device that cannot be
    reached now is left as it is (its runner ended with the connection)."""
    with contextlib.suppress(EdgekdError):
        ssh_run(ssh, python_command(ssh, "-c", _CLEANUP, run_dir), "cleaning up", timeout=60)
