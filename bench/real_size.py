"""Does the whole chain hold at real width and vocabulary, and does the plan's memory estimate
match what each stage really takes? Prints a markdown table and writes JSON.

Builds a teacher with Qwen2.5-1.5B's exact shape and a student with Qwen2.5-0.5B's (random
weights, seeded: no such weights can be downloaded here) and Qwen2's real tokenizer (the vocab-only
GGUF in the llama.cpp source of llama-cpp-python's sdist), then runs `edgekd build` one stage per
process, each stage at a handful of steps, both exports and a short bench. Per stage it reports
the wall time, the peak resident memory measured (the kernel's high-water mark of the stage's
largest process, and the sampled sum over its process tree), the plan's estimate for that stage
and their ratio; then the artifacts' sizes and each export's parity numbers from its report.

    python bench/real_size.py --work /tmp/edgekd-real-size [--threads 2]
    python bench/real_size.py --student 1.5b --stages distill \
        --set distill.scale.mixed_precision=bf16

The full run needs ~25 GB of disk in --work and about an hour on a shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

GB = 1024**3
# What Qwen2.5-0.5B-Instruct's and Qwen2.5-1.5B-Instruct's config.json
# (huggingface.co/Qwen/Qwen2.5-{0.5B,1.5B}-Instruct) share, of the fields a Qwen2ForCausalLM reads.
QWEN25 = dict(
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
    hidden_act="silu",
)
QWEN25_1_5B = dict(
    QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12
)
QWEN25_0_5B = dict(
    QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14
)
SHAPES = {"0.5b": QWEN25_0_5B, "1.5b": QWEN25_1_5B}
LLAMA_CPP_PYTHON = "0.3.36"
VOCAB_GGUF = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/models/ggml-vocab-qwen2.gguf"
# Every stage at a handful of steps; both exports; a short bench.
FEW_STEPS = [
    "data.regenerate=false",
    "qlora.enabled=true",
    "data.max_heldout=4",
    "eval.sample_max_tokens=8",
    *(
        f"{s}.{k}"
        for s in ("distill", "qlora", "qat_kd")
        for k in ("max_steps=2", "batch_size=1", "log_every=1", "checkpoint_every=50")
    ),
    "qat_kd.eval_every=2",
    "bench.runs=1",
    "bench.warmup_runs=0",
    "bench.prompt_tokens=32",
    "bench.decode_tokens=8",
    "bench.questions=2",
    "bench.answer_max_tokens=8",
    "bench.speculative.prompts=1",
    "bench.speculative.max_tokens=8",
    "bench.task_limit=2",
]
DISK_NEEDED = 25 * GB


def vocab_gguf(work: Path) -> Path:
    """Qwen2's vocab-only GGUF from llama-cpp-python's sdist (the package registry's copy)."""
    target = work / "sdist" / VOCAB_GGUF
    if target.is_file():
        return target
    dl = work / "sdist"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
         f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(dl)],
        check=True,
    )  # fmt: skip
    with tarfile.open(dl / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as tar:
        tar.extract(VOCAB_GGUF, dl, filter="data")
    return target


def qwen2_tokenizer(work: Path):
    """Qwen2's tokenizer (151,643 BPE tokens + specials, its ChatML template) from the GGUF."""
    from transformers import AutoTokenizer

    path = vocab_gguf(work)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if not tok.chat_template:
        raise SystemExit(f"{path} carries no chat template")
    return tok


def save_model(folder: Path, shape: dict, tokenizer, seed: int) -> None:
    """A random Qwen2 of `shape` in bf16 safetensors (as Qwen2.5 ships), with the tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (folder / "config.json").is_file():
        return
    torch.manual_seed(seed)
    config = Qwen2Config(
        **shape,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        torch_dtype="bfloat16",
    )
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    tmp = folder.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    # save_pretrained writes a tokenizer.model for a GGUF-loaded tokenizer that is not valid
    # SentencePiece; converters that see it fail.
    (tmp / "tokenizer.model").unlink(missing_ok=True)
    tmp.rename(folder)


def corpus(path: Path, rows: int) -> None:
    """`rows` of the shipped prompts with short answers written here (the random teacher's own
    would be noise, and data.regenerate=false keeps it from answering)."""
    from edgekd.data import default_prompts

    prompts = [r["prompt"] for r in default_prompts()[:rows]]
    with path.open("w") as f:
        for i, p in enumerate(prompts):
            answer = (
                f"Here is a short answer to question {i + 1}. It covers the main idea in plain "
                "words, gives one example, and ends with a summary of the key point."
            )
            messages = [{"role": "user", "content": p}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}) + "\n")


def prepare(work: Path, teacher: Path, student: Path, data: Path, rows: int) -> None:
    """The teacher and student folders with Qwen2's tokenizer, and the corpus."""
    tok = qwen2_tokenizer(work)
    save_model(teacher, QWEN25_1_5B, tok, seed=0)
    if student != teacher:
        save_model(student, SHAPES[student.name.removeprefix("student-")], tok, seed=1)
    corpus(data, rows)


def _tree_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants now, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2 :].split()
            children.setdefault(int(fields[1]), []).append(int(d))
            rss[int(d)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def run_measured(cmd: list[str], log: Path, env: dict) -> dict:
    """Run `cmd`; its wall and CPU time, the kernel's max RSS of its largest process and the
    peak of its process tree's summed RSS, sampled every 0.2 s."""
    start = time.perf_counter()
    # /usr/bin/time reads the kernel's high-water mark of the largest process it waited for; a
    # fork of this (larger) process would inherit this one's.
    rss_file = log.with_suffix(".maxrss")
    cmd = ["/usr/bin/time", "-f", "%M %U %S", "-o", str(rss_file), *cmd]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.2):
                peak[0] = max(peak[0], _tree_rss(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        proc.wait()
        done.set()
        sampler.join()
    # The last line: time's own note ("Command exited with non-zero status") comes first.
    last = rss_file.read_text().splitlines()[-1].split() if rss_file.is_file() else ["0", "0", "0"]
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(float(last[1]) + float(last[2]), 1),
        "max_rss_gb": round(int(last[0]) * 1024 / GB, 2),
        "tree_rss_gb": round(peak[0] / GB, 2),
        "rc": proc.returncode,
    }


def plan_estimates(profile: str, overrides: list[str], stages: list[str]) -> dict[str, float]:
    """The plan's host peak-memory estimate of each stage, in GB (configs only)."""
    from edgekd.config import load_profile, load_recipe
    from edgekd.plan import make_plan

    prof = load_profile(profile)
    plan = make_plan(prof, load_recipe(None, overrides), stages, timing=False, strict=False)
    return {s: b / GB for s, b in getattr(plan, "host_memory", {}).items()}


def parity(run: Path) -> dict:
    """Each export's parity and sizes as its report.json gives them."""
    from edgekd import stages as specs

    found = {}
    for spec in specs.SPECS:
        report = run / spec.folder / "report.json"
        if spec.kind != "export" or not report.is_file():
            continue
        r = json.loads(report.read_text())
        keep = ("f16_vs_torch", "fp32_vs_torch_max_abs_logit_diff", "tokenizer", "sizes", "quality")
        found[spec.name] = {k: r[k] for k in keep if k in r}
    return found


def artifact_sizes(run: Path) -> dict[str, float]:
    manifest = run / "manifest.json"
    if not manifest.is_file():
        return {}
    sizes = {}
    for stage, entry in json.loads(manifest.read_text()).get("stages", {}).items():
        for name, art in entry.get("artifacts", {}).items():
            sizes[f"{stage}/{name}"] = art["bytes"] / GB
    return sizes


def table(rows: list[dict]) -> str:
    lines = [
        "| stage | wall | CPU | peak RSS, largest process | peak RSS, process tree | "
        "plan's estimate | estimate / measured |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        measured = max(r["max_rss_gb"], r["tree_rss_gb"])
        est = r.get("estimate_gb")
        ratio = f"{est / measured:.2f}" if est and measured else "-"
        cpu = f"{r['cpu_seconds'] / 60:.1f} min" if "cpu_seconds" in r else "-"
        stage = r["stage"] if r["rc"] == 0 else f"{r['stage']} (stopped: exit {r['rc']})"
        lines.append(
            f"| {stage} | {r['seconds'] / 60:.1f} min | {cpu} | {r['max_rss_gb']:.2f} GB | "
            f"{r['tree_rss_gb']:.2f} GB | {f'{est:.2f} GB' if est else '-'} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgekd-real-size"))
    ap.add_argument("--student", choices=sorted(SHAPES), default="0.5b")
    ap.add_argument("--profile", default="phone-4gb")
    ap.add_argument("--stages", default=None, help="comma-separated; unset: the whole chain")
    ap.add_argument("--rows", type=int, default=24, help="corpus rows")
    ap.add_argument("--seq", type=int, default=128, help="data.max_seq_len")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra overrides")
    ap.add_argument("--name", default=None, help="run folder <work>/run-NAME; default: --student")
    ap.add_argument("--json", type=Path, default=None, help="default: <work>/real_size-NAME.json")
    ap.add_argument(
        "--table",
        type=Path,
        nargs="+",
        default=None,
        help="print the table of finished runs' JSON again, with the plan's current estimates",
    )
    args = ap.parse_args()
    if args.table:
        rows = []
        for path in args.table:
            result = json.loads(path.read_text())
            stages = [r["stage"] for r in result["stages"]]
            estimates = plan_estimates(result["profile"], result["overrides"], stages)
            for r in result["stages"]:
                rows.append({**r, "estimate_gb": round(estimates[r["stage"]], 2)})
        print(table(rows))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.work).free
    if free < DISK_NEEDED:
        print(f"only {free / GB:.0f} GB free in {args.work}; the full run needs ~25 GB")
    teacher, student = args.work / "teacher-1.5b", args.work / f"student-{args.student}"
    if args.student == "1.5b":
        student = teacher
    data = args.work / "corpus.jsonl"
    # In a child process: the models' and the tokenizer's memory then leaves with it, not
    # staying resident here beside the stages being measured.
    spawn = multiprocessing.get_context("spawn")
    child = spawn.Process(target=prepare, args=(args.work, teacher, student, data, args.rows))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"preparing the models in {args.work} failed")
    name = args.name or args.student
    run = args.work / f"run-{name}"
    overrides = [
        f"teacher.source={teacher}",
        f"student.source={student}",
        f"data.source={data}",
        f"data.max_seq_len={args.seq}",
        f"eval.threads={args.threads}",
        f"bench.threads={args.threads}",
        *FEW_STEPS,
        *args.sets,
    ]

    from edgekd.config import load_profile, load_recipe
    from edgekd.pipeline import select_stages

    chain = select_stages(
        args.stages.split(",") if args.stages else None,
        load_profile(args.profile),
        load_recipe(None, overrides),
    )
    estimates = plan_estimates(args.profile, overrides, chain)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    for stage in chain:
        cmd = ["nice", "-n", "5", sys.executable, "-m", "edgekd.cli", "build",
               "--profile", args.profile, "--out", str(run), "--stages", stage,
               *(a for o in overrides for a in ("--set", o))]  # fmt: skip
        print(f"{time.strftime('%H:%M:%S')} {stage} ...", flush=True)
        m = run_measured(cmd, args.work / f"{name}-{stage}.log", env)
        row = {"stage": stage, **m, "estimate_gb": round(estimates.get(stage, 0), 2)}
        rows.append(row)
        print(f"  {row}", flush=True)
        if m["rc"] != 0:
            print(f"  {stage} failed: see {args.work / f'{name}-{stage}.log'}")
            break
    result = {
        "student": args.student,
        "profile": args.profile,
        "overrides": overrides,
        "stages": rows,
        "artifacts_gb": artifact_sizes(run),
        "exports": parity(run),
    }
    print(table(rows))
    for artifact, size in result["artifacts_gb"].items():
        print(f"  {artifact}: {size:.3f} GB")
    print(json.dumps(result["exports"], indent=1))
    out = args.json or args.work / f"real_size-{name}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
