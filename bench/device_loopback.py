"""A finished build's device artifacts measured as its bench stage measures them (held-out slice
and teacher reference from the run's cache, the same exact-match questions and settings): on this
host, under the profile's memory cap, and on a device over SSH, here a real OpenSSH server on
127.0.0.1 standing in for it, twice (the second time the artifacts are already there).

    python bench/device_loopback.py RUN_DIR [--profile phone-1gb] [--json out.json]

The run folder is only read. Prints the bench summary (with the side-by-side table) and the
remote path's cost of the second pass.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from edgekd import benchmark, data, device, models
from edgekd.benchmark import Artifact
from edgekd.config import DeviceSettings, load_profile, load_recipe
from edgekd.console import console
from edgekd.evaluate import HeldOut, load_reference
from edgekd.report.summary import print_bench
from edgekd.report.text import remote_line
from edgekd.testing import sshd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--profile", default="phone-1gb")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    recipe = load_recipe(None, ["bench.speculative.prompts=0"])
    settings, s = recipe.bench, recipe.data
    rows = data.read_jsonl(next((args.run / "cache").glob("corpus-*.jsonl")))
    train, held = data.split_heldout(rows, s.heldout_fraction, s.max_heldout)
    tokenizer = models.load_tokenizer(models.resolve_source("embedded", role="teacher"))
    heldout = HeldOut.from_examples(data.tokenize_rows(held, tokenizer, max_len=s.max_seq_len))
    reference = load_reference(next((args.run / "cache").glob("reference-*.safetensors")))
    trained = {m["content"] for r in train for m in r.get("messages", []) if m["role"] == "user"}
    checkable = [r for r in data.default_prompts() if r.get("answer") is not None]
    questions = benchmark.pick_questions(checkable, settings.questions, exclude=trained)
    artifacts = [
        Artifact(
            "student GGUF Q4_K_M",
            "llama.cpp",
            args.run / "04-export-gguf" / "model-Q4_K_M.gguf",
            shipped=True,
        ),
        Artifact(
            "student ONNX int4", "onnxruntime", args.run / "05-export-onnx" / "int4", shipped=True
        ),
    ]
    with tempfile.TemporaryDirectory() as tmp, sshd(Path(tmp) / "ssh") as server:
        board = DeviceSettings(**server.device(name="loopback sshd"))
        profile = load_profile(args.profile).model_copy(update={"device": board})
        threads = benchmark.bench_threads(profile.threads, settings.threads)
        prompt = benchmark.prompt_ids(heldout.sequences, settings.prompt_tokens)
        bandwidth = benchmark.host_bandwidth(settings.bandwidth_mib, threads)
        heldout_file = Path(tmp) / "heldout.safetensors"
        benchmark.save_heldout(heldout_file, heldout, reference)
        common = {"profile": profile, "settings": settings, "prompt": prompt}
        common |= {"questions": questions, "heldout_file": heldout_file}
        scratch = Path(tmp) / "job"
        rows = [
            benchmark.benchmark_artifact(
                a, threads=threads, host_bandwidth_bps=bandwidth, scratch=scratch, **common
            )
            for a in artifacts
        ]
        first = device.bench_on_device(board, artifacts, **common)
        again = device.bench_on_device(board, artifacts, **common)
    host = benchmark.host_info(threads, bandwidth, settings.bandwidth_mib)
    note = benchmark.questions_note(len(questions), len(checkable), 0, settings.answer_max_tokens)
    report = benchmark.bench_report(profile, settings, host, rows, note)
    report["device"] = first
    print_bench(report, console)
    for row in again["rows"]:
        console.print(f"second pass: {remote_line(again, row)}", highlight=False)
    if args.json:
        args.json.write_text(json.dumps({**report, "device_again": again}, indent=1))


if __name__ == "__main__":
    main()
