"""The file edgekd sends to a device over SSH and runs there: it measures one GGUF file (in
llama-cpp-python) or one ONNX folder (in onnxruntime) the way the host bench's child does.

The device has no edgekd, so this module imports only the standard library, numpy and the one
runtime it runs (edgekd imports it for `content_sha256`, never the other way round). It reads the
held-out slice that `benchmark.save_heldout` wrote, one sequence at a time, so a 1 GB device keeps
one sequence's teacher log-probs in memory, and returns per-sequence sums that
`evaluate.combine` turns into ppl, kld and top1 exactly as the host does.

    python3 device_runner.py probe WORKDIR [SHA256...] what the device has, as one JSON line
    python3 device_runner.py receive WORKDIR SHA256    unpack a file or folder (tar on stdin)
    python3 device_runner.py run JOB.json              measure; the result is one JSON line

A job whose runtime is "llama-bench" runs the device's own llama-bench binary on a GGUF file
instead (standard library only) and returns its JSON output as it printed it.

`run` stops itself when its standard input closes: the SSH connection that started it is gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

_CHUNK = 1 << 20
_SCORING_HEADROOM = 8  # formats.runtime.scoring_context's room past the longest sequence
_DTYPES = {"I64": "<i8", "F16": "<f2", "F32": "<f4"}


def content_sha256(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative path and bytes, in order)."""
    path = Path(path)
    files = [(path.name, path)] if path.is_file() else [
        (str(f.relative_to(path)), f) for f in sorted(path.rglob("*")) if f.is_file()
    ]  # fmt: skip
    total = hashlib.sha256()
    for name, f in files:
        h = hashlib.sha256()
        with open(f, "rb") as stream:
            while block := stream.read(_CHUNK):
                h.update(block)
        total.update(f"{name}\0{h.hexdigest()}\n".encode())
    return total.hexdigest()


def _rss(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _meminfo(key: str) -> int | None:
    path = Path("/proc/meminfo")
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def _cpu_model() -> str:
    path = Path("/proc/cpuinfo")
    if path.is_file():
        for line in path.read_text().splitlines():
            key = line.split(":", 1)[0].strip()
            if key in ("model name", "Hardware", "Model") and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        imported = __import__(module)
    except Exception:  # a broken install is as good as none
        return None
    return str(getattr(imported, "__version__", "present"))


def probe(workdir: str, *shas: str) -> dict:
    """Python, the runtimes, free memory and disk, the CPU, and which of `shas` (the artifact's
    first) are kept there already."""
    work = Path(workdir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cores": (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        ),
        "mem_available_bytes": _meminfo("MemAvailable"),
        "mem_total_bytes": _meminfo("MemTotal"),
        "disk_free_bytes": shutil.disk_usage(work).free,
        "workdir": str(work),
        "numpy": _version("numpy"),
        "llama_cpp": _version("llama_cpp"),
        "onnxruntime": _version("onnxruntime"),
        "cached": bool(shas) and _kept(work, shas[0]),
        "kept": [sha for sha in shas if _kept(work, sha)],
    }


def _kept(work: Path, sha: str) -> bool:
    return (work / "artifacts" / sha / ".complete").is_file()


def receive(workdir: str, sha: str) -> dict:
    """Unpack a tar stream of one file or folder from stdin into WORKDIR/artifacts/SHA, checked
    against SHA."""
    store = Path(workdir).expanduser() / "artifacts"
    final, partial = store / sha, store / f".{sha}.{os.getpid()}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as tar:
            for member in tar:
                parts = Path(member.name).parts
                if (
                    not (member.isfile() or member.isdir())
                    or member.name.startswith("/")
                    or (".." in parts)
                ):
                    raise SystemExit(f"refused tar member {member.name!r}")
                tar.extract(member, partial)
        entries = [p for p in partial.iterdir()]
        got = content_sha256(entries[0]) if len(entries) == 1 else None
        if got != sha:
            raise SystemExit(f"the copied artifact's sha256 is {got}, not {sha}: copy cut short")
        shutil.rmtree(final, ignore_errors=True)
        (partial / ".complete").write_text(entries[0].name)
        os.replace(partial, final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return {"path": str(final / entries[0].name)}


# --- the held-out slice (safetensors: 8-byte header length, JSON header, raw data) ---


class _Tensors:
    def __init__(self, path: str):
        self.file = open(path, "rb")  # noqa: SIM115 - read one tensor at a time, then closed
        size = int.from_bytes(self.file.read(8), "little")
        self.header = json.loads(self.file.read(size))
        self.start = 8 + size

    def shape(self, name: str) -> list[int]:
        return self.header[name]["shape"]

    def get(self, name: str):
        import numpy as np

        info = self.header[name]
        begin, end = info["data_offsets"]
        self.file.seek(self.start + begin)
        data = np.frombuffer(self.file.read(end - begin), dtype=_DTYPES[info["dtype"]])
        return data.reshape(info["shape"])

    def count(self) -> int:
        return sum(1 for k in self.header if k.startswith("s"))


def _log_softmax(x):
    import numpy as np

    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _terms(lp, ref, tgt) -> list[float]:
    """Sums of one sequence, as `evaluate.quality` takes them: nll, kld, top1 hits, positions."""
    import numpy as np

    if lp.shape[-1] != ref.shape[-1]:  # a padded embedding: compare on the shared vocabulary
        v = min(lp.shape[-1], ref.shape[-1])
        lp, ref = _log_softmax(lp[:, :v]), _log_softmax(ref[:, :v])
    nll = -float(np.take_along_axis(lp, tgt.reshape(-1, 1), axis=-1).sum())
    kld = float((np.exp(ref) * (ref - lp)).sum())
    agree = int((lp.argmax(-1) == ref.argmax(-1)).sum())
    return [nll, kld, agree, len(tgt), int(lp.shape[-1])]


# --- the two runtimes: the same calls as edgekd.formats.llama_cpp and edgekd.formats.ort ---


class _LlamaCpp:
    def __init__(self, job: dict):
        self.job = job

    def _llama(self, **kwargs):
        from llama_cpp import Llama

        return Llama(self.job["path"], verbose=False, **kwargs)

    def load(self) -> None:
        import llama_cpp

        self._logits_ith = llama_cpp.llama_get_logits_ith
        t = self.job["threads"]
        self._llm = self._llama(n_ctx=self.job["n_ctx"], n_threads=t, n_threads_batch=t)
        self._n_vocab = self._llm.n_vocab()

    def _argmax(self) -> int:
        import numpy as np

        logits = np.ctypeslib.as_array(self._logits_ith(self._llm.ctx, -1), shape=(self._n_vocab,))
        return int(logits.argmax())

    def first(self, ids: list[int]) -> int:
        self._llm.reset()
        self._llm.eval(ids)
        return self._argmax()

    def next(self, token: int) -> int:
        self._llm.eval([token])
        return self._argmax()

    def scorer(self, n_ctx: int):
        import numpy as np

        t = self.job["threads"]
        llm = self._llama(
            n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=t, n_threads_batch=t,
            logits_all=True,
        )  # fmt: skip

        def logits(seq: list[int]):
            llm.reset()
            llm.eval(seq)
            return np.array(llm.scores[: len(seq)], dtype=np.float32)

        return logits

    def answers(self) -> dict:
        replies = []
        t = self.job["threads"]
        for messages in self.job["conversations"]:
            # A fresh model per conversation, as the host's chat: no cache kept between prompts.
            llm = self._llama(n_ctx=self.job["n_ctx"], n_threads=t, n_threads_batch=t)
            reply = llm.create_chat_completion(
                messages=messages,
                max_tokens=self.job["answer_max_tokens"],
                temperature=0.0,
            )
            replies.append(reply["choices"][0]["message"]["content"])
        return {"replies": replies}


class OrtSession:
    """One onnxruntime session over an exported decoder, fed the inputs its graph declares
    (`formats.ort` runs the same steps on the host)."""

    def __init__(self, folder: str, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        path = str(Path(folder) / "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]

    def empty_past(self) -> dict:
        import numpy as np

        past = {}
        for name in self.past_names:
            info = self.inputs[name]
            shape = [
                0 if "sequence" in str(d) else 1 if isinstance(d, str) else d for d in info.shape
            ]
            dtype = np.float16 if info.type == "tensor(float16)" else np.float32
            past[name] = np.zeros(shape, dtype=dtype)
        return past

    def feed(self, ids: list[int], past: dict, n_past: int) -> dict:
        """The graph's inputs for `ids` after `n_past` cached positions."""
        import numpy as np

        feed = {"input_ids": np.array([ids], dtype=np.int64), **past}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones((1, n_past + len(ids)), dtype=np.int64)
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(n_past, n_past + len(ids), dtype=np.int64)[None]
        return feed

    def step(self, ids: list[int], past: dict, n_past: int):
        outputs = self.session.run(["logits", *self.present_names], self.feed(ids, past, n_past))
        return outputs[0][0], dict(zip(self.past_names, outputs[1:], strict=True))


class _Ort:
    """onnxruntime; the chat prompts come tokenized from the host (the device has no
    transformers), and the reply tokens go back to it to be decoded."""

    def __init__(self, job: dict):
        self.job = job

    def load(self) -> None:
        self._session = OrtSession(self.job["path"], self.job["threads"])

    def _run(self, ids: list[int]) -> int:
        logits, self._past = self._session.step(ids, self._past, self._n_past)
        self._n_past += len(ids)
        return int(logits[-1].argmax())

    def first(self, ids: list[int]) -> int:
        self._past, self._n_past = self._session.empty_past(), 0
        return self._run(ids)

    def next(self, token: int) -> int:
        return self._run([token])

    def scorer(self, n_ctx: int):
        import numpy as np

        session = OrtSession(self.job["path"], self.job["threads"])

        def logits(seq: list[int]):
            out, _ = session.step(list(seq), session.empty_past(), 0)
            return out.astype(np.float32)

        return logits

    def answers(self) -> dict:
        session, eos = OrtSession(self.job["path"], self.job["threads"]), set(self.job["eos"])
        out = []
        for prompt in self.job["chat_ids"]:
            logits, past = session.step(prompt, session.empty_past(), 0)
            new: list[int] = []
            while len(new) < self.job["answer_max_tokens"]:
                token = int(logits[-1].argmax())
                if token in eos:
                    break
                new.append(token)
                if len(new) < self.job["answer_max_tokens"]:
                    logits, past = session.step([token], past, len(prompt) + len(new) - 1)
            out.append(new)
        return {"reply_ids": out}


_RUNTIMES = {"llama.cpp": _LlamaCpp, "onnxruntime": _Ort}


def _quality(runtime, heldout: str) -> list[list[float]]:
    tensors = _Tensors(heldout)
    n = tensors.count()
    score = runtime.scorer(max(tensors.shape(f"s{i}")[0] for i in range(n)) + _SCORING_HEADROOM)
    terms = []
    for i in range(n):
        seq = tensors.get(f"s{i}").tolist()
        lp = _log_softmax(score(seq))[tensors.get(f"p{i}")]
        ref = tensors.get(f"r{i}").astype("float32")
        terms.append(_terms(lp, ref, tensors.get(f"t{i}")))
    tensors.file.close()
    return terms


def llama_bench(job: dict) -> dict:
    """The device's llama-bench on the GGUF file: its prompt and decode tests, its JSON."""
    argv = [str(Path(job["binary"]).expanduser()), "-m", job["path"], "-o", "json"]
    argv += ["-p", str(len(job["prompt"])), "-n", str(job["decode_tokens"])]
    argv += ["-t", str(job["threads"]), "-r", str(job["runs"])]
    argv += [] if job["warmup_runs"] else ["--no-warmup"]
    # A child of the runner, in its process group: the lifeline and the cleanup kill it too.
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-2000:])
        # Killed by a signal: exit as a shell reports it (137 for SIGKILL).
        raise SystemExit(proc.returncode if proc.returncode > 0 else 128 - proc.returncode)
    return {"llama_bench": json.loads(proc.stdout)}


def run(job: dict) -> dict:
    """The host child's measures, in the same order: load, timed runs, peak, then the rest."""
    if job["runtime"] == "llama-bench":
        return llama_bench(job)
    runtime = _RUNTIMES[job["runtime"]](job)
    baseline = _rss("VmRSS")
    start = time.perf_counter()
    runtime.load()
    load_s = time.perf_counter() - start
    ttft, decode = [], []
    for i in range(job["warmup_runs"] + job["runs"]):
        start = time.perf_counter()
        token = runtime.first(job["prompt"])
        first = time.perf_counter()
        for _ in range(job["decode_tokens"]):
            token = runtime.next(token)
        end = time.perf_counter()
        if i >= job["warmup_runs"]:
            ttft.append(first - start)
            decode.append(end - first)
    result = {
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": _rss("VmHWM"),
        "load_s": load_s,
        "ttft_s": ttft,
        "decode_s": decode,
        "quality_terms": _quality(runtime, job["heldout"]) if job.get("heldout") else None,
    }
    if not job.get("heldout"):
        import numpy as np

        logits = runtime.scorer(len(job["prompt"][:16]) + _SCORING_HEADROOM)(job["prompt"][:16])
        result["finite"] = bool(np.isfinite(logits).all())
    result.update(runtime.answers())
    return result


def _stop_when_stdin_closes() -> None:
    """The SSH connection is the runner's lifeline: when it goes, so does the runner."""

    def watch() -> None:
        while sys.stdin.buffer.read(4096):
            pass
        os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "probe":
        out = probe(*args)
    elif command == "receive":
        out = receive(*args)
    elif command == "run":
        job_path = Path(args[0])
        (job_path.parent / "pid").write_text(str(os.getpid()))
        _stop_when_stdin_closes()
        job = json.loads(job_path.read_text())
        for key in ("path", "heldout"):  # relative to the job's folder
            if job.get(key):
                job[key] = str(job_path.parent / job[key])
        out = run(job)
    else:
        raise SystemExit(f"unknown command {command!r}")
    sys.stdout.write("\n" + json.dumps(out) + "\n")
    sys.stdout.flush()
    if command == "run":  # its watcher still blocks on stdin: leave without waiting for it
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
