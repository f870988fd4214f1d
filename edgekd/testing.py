"""Real inputs for edgekd's tests and for scripts/reliability_table.py: tiny random Llamas with the
embedded teacher's own tokenizer, a small chat corpus, `edgekd build` in a child process, and checks
of what a run folder holds. Nothing here stands in for a runtime: the tests run the real ones.

Kept in the package (like `torch.testing`) so the tests and the reliability script share one copy
without either reaching into the other's folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import getpass
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from edgekd import rundir, stages

# Settings that make a whole `edgekd build --stages distill` of a tiny teacher take seconds.
FAST_BUILD = [
    "student.num_layers=2",
    "student.calibration_examples=4",
    "distill.batch_size=2",
    "distill.log_every=1",
    "data.max_seq_len=64",
    "qlora.enabled=false",
    "qat_kd.enabled=false",
    "eval.sample_max_tokens=4",
    "export_onnx.genai=false",
]
# A short text in the embedded tokenizer's ids, for tests that feed a runtime tokens directly.
TOKEN_IDS = [1, 504, 3458, 314, 253, 1345, 30, 378, 1812, 28, 2516, 4442, 13]
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def save_embedded_tokenizer(folder: Path) -> Path:
    """The embedded teacher's tokenizer saved as tokenizer.json alone: the `tokenizer.model` that
    save_pretrained writes for a tokenizer loaded from a GGUF is not valid SentencePiece, and
    converters that see it fail."""
    from edgekd.models import load_tokenizer, resolve_source

    load_tokenizer(resolve_source("embedded", role="teacher")).save_pretrained(folder)
    (folder / "tokenizer.model").unlink(missing_ok=True)
    return folder


def tiny_llama_config(tokenizer, num_layers: int = 2, hidden: int = 64):
    """A Llama config small enough for a test: 4 query heads over 2 KV heads, tied embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def save_tiny_llama(path: Path, tokenizer, num_layers: int = 2, hidden: int = 64, seed: int = 0):
    """A random tiny Llama with the real tokenizer, saved in HF layout (safetensors)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, num_layers, hidden))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "tokenizer.model").unlink(missing_ok=True)
    return path


def save_tiny_qwen2_without_bos(path: Path, tokenizer, seed: int = 0) -> Path:
    """A random tiny Qwen2 whose tokenizer has no BOS token at all (as Qwen2's: no bos_token,
    nothing added before a text), saved in HF layout."""
    import copy

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.bos_token = None
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
    )
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "tokenizer.model").unlink(missing_ok=True)
    return path


def write_chat_jsonl(path: Path, n: int = 40) -> Path:
    """A small chat corpus in JSONL, enough for a held-out split and a few training steps."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i + 1}?"},
                {"role": "assistant", "content": f"{i} plus {i + 1} is {2 * i + 1}."},
            ]
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def set_args(items: list[str]) -> list[str]:
    """`--set` options for each `key=value`."""
    return [a for item in items for a in ("--set", item)]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Build:
    """`edgekd build` in a child process, its output collected by a thread as it comes."""

    def __init__(self, run: Path, args: list[str], live: bool = False):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}  # no wrapped lines
        if live:  # rich then draws progress bars as they move, not once at the end
            env.update(TTY_INTERACTIVE="1", TTY_COMPATIBLE="1")
        cmd = [sys.executable, "-m", "edgekd.cli", "build", "--profile", "phone-1gb"]
        self.proc = subprocess.Popen(
            [*cmd, "--out", str(run), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            # A shell without job control starts background jobs with SIGINT ignored, and Python
            # then installs no Ctrl-C handler: the build must get SIGINT as a terminal gives it.
            preexec_fn=_default_sigint,
        )
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while chunk := self.proc.stdout.read1(4096):
            self.chunks.append(chunk)

    @property
    def output(self) -> str:
        return _ANSI.sub("", b"".join(self.chunks).decode(errors="replace"))

    def wait_for(self, seen: Callable[[], bool], timeout: float = 120) -> None:
        """Return as soon as `seen()` is true; fail if the build ended first."""
        deadline = time.time() + timeout
        while not seen():
            if self.proc.poll() is not None:
                raise AssertionError(f"build ended before the point waited for:\n{self.output}")
            if time.time() > deadline:
                raise AssertionError(f"point waited for not reached:\n{self.output}")
            time.sleep(0.02)

    def interrupt_when(self, seen: Callable[[], bool], timeout: float = 120) -> int:
        """SIGINT the build (as Ctrl-C would) as soon as `seen()` is true; its exit code."""
        self.wait_for(seen, timeout)
        os.kill(self.proc.pid, signal.SIGINT)
        self.proc.wait(timeout=120)
        self.reader.join()
        return self.proc.returncode

    def kill_when(self, seen: Callable[[], bool], timeout: float = 120) -> None:
        """SIGKILL the build as soon as `seen()` is true; fail if it ended first."""
        self.wait_for(seen, timeout)
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reader.join()
        if self.proc.returncode != -signal.SIGKILL:
            raise AssertionError(f"build exited {self.proc.returncode} before the kill")

    def finish(self) -> str:
        """Wait for the build; its output, or AssertionError if it failed."""
        self.proc.wait(timeout=600)
        self.reader.join()
        if self.proc.returncode != 0:
            raise AssertionError(self.output[-4000:])
        return self.output

    def fail(self) -> str:
        """Wait for the build; its output, or AssertionError unless it exited 2 (refused)."""
        self.proc.wait(timeout=600)
        self.reader.join()
        if self.proc.returncode != 2:
            raise AssertionError(f"exit {self.proc.returncode}, expected 2:\n{self.output[-4000:]}")
        return self.output


def stage_folder(run: Path, stage: str) -> Path:
    return run / stages.get(stage).folder


def partial_folder(run: Path, stage: str) -> Path:
    return rundir.partial_dir(run, stages.get(stage).folder)


def manifest_stages(run: Path) -> set[str]:
    path = run / "manifest.json"
    return set(json.loads(path.read_text())["stages"]) if path.exists() else set()


def marker(run: Path, stage: str) -> tuple[int, int]:
    """Identity of a stage's .done marker (inode, mtime): unchanged means the stage was reused."""
    st = (stage_folder(run, stage) / ".done").stat()
    return st.st_ino, st.st_mtime_ns


def assert_no_leftovers(run: Path) -> None:
    left = [p for p in run.rglob("*") if ".tmp-" in p.name or p.name.endswith(".partial")]
    if left:
        raise AssertionError(f"left behind: {left}")


def partial_holds_file(run: Path, stage: str, suffix: str) -> Callable[[], bool]:
    """A kill point: the stage's partial folder holds a file whose name contains `suffix`."""
    partial = partial_folder(run, stage)
    return lambda: any(p.name != ".key" and suffix in p.name for p in partial.glob("*"))


def assert_killed_stage_not_done(run: Path, stage: str) -> None:
    """A stage cut short is neither marked done nor in the manifest; its partial folder stays."""
    if (stage_folder(run, stage) / ".done").exists():
        raise AssertionError(f"{stage} was killed but is marked done")
    if stage in manifest_stages(run):
        raise AssertionError(f"{stage} was killed but is in manifest.json")
    if not partial_folder(run, stage).is_dir():
        raise AssertionError(f"{stage} was killed but left no partial folder")


@contextlib.contextmanager
def tmpfs(folder: Path, size_mb: int, read_only: bool = False) -> Iterator[Path]:
    """A small real file system mounted at `folder`, to fill up or to make read-only. Needs the
    right to mount (root); OSError saying why otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size_mb}m" + (",ro" if read_only else "")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise OSError(f"cannot mount a tmpfs at {folder}: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Write zeros into `folder` until its file system is full; the filler file."""
    path = folder / "filler"
    block = bytes(1 << 20)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
    return path


@dataclasses.dataclass(frozen=True)
class SshServer:
    """A real OpenSSH server on 127.0.0.1, standing in for a board on the desk."""

    folder: Path
    port: int
    client_key: Path
    ssh_config: Path  # for `ssh -F`: the client key, and known_hosts holding the server's key
    proc: subprocess.Popen

    def device(self, **settings) -> dict:
        """A profile's `device:` section that reaches this server (as root, with the key)."""
        return {
            "host": f"ssh://{getpass.getuser()}@127.0.0.1:{self.port}",
            "ssh_config": str(self.ssh_config),
            "python": sys.executable,
            "workdir": str(self.folder / "device"),
            **settings,
        }


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(
    gguf: Path, alias: str = "tiny", n_ctx: int = 1024, threads: int = 1
) -> Iterator[str]:
    """llama-cpp-python's own OpenAI-compatible server on the loopback, serving `gguf` as
    `alias`; yields its base URL (http://127.0.0.1:PORT/v1) once /v1/models answers."""
    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
         "--port", str(port), "--model_alias", alias, "--n_ctx", str(n_ctx),
         "--n_threads", str(threads), "--verbose", "false"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"llama_cpp.server exited: {proc.stderr.read().decode()[-2000:]}"
                )
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("llama_cpp.server did not answer /v1/models within 120 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class FaultProxy:
    """An HTTP proxy on the loopback in front of a server, misbehaving on purpose for the next
    `times` requests to `paths` (then passing them on): 'drop' closes the connection unanswered,
    '429' answers Too Many Requests with Retry-After: 1, '500' an internal error, 'stall' waits
    `stall_s` before passing the request on, 'malformed' answers 200 with a body that is not JSON,
    'cap:N' passes the answer back with at most N top log-probs per token (a server that caps
    them), 'max:N' answers 400 to a request for more than N log-probs (vLLM's --max-logprobs),
    'nogen' passes a completion without echo back with no log-probs (a server that gives them
    for prompts only), another status (401, 404...) answers that. `requests` counts what reached
    the proxy per path."""

    def __init__(self, upstream: str, fault: str = "", times: int = 1 << 30, paths=("/v1/",)):
        import http.server

        self.upstream = upstream.rstrip("/").removesuffix("/v1")
        self.fault, self.times, self.paths, self.stall_s = fault, times, paths, 30.0
        self.requests: dict[str, int] = {}
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    proxy.handle(self, None)

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                # A client that gave up (a timeout) has closed its end: nothing to answer.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    proxy.handle(self, self.rfile.read(n))

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def handle(self, h, body: bytes | None) -> None:
        import httpx

        with self.lock:
            self.requests[h.path] = self.requests.get(h.path, 0) + 1
            faulty = self.fault and h.path.startswith(self.paths) and self.times > 0
            if faulty:
                self.times -= 1
        if faulty and self.fault == "drop":
            h.close_connection = True
            h.connection.shutdown(2)
            return
        kind, _, arg = self.fault.partition(":")
        asked = json.loads(body) if body else {}
        if faulty and kind == "max" and (asked.get("logprobs") or 0) > int(arg):
            message = f"Requested logprobs of {asked['logprobs']}, more than allowed: {arg}"
            payload = json.dumps({"error": {"message": message, "type": "test"}}).encode()
            h.send_response(400)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
            return
        if faulty and (self.fault.isdigit() or self.fault == "malformed"):
            status = 200 if self.fault == "malformed" else int(self.fault)
            payload = (
                b'{"choices": [{"text'
                if self.fault == "malformed"
                else json.dumps(
                    {"error": {"message": f"injected {self.fault}", "type": "test"}}
                ).encode()
            )
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(payload)))
            if self.fault == "429":
                h.send_header("Retry-After", "1")
            h.end_headers()
            h.wfile.write(payload)
            return
        if faulty and self.fault == "stall":
            time.sleep(self.stall_s)
        headers = {
            k: v for k, v in h.headers.items() if k.lower() in ("content-type", "authorization")
        }
        r = httpx.request(
            "GET" if body is None else "POST", self.upstream + h.path, content=body,
            headers=headers, timeout=300,
        )  # fmt: skip
        content = r.content
        if faulty and r.status_code == 200 and kind == "cap":
            content = _cap_logprobs(content, int(arg))
        if faulty and r.status_code == 200 and kind == "nogen" and not asked.get("echo"):
            content = _cap_logprobs(content, 0)
        h.send_response(r.status_code)
        h.send_header("Content-Type", r.headers.get("content-type", "application/json"))
        h.send_header("Content-Length", str(len(content)))
        h.end_headers()
        h.wfile.write(content)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _cap_logprobs(content: bytes, n: int) -> bytes:
    """A completions answer with each token's top log-probs cut to the first n."""
    reply = json.loads(content)
    for choice in reply.get("choices", []):
        lp = choice.get("logprobs") or {}
        lp["top_logprobs"] = [
            top if top is None else dict(list(top.items())[:n])
            for top in lp.get("top_logprobs") or []
        ]
    return json.dumps(reply).encode()


@contextlib.contextmanager
def sshd(folder: Path) -> Iterator[SshServer]:
    """Debian's /usr/sbin/sshd on a free port of 127.0.0.1 with a throwaway host key and client
    key; the client's known_hosts holds the host key, so host keys are checked as usual. Logging
    in needs that key: no password is ever accepted. OSError saying why where it cannot start."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("host_key", "client_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True
        )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
    (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())
    port = free_port()
    config = folder / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\n"
        f"PidFile {folder / 'sshd.pid'}\nAuthorizedKeysFile {folder / 'authorized_keys'}\n"
        "StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nUsePAM no\nPubkeyAuthentication yes\n"
        "LogLevel ERROR\n"
    )
    host_key = (folder / "host_key.pub").read_text().split()
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    client = folder / "ssh_config"
    client.write_text(
        f"Host *\n  IdentityFile {folder / 'client_key'}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {folder / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
        "  LogLevel ERROR\n"
    )
    proc = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "sshd.log", "wb"),  # noqa: SIM115 - closed with the server
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (folder / "sshd.log").read_text(errors="replace")
                raise OSError(f"sshd did not start on 127.0.0.1:{port}: {log.strip()}")
            time.sleep(0.05)
        yield SshServer(folder, port, folder / "client_key", client, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def kill_on_device(workdir: Path, what: str, timeout: float = 120) -> threading.Thread:
    """In the background: once a device runner has started under `workdir` (a loopback device's
    folder), SIGKILL it ("runner") or the sshd process serving its connection ("connection"),
    the way a board's out-of-memory killer or a dropped network would."""

    def kill() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = list(Path(workdir).glob("runs/*/pid"))
            if pids and pids[0].read_text().strip():
                time.sleep(0.5)  # into its measures
                pid = int(pids[0].read_text())
                if what == "connection":
                    pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread
