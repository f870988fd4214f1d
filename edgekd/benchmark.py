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
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from edgekd.errors import EdgekdError
from edgekd.formats.registry import RUNTIMES, open_runtime, runtime_class, runtime_of
from edgekd.formats.runtime import Runtime, TokenCost
from edgekd.rundir import REPORT_JSON

if TYPE_CHECKING:  # the child process stays free of anything its runtime does not need
    from edgekd.config import BenchSettings, Profile

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
MIB = 1 << 20
# Prompt tokens whose logits `edgekd bench` checks for NaN and inf (no held-out slice checks them).
_FINITE_CHECK_TOKENS = 16


@dataclass(frozen=True)
class Artifact:
    """One thing to measure: a GGUF file, an ONNX folder or a Hugging Face folder."""

    name: str
    runtime: str
    path: Path
    role: str = "export"  # "teacher", "student" or "export"
    shipped: bool = False  # one of the profile's device formats: judged against its budget
    # Held-out scores already measured on this build's slice and reference (by the stage named
    # in quality_from, in the same runtime): reported, not measured again.
    quality: dict | None = None
    quality_from: str | None = None


def teacher_artifact(src) -> Artifact:
    """The teacher of a build (a `models.ModelSource`) as an artifact to measure."""
    if src.kind == "gguf":
        return Artifact("teacher GGUF", "llama.cpp", src.path, role="teacher")
    from edgekd.models import local_folder

    return Artifact("teacher", "torch", local_folder(src), role="teacher")


def export_artifacts(specs, stage_dirs: dict[str, Path]) -> list[Artifact]:
    """The device artifacts of the finished export stages among `specs` (StageSpecs), each in
    the runtime its files need, as their specs' `outputs` list them."""
    found = []
    for spec in specs:
        folder = stage_dirs[spec.name]
        report = folder / REPORT_JSON
        report = json.loads(report.read_text()) if report.is_file() else {}
        for out in spec.outputs(folder, report):
            found.append(
                Artifact(
                    out.name,
                    runtime_of(out.path),
                    out.path,
                    shipped=out.shipped,
                    quality=out.quality,
                    quality_from=spec.name if out.quality else None,
                )
            )
    return found


def size_on_disk(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


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
    speed_only: bool = False  # stop after the timed runs (the capped run: load, prompt, decode)


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


def _child_argv(job: Job, scratch: Path) -> tuple[list[str], Path]:
    """The child's command line for `job`, and where it will write its result."""
    scratch.mkdir(parents=True, exist_ok=True)
    job_path, out_path = scratch / "job.json", scratch / "result.json"
    job_path.write_text(json.dumps(asdict(job)))
    out_path.unlink(missing_ok=True)
    return [sys.executable, "-m", "edgekd.benchmark", str(job_path), str(out_path)], out_path


def _failed(job: Job, returncode: int, stderr: str, stdout: str) -> EdgekdError:
    tail = " | ".join((stderr or stdout).strip().splitlines()[-3:])
    return EdgekdError(
        f"benchmark of {job.path} ({job.runtime}) failed with exit code {returncode}: {tail}"
    )


def measure(job: Job, scratch: Path) -> dict:
    """Run `job` in a child process and return what it measured."""
    argv, out_path = _child_argv(job, scratch)
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0 or not out_path.is_file():
        raise _failed(job, proc.returncode, proc.stderr, proc.stdout)
    return json.loads(out_path.read_text())


def measure_capped(job: Job, scratch: Path, cap_bytes: int, weight_files: list[Path]) -> dict:
    """The memory verdict, measured: `job` run again in a child confined to `cap_bytes` (see
    `memcap`). Where no cap can be set it says why, and the estimate stands, labelled."""
    from edgekd import memcap

    method, how = memcap.cap_method()
    out = {"cap_bytes": cap_bytes, "method": method, "how": how, "threads": job.threads}
    if method is None:
        return out
    argv, out_path = _child_argv(job, scratch)
    memcap.drop_page_cache(weight_files)  # read in by the capped child, charged to its cap
    done = memcap.run_capped(argv, cap_bytes)
    if done.killed:
        return {**out, "fits": False, "killed": True, "peak_bytes": done.peak_bytes}
    if done.returncode != 0 or not out_path.is_file():
        return {**out, "error": str(_failed(job, done.returncode, done.stderr, done.stdout))}
    measured = json.loads(out_path.read_text())
    peak = max(done.peak_bytes or 0, measured["peak_rss_bytes"])
    speed = speed_summary(
        measured["ttft_s"], measured["decode_s"], len(job.prompt), job.decode_tokens
    )
    return {
        **out,
        "fits": peak <= cap_bytes,
        "killed": False,
        "peak_bytes": peak,
        "peak_rss_bytes": measured["peak_rss_bytes"],
        "speed": speed,
    }


def bench_threads(profile_threads: int, override: int | None) -> int:
    """The threads to run with: the override, else the profile's, at most this host's cores (more
    threads than cores measures contention, not the model)."""
    if override is not None:
        return override
    return max(1, min(profile_threads, len(os.sched_getaffinity(0))))


GB = 1e9


def available_memory() -> int | None:
    """Bytes of memory this host can give a new process now (MemAvailable), None where unknown."""
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def checked_cost(artifact: Artifact, context_length: int) -> TokenCost:
    """The artifact's token cost, once its files are whole and, for a runtime that allocates the
    whole context when it loads, once its weights and that context fit this host's memory."""
    from edgekd.models import readable

    cls = runtime_class(artifact.runtime)
    cls.check_files(artifact.path)
    with readable(f"{artifact.path}"):
        cost = cls.token_cost(artifact.path)
    kv = cost.kv_bytes_per_position * context_length
    free = available_memory()
    if cls.preallocates_context and free is not None and cost.weights_bytes + kv > free:
        raise EdgekdError(
            f"{artifact.path}: {cls.name} allocates the whole {context_length}-token context when "
            f"it loads, a KV cache of {kv / GB:.1f} GB beside {cost.weights_bytes / GB:.2f} GB of "
            f"weights, but this host has {free / GB:.1f} GB available; lower the profile's "
            "context_length"
        )
    return cost


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
    cost = checked_cost(artifact, profile.context_length)
    already_scored = heldout_file is not None and bool(artifact.quality)
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
        heldout=None if heldout_file is None or already_scored else str(heldout_file),
    )
    row = artifact_row(
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
    if already_scored:
        row["quality"], row["quality_from"] = artifact.quality, artifact.quality_from
    if artifact.shipped and settings.memory_cap:
        # What a device does with the model: load, prompt, decode. The scoring and answers after
        # it are the harness's (a second model in memory), not in the peak the host child
        # reports either.
        speed_job = replace(job, questions=[], heldout=None, speed_only=True)
        files = runtime_class(artifact.runtime).weight_files(artifact.path)
        row["capped"] = measure_capped(speed_job, scratch, profile.memory_budget_mb * MIB, files)
    return row


def artifact_row(
    artifact: Artifact,
    *,
    cost: TokenCost,
    measured: dict,
    profile: Profile,
    threads: int,
    host_bandwidth_bps: float | None,
    prompt_tokens: int,
    decode_tokens: int,
    size_bytes: int,
) -> dict:
    """One report row from what the child measured: speeds, the budget verdict, and decode
    speed against the host's bandwidth limit (None: measured elsewhere) and the profile's (a
    projection)."""
    speed = speed_summary(measured["ttft_s"], measured["decode_s"], prompt_tokens, decode_tokens)
    # Decode step i attends to prompt_tokens + i positions: bytes read are taken at the mean.
    at = prompt_tokens + (decode_tokens - 1) // 2
    per_token = cost.read_per_token(at)
    host_limit = None if host_bandwidth_bps is None else host_bandwidth_bps / per_token
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
            "host_fraction": (
                None if host_limit is None else speed["decode_tps"]["median"] / host_limit
            ),
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


def bench_file(
    path: Path | list[Artifact],
    profile: Profile,
    settings: BenchSettings,
    on_device: Callable[..., dict] | None = None,
) -> dict:
    """The bench report of one GGUF file, ONNX folder or model folder outside any build (or of a
    build's artifacts): speed, memory, exact-match answers and the budget verdict (no teacher,
    so no held-out quality). `on_device(artifacts, prompt=, questions=)`, if given, measures
    them on a device too."""
    import tempfile

    from edgekd.data import default_prompts

    if isinstance(path, list):
        artifacts = path
    else:
        artifacts = [Artifact(Path(path).name, runtime_of(Path(path)), Path(path), shipped=True)]
    for artifact in artifacts:  # a bad file or context: before any work
        checked_cost(artifact, profile.context_length)
    threads = bench_threads(profile.threads, settings.threads)
    shipped = default_prompts()
    runtime = open_runtime(artifacts[0].path, threads=threads)
    prompt = prompt_ids(runtime.tokenize([r["prompt"] for r in shipped]), settings.prompt_tokens)
    questions = pick_questions(shipped, settings.questions)
    bandwidth = host_bandwidth(settings.bandwidth_mib, threads)
    with tempfile.TemporaryDirectory(prefix="edgekd-bench-") as tmp:
        rows = [
            benchmark_artifact(
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
            for artifact in artifacts
        ]
        checkable = sum(r.get("answer") is not None for r in shipped)
        note = questions_note(len(questions), checkable, 0, settings.answer_max_tokens)
        report = bench_report(
            profile, settings, host_info(threads, bandwidth, settings.bandwidth_mib), rows, note
        )
        if on_device is not None:
            report["device"] = on_device(artifacts, prompt=prompt, questions=questions)
    return report


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


def _timed_runs(runtime: Runtime, job: Job) -> tuple[list[float], list[float]]:
    ttft, decode = [], []
    for i in range(job.warmup_runs + job.runs):
        start = time.perf_counter()
        token = runtime.first(job.prompt)
        first = time.perf_counter()
        for _ in range(job.decode_tokens):
            token = runtime.next(token)
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


def _quality(job: Job, runtime: Runtime) -> dict:
    from edgekd.evaluate import quality

    heldout, reference = _load_heldout(job.heldout)
    return quality(runtime.heldout_logprobs(heldout), reference, heldout.targets).as_dict()


def _check_finite_logits(job: Job, runtime: Runtime) -> None:
    """Refuse a model whose weights hold NaN or inf: it runs at full speed, but its numbers would
    describe nothing. Asked after the measures, so its own load is not in the peak memory."""
    import torch

    logits = runtime.logits([job.prompt[:_FINITE_CHECK_TOKENS]])[0]
    if not bool(torch.isfinite(logits).all()):
        raise EdgekdError(
            f"{job.path}: its logits on the benchmark prompt hold NaN or inf, so its weights are "
            "broken and nothing is reported for it"
        )


def _answers(job: Job, runtime: Runtime) -> list[str]:
    """Greedy chat answers to the questions, through the runtime's own generation path."""
    conversations = [[{"role": "user", "content": q["prompt"]}] for q in job.questions]
    return runtime.chat(conversations, max_tokens=job.answer_max_tokens)


def _child(job: Job) -> dict:
    runtime = runtime_class(job.runtime)(job.path, threads=job.threads, n_ctx=job.n_ctx)
    baseline = rss_bytes("VmRSS")
    start = time.perf_counter()
    runtime.load()
    load_s = time.perf_counter() - start
    ttft, decode = _timed_runs(runtime, job)
    result = {
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": rss_bytes("VmHWM"),
        "load_s": load_s,
        "ttft_s": ttft,
        "decode_s": decode,
    }
    if job.speed_only:
        return result
    if job.heldout:
        result["quality"] = _quality(job, runtime)  # refuses non-finite log-probs
    else:
        _check_finite_logits(job, runtime)
        result["quality"] = None
    replies = _answers(job, runtime) if job.questions else []
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
    if job.runtime not in RUNTIMES:
        raise SystemExit(f"unknown runtime {job.runtime!r}; one of {', '.join(RUNTIMES)}")
    try:
        result = _child(job)
    except EdgekdError as e:  # the parent shows the last lines of stderr: the message alone
        raise SystemExit(str(e)) from None
    tmp = Path(out_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out_path)


if __name__ == "__main__":
    _main(sys.argv[1:])
