"""The bench on the profile's device: each device artifact measured there by the device runner,
in the same rows as the host bench, marked with where they were measured.

The numbers that do not depend on time (held-out ppl, kld and top1 from the device's own logits,
the exact-match answers) must equal the host's for the same artifact; speed and peak memory are
the device's. A fault on the device (unreachable, no runtime, out of disk, a dropped connection, a
killed runner) is one line in the report, and the host bench stands.

With `device.llama_bench` set, GGUF files are measured there by llama.cpp's own llama-bench instead:
speed only; the row says held-out quality, exact match and peak memory were not measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edgekd import llama_bench, remote
from edgekd.benchmark import MIB, Artifact, artifact_row, exact_match, size_on_disk
from edgekd.config import DeviceSettings
from edgekd.device_runner import content_sha256
from edgekd.errors import EdgekdError
from edgekd.evaluate import combine
from edgekd.formats.registry import open_runtime, runtime_class

if TYPE_CHECKING:
    from edgekd.config import BenchSettings, Profile

# The formats a profile may list, and the runtime module each needs on the device.
_FORMAT_RUNTIMES = {"gguf": "llama.cpp", "onnx": "onnxruntime"}


def check_device(device: DeviceSettings, formats: list[str]) -> dict:
    """Preflight: the device answers and has Python, numpy and the runtimes of `formats`; what it
    has otherwise (memory, disk, CPU). One line naming what is missing and how to get it."""
    ssh = remote.Ssh.of(device)
    info = remote.probe(ssh)
    for fmt in formats:
        if fmt in _FORMAT_RUNTIMES:
            runtime = _device_runtime(device, _FORMAT_RUNTIMES[fmt])
            remote.check(ssh, info, runtime, need_bytes=0, copy_bytes=0)
            if runtime == "llama-bench":
                remote.check_binary(ssh, device.llama_bench)
    return info


def _device_runtime(device: DeviceSettings, runtime: str) -> str:
    """What measures an artifact of `runtime` on the device: the profile's llama-bench for GGUF
    files when it names one, the runner's runtime otherwise."""
    return "llama-bench" if device.llama_bench and runtime == "llama.cpp" else runtime


def info_line(info: dict) -> str:
    """The device as the report describes it."""
    mem = info.get("mem_total_bytes")
    return (
        f"{info['cpu']} ({info['machine']}), {info['cores']} cores"
        + (f", {mem / MIB:.0f} MB memory" if mem else "")
        + f", Python {info['python']}"
    )


def _measured(result: dict, runtime, questions: list[dict], path: Path) -> dict:
    """The runner's answer in the form the host child gives its own."""
    if result["quality_terms"] is not None:
        quality = combine(result["quality_terms"]).as_dict()
    elif not result.get("finite", True):
        raise EdgekdError(
            f"{path}: its logits on the benchmark prompt hold NaN or inf on the device, so its "
            "weights are broken and nothing is reported for it"
        )
    else:
        quality = None
    replies = runtime.device_replies(result) if questions else []
    items = [
        {**q, "reply": r, "correct": exact_match(r, str(q["answer"]))}
        for q, r in zip(questions, replies, strict=True)
    ]
    return {
        **{k: result[k] for k in ("baseline_rss_bytes", "peak_rss_bytes", "load_s")},
        "ttft_s": result["ttft_s"],
        "decode_s": result["decode_s"],
        "quality": quality,
        "exact_match": {
            "correct": sum(i["correct"] for i in items),
            "total": len(items),
            "items": items,
        },
    }


def _row(
    ssh: remote.Ssh,
    artifact: Artifact,
    *,
    device: DeviceSettings,
    profile: Profile,
    settings: BenchSettings,
    threads: int,
    prompt: list[int],
    questions: list[dict],
    heldout_file: Path | None,
    held_sha: str | None,
) -> dict:
    cls = runtime_class(artifact.runtime)
    cost = cls.token_cost(artifact.path)
    need = cost.weights_bytes + cost.kv_bytes_per_position * profile.context_length
    size = size_on_disk(artifact.path)
    sha = content_sha256(artifact.path)
    on = _device_runtime(device, artifact.runtime)
    if on == "llama-bench":  # speed only: no held-out slice, no questions
        heldout_file, held_sha, questions = None, None, []
    info = remote.probe(ssh, sha, *([held_sha] if held_sha else []))
    held = 0 if held_sha is None or held_sha in info["kept"] else heldout_file.stat().st_size
    remote.check(ssh, info, on, need_bytes=need, copy_bytes=size, run_bytes=held)
    job = {
        "name": artifact.name,
        "runtime": on,
        "threads": threads,
        "n_ctx": profile.context_length,
        "prompt": prompt,
        "decode_tokens": settings.decode_tokens,
        "runs": settings.runs,
        "warmup_runs": settings.warmup_runs,
        "answer_max_tokens": settings.answer_max_tokens,
        "heldout": None,
    }
    if on == "llama-bench":
        remote.check_binary(ssh, device.llama_bench)
        job["binary"] = device.llama_bench
    else:
        runtime = open_runtime(artifact.path, threads=threads, n_ctx=profile.context_length)
        conversations = [[{"role": "user", "content": q["prompt"]}] for q in questions]
        job.update(runtime.device_chat(conversations))
    kept = remote.Kept(artifact.path, sha, info["cached"])
    held_kept = None
    if heldout_file is not None:
        held_kept = remote.Kept(heldout_file, held_sha, held_sha in info["kept"])
    run = remote.measure(ssh, kept, job, held_kept)
    if on == "llama-bench":
        measured = llama_bench.measures(run.result["llama_bench"], len(prompt), artifact.path)
    else:
        measured = _measured(run.result, runtime, questions, artifact.path)
    row = artifact_row(
        artifact,
        cost=cost,
        measured=measured,
        profile=profile,
        threads=threads,
        host_bandwidth_bps=None,
        prompt_tokens=len(prompt),
        decode_tokens=settings.decode_tokens,
        size_bytes=size,
    )
    projected = row["bandwidth"]["device_projection_tps"]
    row["measured_on"] = ssh.label + (" (llama-bench)" if on == "llama-bench" else "")
    if on == "llama-bench":
        row["not_measured"] = list(llama_bench.NOT_MEASURED)
    row["projection_error"] = projected / row["speed"]["decode_tps"]["median"] - 1
    row["remote"] = {
        "copy_s": run.copy_s,
        "copy_bytes": run.copy_bytes,
        "heldout_copy_s": run.heldout_copy_s,
        "heldout_copy_bytes": run.heldout_copy_bytes,
        "setup_s": run.setup_s,
        "run_s": run.run_s,
        "load_s": run.result.get("load_s"),  # llama-bench does not say
    }
    return row


def bench_on_device(
    device: DeviceSettings,
    artifacts: list[Artifact],
    *,
    profile: Profile,
    settings: BenchSettings,
    prompt: list[int],
    questions: list[dict],
    heldout_file: Path | None = None,
) -> dict:
    """The device's rows for the artifacts it can run, and one line per artifact it could not."""
    ssh = remote.Ssh.of(device)
    artifacts = [a for a in artifacts if a.shipped and a.runtime in remote.RUNTIME_MODULES]
    out: dict = {"name": ssh.label, "host": device.host, "rows": [], "errors": {}}
    try:
        info = remote.probe(ssh)
    except EdgekdError as err:
        return {**out, "error": str(err)}
    threads = max(1, min(settings.threads or profile.threads, info["cores"] or 1))
    # Hashed once: the slice (hundreds of MB) is kept on the device by it, copied once a build.
    held_sha = None if heldout_file is None else content_sha256(heldout_file)
    out.update(info=info, info_line=info_line(info), threads=threads)
    for artifact in artifacts:
        try:
            out["rows"].append(
                _row(
                    ssh,
                    artifact,
                    device=device,
                    profile=profile,
                    settings=settings,
                    threads=threads,
                    prompt=prompt,
                    questions=questions,
                    heldout_file=heldout_file,
                    held_sha=held_sha,
                )
            )
        except EdgekdError as err:
            out["errors"][artifact.name] = str(err)
    return out
