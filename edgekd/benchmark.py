"""Measure one artifact in its own runtime: size, peak memory, speed and accuracy.

Each artifact runs in a child process (`python -m edgekd.benchmark JOB.json RESULT.json`) that
imports only its runtime before the speed runs, so its peak resident memory (VmHWM) is the
runtime's and the model's, not the build's. After the speed runs the child scores the held-out
slice and the checkable questions; that work does not count towards the peak.

Byte counts and the verdict are pure functions of the files, so a report can recompute them for
any profile; a decode speed derived from a memory bandwidth is a projection and says so.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgekd.errors import EdgekdError

if TYPE_CHECKING:  # the child process stays free of anything its runtime does not need
    from edgekd.config import BenchSettings, Profile

RUNTIMES = ("llama.cpp", "onnxruntime", "onnxruntime-genai", "torch")
_ONNX_MODEL = "model.onnx"
_GENAI_CONFIG = "genai_config.json"
_GATHER_OPS = ("Gather", "GatherBlockQuantized")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
MIB = 1 << 20


@dataclass(frozen=True)
class Artifact:
    """One thing to measure: a GGUF file, an ONNX folder or a Hugging Face folder."""

    name: str
    runtime: str
    path: Path
    role: str = "export"  # "teacher", "student" or "export"
    shipped: bool = False  # one of the profile's device formats: judged against its budget


def runtime_of(path: Path) -> str:
    """The runtime an artifact runs in, from what the path holds."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "llama.cpp"
    if path.is_dir() and (path / _GENAI_CONFIG).is_file():
        return "onnxruntime-genai"
    if path.is_dir() and (path / _ONNX_MODEL).is_file():
        return "onnxruntime"
    if path.is_dir() and (path / "config.json").is_file():
        return "torch"
    raise EdgekdError(
        f"{path} is neither a .gguf file, a folder with {_ONNX_MODEL}, nor a model folder with "
        "config.json; pass one of those"
    )


def size_on_disk(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def weight_files(artifact: Artifact) -> list[Path]:
    """The files the runtime loads as the model (tokenizer and config files left out)."""
    path = Path(artifact.path)
    if artifact.runtime == "llama.cpp":
        return [path]
    if artifact.runtime.startswith("onnxruntime"):
        return sorted(f for f in path.iterdir() if f.name.startswith(_ONNX_MODEL))
    return sorted(path.glob("*.safetensors"))


@dataclass(frozen=True)
class TokenCost:
    """What decoding one token reads: every weight but a looked-up embedding table, and the KV
    cache of the positions before it."""

    weights_bytes: int  # the model files
    weights_read_bytes: int
    kv_bytes_per_position: int

    def read_per_token(self, position: int) -> int:
        return self.weights_read_bytes + self.kv_bytes_per_position * position


def _gguf_cost(path: Path) -> TokenCost:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    arch = reader.fields["general.architecture"].contents()

    def field(key: str, default=None):
        f = reader.fields.get(f"{arch}.{key}")
        return default if f is None else int(f.contents())

    n_head = field("attention.head_count")
    head_dim = field("attention.key_length", field("embedding_length") // n_head)
    kv_heads = field("attention.head_count_kv", n_head)
    # An untied token embedding is only looked up (one row per token); a tied one is the output
    # matrix too and is read whole.
    lookup = sizes.get("token_embd.weight", 0) if "output.weight" in sizes else 0
    return TokenCost(
        weights_bytes=path.stat().st_size,
        weights_read_bytes=sum(sizes.values()) - lookup,
        # llama.cpp keeps K and V in F16 unless told otherwise.
        kv_bytes_per_position=2 * field("block_count") * kv_heads * head_dim * 2,
    )


def _initializer_bytes(tensor) -> int:
    from onnx import external_data_helper, numpy_helper

    if external_data_helper.uses_external_data(tensor):
        return int({e.key: e.value for e in tensor.external_data}["length"])
    if tensor.raw_data:
        return len(tensor.raw_data)
    return numpy_helper.to_array(tensor).nbytes


def _onnx_cost(folder: Path, runtime: str) -> TokenCost:
    import onnx

    model = onnx.load(folder / _ONNX_MODEL, load_external_data=False)
    sizes = {t.name: _initializer_bytes(t) for t in model.graph.initializer}
    users: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    # Tensors that only feed embedding lookups are read one row per token.
    lookup = sum(b for n, b in sizes.items() if users.get(n) and users[n] <= set(_GATHER_OPS))
    past = [i.type.tensor_type for i in model.graph.input if i.name.startswith("past_key_values.")]
    itemsize = [onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize for t in past]
    if runtime == "onnxruntime-genai":
        # Its graphs leave the head size symbolic; its config states it.
        d = json.loads((folder / _GENAI_CONFIG).read_text())["model"]["decoder"]
        per_layer = d["num_key_value_heads"] * d["head_size"]
        kv = sum(per_layer * size for size in itemsize)
    else:  # [batch, kv heads, past length, head size]: the fixed dims are the per-position size
        kv = sum(
            size * int(np.prod([d.dim_value for d in t.shape.dim if d.HasField("dim_value")]))
            for t, size in zip(past, itemsize, strict=True)
        )
    return TokenCost(
        weights_bytes=sum(f.stat().st_size for f in weight_files(Artifact("", runtime, folder))),
        weights_read_bytes=sum(sizes.values()) - lookup,
        kv_bytes_per_position=kv,
    )


def _torch_cost(folder: Path) -> TokenCost:
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    sizes, per_value = {}, 4
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                t = f.get_slice(name)
                per_value = {"F32": 4, "F16": 2, "BF16": 2}.get(t.get_dtype(), 4)
                sizes[name] = per_value * int(np.prod(t.get_shape()))
    embed = next((n for n in sizes if n.endswith("embed_tokens.weight")), None)
    lookup = sizes[embed] if embed and any(n.endswith("lm_head.weight") for n in sizes) else 0
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return TokenCost(
        weights_bytes=sum(f.stat().st_size for f in folder.glob("*.safetensors")),
        weights_read_bytes=sum(sizes.values()) - lookup,
        # transformers keeps the cache in the weights' dtype.
        kv_bytes_per_position=2 * config.num_hidden_layers * kv_heads * head_dim * per_value,
    )


def token_cost(artifact: Artifact) -> TokenCost:
    """Bytes of the model files, bytes read per decoded token, KV cache bytes per position."""
    path = Path(artifact.path)
    if artifact.runtime == "llama.cpp":
        return _gguf_cost(path)
    if artifact.runtime.startswith("onnxruntime"):
        return _onnx_cost(path, artifact.runtime)
    return _torch_cost(path)


def budget_verdict(weights_bytes: int, kv_bytes: int, budget_bytes: int) -> dict:
    """Whether weights + KV cache fit the budget, and by how much (negative margin: over)."""
    need = weights_bytes + kv_bytes
    return {
        "weights_bytes": weights_bytes,
        "kv_bytes": kv_bytes,
        "need_bytes": need,
        "budget_bytes": budget_bytes,
        "margin_bytes": budget_bytes - need,
        "fits": need <= budget_bytes,
    }


def spread(samples: list[float]) -> dict:
    """Median and range of repeated measurements."""
    if not samples:
        raise ValueError("no samples")
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
    }


def speed_summary(ttft_s: list[float], decode_s: list[float], n_prompt: int, n_decode: int):
    """Prompt tokens/s, decode tokens/s and time to first token (ms) from per-run timings."""
    return {
        "prompt_tokens": n_prompt,
        "decode_tokens": n_decode,
        "prompt_tps": spread([n_prompt / t for t in ttft_s]),
        "decode_tps": spread([n_decode / t for t in decode_s]),
        "ttft_ms": spread([1000 * t for t in ttft_s]),
    }


def host_bandwidth(mib: int, threads: int, repeats: int = 5) -> float:
    """Host memory bandwidth in bytes/s: the best of `repeats` copies of a `mib` MiB buffer
    (bytes read plus bytes written, as STREAM's copy counts them), on `threads` threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.ones(mib * MIB // 4, dtype=torch.float32)
        dst = torch.empty_like(src)
        dst.copy_(src)  # touch every page before timing
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return 2 * src.nbytes / best


def exact_match(reply: str, answer: str) -> bool:
    """A numeric answer must be the reply's last number; a text answer must appear in the reply
    as whole words (case-insensitive)."""
    if _NUMBER.fullmatch(answer.strip()):
        numbers = _NUMBER.findall(reply.replace(",", ""))
        return bool(numbers) and float(numbers[-1]) == float(answer)
    words = r"\s+".join(re.escape(w) for w in answer.split())
    return re.search(rf"(?<!\w){words}(?!\w)", reply, re.IGNORECASE) is not None


def pick_questions(rows: list[dict], n: int, exclude: set[str] = frozenset()) -> list[dict]:
    """Up to `n` rows with an "answer", taken in turn from each category (in file order),
    leaving out prompts in `exclude` (the ones a student was trained on)."""
    by_category: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("answer") is not None and row["prompt"] not in exclude:
            by_category.setdefault(row.get("category", ""), []).append(row)
    picked: list[dict] = []
    queues = list(by_category.values())
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return picked


def questions_note(asked: int, checkable: int, left_out: int, max_tokens: int) -> dict:
    """How the exact-match questions were chosen and scored, for the report."""
    return {
        "asked": asked,
        "checkable_shipped": checkable,
        "left_out_as_trained_on": left_out,
        "rule": "numeric answer: the reply's last number; text answer: its words in the reply",
        "max_tokens": max_tokens,
    }


def prompt_ids(sequences: list[list[int]], n: int) -> list[int]:
    """A prompt of exactly `n` tokens: the sequences one after another, repeated if short."""
    flat = [t for s in sequences for t in s]
    if not flat:
        raise EdgekdError("no tokens to build a benchmark prompt from")
    return (flat * (n // len(flat) + 1))[:n]


@dataclass(frozen=True)
class Job:
    """What the child process measures; written as JSON for it."""

    runtime: str
    path: str
    threads: int
    n_ctx: int
    prompt: list[int]
    decode_tokens: int
    runs: int
    warmup_runs: int
    questions: list[dict]
    answer_max_tokens: int
    heldout: str | None = None  # safetensors from save_heldout; None: no quality measures


def save_heldout(path: Path, heldout, reference) -> None:
    """The held-out sequences, scored positions, targets and teacher log-probs, for the child."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for i, (seq, pos, tgt, ref) in enumerate(
        zip(heldout.sequences, heldout.positions, heldout.targets, reference, strict=True)
    ):
        tensors[f"s{i}"] = torch.tensor(seq, dtype=torch.long)
        tensors[f"p{i}"] = pos.long().contiguous()
        tensors[f"t{i}"] = tgt.long().contiguous()
        tensors[f"r{i}"] = ref.to(torch.float16).contiguous()
    save_file(tensors, str(path))


def measure(job: Job, scratch: Path) -> dict:
    """Run `job` in a child process and return what it measured."""
    scratch.mkdir(parents=True, exist_ok=True)
    job_path, out_path = scratch / "job.json", scratch / "result.json"
    job_path.write_text(json.dumps(asdict(job)))
    out_path.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "edgekd.benchmark", str(job_path), str(out_path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not out_path.is_file():
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise EdgekdError(
            f"benchmark of {job.path} ({job.runtime}) failed with exit code {proc.returncode}: "
            f"{tail}"
        )
    return json.loads(out_path.read_text())


def bench_threads(profile_threads: int, override: int | None) -> int:
    """The threads to run with: the override, else the profile's, at most this host's cores (more
    threads than cores measures contention, not the model)."""
    if override is not None:
        return override
    return max(1, min(profile_threads, len(os.sched_getaffinity(0))))


def benchmark_artifact(
    artifact: Artifact,
    *,
    profile: Profile,
    settings: BenchSettings,
    threads: int,
    host_bandwidth_bps: float,
    prompt: list[int],
    questions: list[dict],
    heldout_file: Path | None,
    scratch: Path,
) -> dict:
    """Every measure of one artifact against the profile, as one report row."""
    cost = token_cost(artifact)
    job = Job(
        runtime=artifact.runtime,
        path=str(artifact.path),
        threads=threads,
        n_ctx=profile.context_length,
        prompt=prompt,
        decode_tokens=settings.decode_tokens,
        runs=settings.runs,
        warmup_runs=settings.warmup_runs,
        questions=questions,
        answer_max_tokens=settings.answer_max_tokens,
        heldout=None if heldout_file is None else str(heldout_file),
    )
    return artifact_row(
        artifact,
        cost=cost,
        measured=measure(job, scratch),
        profile=profile,
        threads=threads,
        host_bandwidth_bps=host_bandwidth_bps,
        prompt_tokens=len(prompt),
        decode_tokens=settings.decode_tokens,
        size_bytes=size_on_disk(artifact.path),
    )


def artifact_row(
    artifact: Artifact,
    *,
    cost: TokenCost,
    measured: dict,
    profile: Profile,
    threads: int,
    host_bandwidth_bps: float,
    prompt_tokens: int,
    decode_tokens: int,
    size_bytes: int,
) -> dict:
    """One report row from what the child measured: speeds, the budget verdict, and decode
    speed against the host's bandwidth limit and the profile's (a projection)."""
    speed = speed_summary(measured["ttft_s"], measured["decode_s"], prompt_tokens, decode_tokens)
    # Decode step i attends to prompt_tokens + i positions: bytes read are taken at the mean.
    at = prompt_tokens + (decode_tokens - 1) // 2
    per_token = cost.read_per_token(at)
    host_limit = host_bandwidth_bps / per_token
    device_bps = profile.memory_bandwidth_gbs * 1e9
    budget = budget_verdict(
        cost.weights_bytes,
        cost.kv_bytes_per_position * profile.context_length,
        profile.memory_budget_mb * MIB,
    )
    em = measured["exact_match"]
    return {
        "name": artifact.name,
        "role": artifact.role,
        "runtime": artifact.runtime,
        "path": str(artifact.path),
        "shipped": artifact.shipped,
        "size_bytes": size_bytes,
        "weights_bytes": cost.weights_bytes,
        "kv_bytes_per_token": cost.kv_bytes_per_position,
        "threads": threads,
        "memory": {
            "peak_rss_bytes": measured["peak_rss_bytes"],
            "baseline_rss_bytes": measured["baseline_rss_bytes"],
            "load_s": measured["load_s"],
        },
        "speed": speed,
        "quality": measured["quality"],
        "exact_match": {**em, "accuracy": em["correct"] / em["total"] if em["total"] else None},
        "budget": {**budget, "context_length": profile.context_length},
        "bandwidth": {
            "bytes_per_token": per_token,
            "weights_read_bytes": cost.weights_read_bytes,
            "kv_read_bytes": per_token - cost.weights_read_bytes,
            "at_tokens": at,
            "host_limit_tps": host_limit,
            "host_fraction": speed["decode_tps"]["median"] / host_limit,
            "device_projection_tps": device_bps / per_token,
            "device_projection_note": (
                f"projection, not a measurement: the {profile.name} profile's "
                f"{profile.memory_bandwidth_gbs:g} GB/s divided by the "
                f"{per_token / 1e6:.1f} MB read per decoded token (weights + KV cache at "
                f"{at} tokens); a memory-bound upper limit that ignores compute"
            ),
        },
    }


def bench_report(
    profile: Profile, settings: BenchSettings, host: dict, rows: list[dict], questions: dict
) -> dict:
    """The bench report: host, profile, every artifact, the ratios and the verdict."""
    teacher = next((r for r in rows if r["role"] == "teacher"), None)
    ratios: dict[str, dict] = {"decode_vs_host_bandwidth_limit": {}}
    if teacher is not None:
        ratios["decode_vs_teacher"] = {}
    for r in rows:
        ratios["decode_vs_host_bandwidth_limit"][r["name"]] = r["bandwidth"]["host_fraction"]
        if teacher is not None and r is not teacher:
            ratios["decode_vs_teacher"][r["name"]] = (
                r["speed"]["decode_tps"]["median"] / teacher["speed"]["decode_tps"]["median"]
            )
    shipped = [r for r in rows if r["shipped"]]
    return {
        "profile": profile.model_dump(mode="json"),
        "settings": settings.model_dump(mode="json"),
        "host": host,
        "questions": questions,
        "artifacts": rows,
        "ratios": ratios,
        "verdict": {
            "fits": bool(shipped) and all(r["budget"]["fits"] for r in shipped),
            "judged": [r["name"] for r in shipped],
        },
    }


def _tokenize(artifact: Artifact, texts: list[str]) -> list[list[int]]:
    if artifact.runtime == "llama.cpp":
        from edgekd.formats.gguf import llama_cpp_tokenize

        return llama_cpp_tokenize(Path(artifact.path), texts)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(artifact.path)(texts)["input_ids"]


def bench_file(path: Path, profile: Profile, settings: BenchSettings) -> dict:
    """The bench report of one GGUF file, ONNX folder or model folder outside any build: speed,
    memory, exact-match answers and the budget verdict (no teacher, so no held-out quality)."""
    import tempfile

    from edgekd.data import default_prompts

    path = Path(path)
    artifact = Artifact(path.name, runtime_of(path), path, role="export", shipped=True)
    threads = bench_threads(profile.threads, settings.threads)
    shipped = default_prompts()
    prompt = prompt_ids(_tokenize(artifact, [r["prompt"] for r in shipped]), settings.prompt_tokens)
    questions = pick_questions(shipped, settings.questions)
    bandwidth = host_bandwidth(settings.bandwidth_mib, threads)
    with tempfile.TemporaryDirectory(prefix="edgekd-bench-") as tmp:
        row = benchmark_artifact(
            artifact,
            profile=profile,
            settings=settings,
            threads=threads,
            host_bandwidth_bps=bandwidth,
            prompt=prompt,
            questions=questions,
            heldout_file=None,
            scratch=Path(tmp),
        )
    checkable = sum(r.get("answer") is not None for r in shipped)
    note = questions_note(len(questions), checkable, 0, settings.answer_max_tokens)
    return bench_report(
        profile, settings, host_info(threads, bandwidth, settings.bandwidth_mib), [row], note
    )


def host_info(threads: int, bandwidth_bps: float, mib: int) -> dict:
    """The host the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "threads": threads,
        "bandwidth_bps": bandwidth_bps,
        "bandwidth_note": (
            f"measured: best of 5 copies of a {mib} MiB buffer on {threads} threads, "
            "bytes read + written"
        ),
        "load_average": os.getloadavg()[0],
    }


# ---------------------------------------------------------------------------------------------
# The child process. Nothing above this line that it calls imports torch.


def rss_bytes(key: str) -> int:
    """VmRSS or VmHWM of this process. Not getrusage: Linux carries ru_maxrss over an exec, so
    a child started from a large parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


class _LlamaCpp:
    def __init__(self, path: str, threads: int, n_ctx: int):
        import llama_cpp

        self._logits_ith = llama_cpp.llama_get_logits_ith
        self.llm = llama_cpp.Llama(
            path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False
        )
        self.n_vocab = self.llm.n_vocab()

    def _argmax(self) -> int:
        logits = np.ctypeslib.as_array(self._logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def first(self, ids: list[int]) -> int:
        self.llm.reset()
        self.llm.eval(ids)
        return self._argmax()

    def next(self, token: int) -> int:
        self.llm.eval([token])
        return self._argmax()


class _OnnxRuntime:
    def __init__(self, folder: str, threads: int, n_ctx: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(Path(folder) / _ONNX_MODEL), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.outputs = [
            "logits",
            *(n.replace("past_key_values.", "present.") for n in self.past_names),
        ]

    def _run(self, ids: list[int]) -> int:
        feed = {"input_ids": np.array([ids], dtype=np.int64), **self.past}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones((1, self.n_past + len(ids)), dtype=np.int64)
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(self.n_past, self.n_past + len(ids))[None]
        logits, *present = self.session.run(self.outputs, feed)
        self.past = dict(zip(self.past_names, present, strict=True))
        self.n_past += len(ids)
        return int(logits[0, -1].argmax())

    def first(self, ids: list[int]) -> int:
        self.past, self.n_past = {}, 0
        for name in self.past_names:
            info = self.inputs[name]
            # Named dims are batch (1) and past length (0); the others are fixed head sizes.
            shape = [
                0 if "sequence" in str(d) else 1 if isinstance(d, str) else d for d in info.shape
            ]
            dtype = np.float16 if info.type == "tensor(float16)" else np.float32
            self.past[name] = np.zeros(shape, dtype=dtype)
        return self._run(ids)

    def next(self, token: int) -> int:
        return self._run([token])


class _OnnxGenai:
    """onnxruntime-genai's generator: it picks the greedy token itself, and runs the model on
    a token when asked for the next one."""

    def __init__(self, folder: str, threads: int, n_ctx: int):
        import onnxruntime_genai as og

        trained = json.loads((Path(folder) / _GENAI_CONFIG).read_text())["model"]["context_length"]
        # It refuses a longer max_length than the model's context (tiny test models).
        self.og, self.n_ctx = og, min(n_ctx, trained)
        config = og.Config(folder)
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)

    def start(self, ids: list[int]):
        """A generator that has run `ids` (its logits cover every position)."""
        params = self.og.GeneratorParams(self.model)
        # max_length sizes its shared KV buffer: the profile's context, as on the device.
        params.set_search_options(max_length=self.n_ctx, do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids)
        return generator

    def first(self, ids: list[int]) -> int:
        self.generator = self.start(ids)
        self.generator.generate_next_token()
        return int(self.generator.get_next_tokens()[0])

    def next(self, token: int) -> int:
        self.generator.generate_next_token()
        return int(self.generator.get_next_tokens()[0])


class _Torch:
    def __init__(self, folder: str, threads: int, n_ctx: int):
        import torch

        from edgekd import models

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = models.load_model(models.resolve_source(folder, role="model"))

    def _forward(self, ids: list[int]) -> int:
        with self.torch.inference_mode():
            out = self.model(
                input_ids=self.torch.tensor([ids]), past_key_values=self.past, use_cache=True
            )
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def first(self, ids: list[int]) -> int:
        self.past = None
        return self._forward(ids)

    def next(self, token: int) -> int:
        return self._forward([token])


_RUNNERS = {
    "llama.cpp": _LlamaCpp,
    "onnxruntime": _OnnxRuntime,
    "onnxruntime-genai": _OnnxGenai,
    "torch": _Torch,
}


def _timed_runs(runner, job: Job) -> tuple[list[float], list[float]]:
    ttft, decode = [], []
    for i in range(job.warmup_runs + job.runs):
        start = time.perf_counter()
        token = runner.first(job.prompt)
        first = time.perf_counter()
        for _ in range(job.decode_tokens):
            token = runner.next(token)
        end = time.perf_counter()
        if i >= job.warmup_runs:
            ttft.append(first - start)
            decode.append(end - first)
    return ttft, decode


def _load_heldout(path: str):
    from safetensors.torch import load_file

    from edgekd.evaluate import HeldOut

    t = load_file(path)
    n = sum(1 for k in t if k.startswith("s"))
    heldout = HeldOut(
        [t[f"s{i}"].tolist() for i in range(n)],
        [t[f"p{i}"] for i in range(n)],
        [t[f"t{i}"] for i in range(n)],
    )
    return heldout, [t[f"r{i}"].float() for i in range(n)]


def _quality(job: Job, runner) -> dict:
    from edgekd.evaluate import at_positions, quality, torch_logprobs

    heldout, reference = _load_heldout(job.heldout)
    if job.runtime == "llama.cpp":
        from edgekd.formats.gguf import llama_cpp_logprobs

        n_ctx = max(len(s) for s in heldout.sequences) + 8
        full = llama_cpp_logprobs(job.path, heldout.sequences, threads=job.threads, n_ctx=n_ctx)
        lp = at_positions(full, heldout)
    elif job.runtime == "onnxruntime":
        from edgekd.formats.onnx import onnx_logprobs

        lp = at_positions(onnx_logprobs(job.path, heldout.sequences, threads=job.threads), heldout)
    elif job.runtime == "onnxruntime-genai":
        import torch

        full = [
            torch.from_numpy(np.asarray(runner.start(s).get_output("logits"))[0]).float()
            for s in heldout.sequences
        ]
        lp = at_positions([x.log_softmax(-1) for x in full], heldout)
    else:
        lp = torch_logprobs(runner.model, heldout)
    return quality(lp, reference, heldout.targets).as_dict()


def _answers(job: Job, runner) -> list[str]:
    """Greedy chat answers to the questions, through the runtime's own generation path."""
    messages = [[{"role": "user", "content": q["prompt"]}] for q in job.questions]
    if job.runtime == "llama.cpp":
        from edgekd.formats.gguf import llama_cpp_generate

        return [
            llama_cpp_generate(
                Path(job.path),
                m,
                max_tokens=job.answer_max_tokens,
                threads=job.threads,
                n_ctx=job.n_ctx,
            )
            for m in messages
        ]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job.path)
    if job.runtime == "onnxruntime-genai":
        from edgekd.formats.onnx import genai_generate

        return [
            genai_generate(Path(job.path), tokenizer, m, max_tokens=job.answer_max_tokens)
            for m in messages
        ]
    if job.runtime == "onnxruntime":
        from edgekd.formats.onnx import onnx_generate

        return [
            onnx_generate(
                Path(job.path), tokenizer, m, max_tokens=job.answer_max_tokens, threads=job.threads
            )
            for m in messages
        ]
    from edgekd.data import generate_with_transformers

    rows = generate_with_transformers(
        runner.model,
        tokenizer,
        job.questions,
        max_tokens=job.answer_max_tokens,
        seed=0,
        temperature=0.0,
        batch_size=8,
        num_beams=1,
    )
    return [r["messages"][-1]["content"] for r in rows]


def _child(job: Job) -> dict:
    runner_class = _RUNNERS[job.runtime]
    baseline = rss_bytes("VmRSS")
    start = time.perf_counter()
    runner = runner_class(job.path, job.threads, job.n_ctx)
    load_s = time.perf_counter() - start
    ttft, decode = _timed_runs(runner, job)
    result = {
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": rss_bytes("VmHWM"),
        "load_s": load_s,
        "ttft_s": ttft,
        "decode_s": decode,
    }
    result["quality"] = _quality(job, runner) if job.heldout else None
    replies = _answers(job, runner) if job.questions else []
    items = [
        {**q, "reply": r, "correct": exact_match(r, str(q["answer"]))}
        for q, r in zip(job.questions, replies, strict=True)
    ]
    result["exact_match"] = {
        "correct": sum(i["correct"] for i in items),
        "total": len(items),
        "items": items,
    }
    return result


def _main(argv: list[str]) -> None:
    job_path, out_path = argv
    job = Job(**json.loads(Path(job_path).read_text()))
    if job.runtime not in _RUNNERS:
        raise SystemExit(f"unknown runtime {job.runtime!r}; one of {', '.join(RUNTIMES)}")
    result = _child(job)
    tmp = Path(out_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out_path)


if __name__ == "__main__":
    _main(sys.argv[1:])
