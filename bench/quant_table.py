"""Every quantization choice edgekd has, on one finished build's students, each measured in its own
runtime on the build's held-out slice against the teacher's reference: one table.

Rows: the float students (before qat_kd: 02-qlora; final: 03-qat-kd) in torch; their Q4_K_M
GGUF made by llama.cpp without an importance matrix and by edgekd with one (computed from that
student on the build's training split, as export_gguf computes it) in llama.cpp; the final
student's ONNX (the build's fp32 export) in 8 bits and in 4 bits by each of onnxruntime's
MatMulNBits methods, block sizes and head widths, in onnxruntime. The gap is an artifact's kld
minus that of the float student it was made from.

    nice python bench/quant_table.py RUN_DIR [--work DIR] [--only gguf|onnx] [--student final]
        [--int4 ROW ...] [--json out.json]

The run folder is only read; everything is written under --work (a temporary folder by default).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from edgekd import calibration, data, models
from edgekd.config import ExportGgufSettings, ExportOnnxSettings, load_recipe
from edgekd.evaluate import HeldOut, evaluate_torch, load_reference, quality
from edgekd.formats import gguf, onnx
from edgekd.formats import imatrix as imatrix_file
from edgekd.formats.gguf_weighted import quantize_weighted
from edgekd.formats.registry import open_runtime

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# (method, block size, head bits, projections in 8 bits) of the ONNX int4 rows.
ONNX_INT4 = [
    *[("rtn_sym", b, 8, ()) for b in (32, 64, 128)],
    *[("rtn_asym", b, 8, ()) for b in (32, 64, 128)],
    *[(m, b, 8, ()) for m in ("hqq", "k_quant", "gptq") for b in (32, 64, 128)],
    ("rtn_asym", 64, 4, ()),
    ("rtn_asym", 64, 32, ()),
    # Mixed layouts: where Q4_K_M spends more than 4 bits on this student (v: Q8_0; the other
    # attention and gate/up matrices: Q5_0; ffn_down Q6_K in some layers).
    ("rtn_asym", 32, 8, ("v_proj",)),
    ("rtn_asym", 32, 8, ("k_proj", "v_proj")),
    ("rtn_asym", 32, 8, ("v_proj", "down_proj")),
    ("rtn_asym", 32, 8, ("down_proj",)),
    ("rtn_asym", 32, 8, ATTENTION),
    ("rtn_asym", 32, 8, (*ATTENTION, "down_proj")),
    ("rtn_asym", 32, 8, ("gate_proj", "up_proj")),
    ("rtn_asym", 32, 8, (*ATTENTION, "gate_proj", "up_proj")),
]


# The students a run folder holds, by --student choice: (stage folder, label in the rows).
STUDENTS = {"final": ("03-qat-kd", "final"), "before-qat": ("02-qlora", "before qat_kd")}


def int4_key(method: str, block: int, head: int, wide: tuple[str, ...]) -> str:
    """A row's name for --int4: METHOD-BLOCK-hHEAD, then -8bit-PROJ+PROJ for a mixed layout."""
    return f"{method}-{block}-h{head}" + (f"-8bit-{'+'.join(wide)}" if wide else "")


def folder_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.iterdir())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--only", choices=["gguf", "onnx"])
    ap.add_argument(
        "--student", action="append", choices=list(STUDENTS), help="only these students' rows"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gptq-sequences", type=int, default=16)
    ap.add_argument(
        "--int4",
        action="append",
        help="only these ONNX int4 rows, by method or METHOD-BLOCK-hHEAD[-8bit-PROJ+PROJ] "
        "(then no int8 row)",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="quant-table-"))
    work.mkdir(parents=True, exist_ok=True)
    s = load_recipe(None, []).data
    rows = data.read_jsonl(next((args.run / "cache").glob("corpus-*.jsonl")))
    train, held = data.split_heldout(rows, s.heldout_fraction, s.max_heldout)
    # The final student first: it is what the build ships.
    wanted = args.student or list(STUDENTS)
    students = {STUDENTS[k][1]: args.run / STUDENTS[k][0] / "model" for k in wanted}
    tokenizer = models.load_tokenizer(
        models.resolve_source(str(next(iter(students.values()))), role="student")
    )
    heldout = HeldOut.from_examples(data.tokenize_rows(held, tokenizer, max_len=s.max_seq_len))
    reference = load_reference(next((args.run / "cache").glob("reference-*.safetensors")))
    train_ids = [ex.input_ids for ex in data.tokenize_rows(train, tokenizer, max_len=s.max_seq_len)]
    table: list[dict] = []

    def add(name: str, runtime: str, path: Path | None, q, float_kld: float, seconds: float):
        row = {"artifact": name, "runtime": runtime, **q.as_dict()}
        row["bytes"] = folder_bytes(path) if path is not None else None
        row["gap"] = row["kld"] - float_kld
        row["seconds"] = round(seconds, 1)
        table.append(row)
        print(json.dumps(row), flush=True)

    def measure(path: Path):
        lp = open_runtime(path, threads=args.threads).heldout_logprobs(heldout)
        return quality(lp, reference, heldout.targets)

    floats = {}
    for label, model_dir in students.items():
        model = models.load_model(models.resolve_source(str(model_dir), role="student"))
        q = evaluate_torch(model, heldout, reference)
        floats[label] = q.kld
        add(f"float student {label}", "torch", None, q, q.kld, 0)
        if args.only == "onnx":
            continue
        out = work / label.replace(" ", "-")
        out.mkdir(exist_ok=True)
        f16 = gguf.write_gguf(model_dir, out / "model-F16.gguf")
        start = time.perf_counter()
        plain = gguf.quantize_gguf(f16, out / "plain.gguf", "Q4_K_M", threads=args.threads)
        add(
            f"Q4_K_M {label}, no imatrix",
            "llama.cpp",
            plain,
            measure(plain),
            q.kld,
            time.perf_counter() - start,
        )
        start = time.perf_counter()
        g = ExportGgufSettings()
        # A student qat_kd trained against the weighted search ships with the imatrix it trained
        # against (of qat_kd's input), as export_gguf takes it; any other gets its own.
        if (beside := imatrix_file.beside(model_dir)).is_file():
            imatrix, made = imatrix_file.read(beside), "qat_kd's input"
        else:
            imatrix = calibration.collect(
                model, train_ids, g.imatrix_chunks, g.imatrix_chunk_size, "training split"
            )
            made = "its own"
        weighted = out / "imatrix.gguf"
        quantize_weighted(f16, plain, weighted, imatrix, "imatrix.gguf")
        add(
            f"Q4_K_M {label}, imatrix of {made} ({imatrix.chunk_count} chunks)",
            "llama.cpp",
            weighted,
            measure(weighted),
            q.kld,
            time.perf_counter() - start,
        )

    if args.only != "gguf":
        fp32 = args.run / "05-export-onnx" / "fp32"
        o = ExportOnnxSettings()
        start = time.perf_counter()
        for block in () if args.int4 else (32, 64):
            start = time.perf_counter()
            int8 = onnx.quantize_onnx(
                fp32,
                work / f"onnx-int8-{block}",
                "int8",
                block_size=block,
                accuracy_level=o.accuracy_level,
                method=o.int4_method,
                head_bits=o.head_bits,
                int8_projections=o.int8_projections,
            )
            q8 = measure(int8)
            add(
                f"ONNX int8 final (block {block})",
                "onnxruntime",
                int8,
                q8,
                floats["final"],
                time.perf_counter() - start,
            )
        for method, block, head, wide in ONNX_INT4:
            key = int4_key(method, block, head, wide)
            if args.int4 and not {method, key} & set(args.int4):
                continue
            name = f"onnx-int4-{key}"
            start = time.perf_counter()
            calib = None
            if method == "gptq":
                calib = onnx.Calibration(fp32, train_ids[: args.gptq_sequences])
            try:
                path = onnx.quantize_onnx(
                    fp32,
                    work / name,
                    "int4",
                    block_size=block,
                    accuracy_level=o.accuracy_level,
                    method=method,
                    head_bits=head,
                    int8_projections=list(wide),
                    calibration=calib,
                )
            except Exception as e:  # noqa: BLE001  (a method that fails is a row that says so)
                print(json.dumps({"artifact": name, "error": f"{type(e).__name__}: {e}"}))
                table.append({"artifact": name, "error": f"{type(e).__name__}: {e}"})
                continue
            head_text = "float head" if head == 32 else f"{head}-bit head"
            head_text += f", 8-bit {' '.join(wide)}" if wide else ""
            add(
                f"ONNX int4 final, {method}, block {block}, {head_text}",
                "onnxruntime",
                path,
                measure(path),
                floats["final"],
                time.perf_counter() - start,
            )
            if path.exists() and args.work is None:
                for f in path.iterdir():
                    f.unlink()

    print("\n| artifact | runtime | size MB | kld | top1 | ppl | gap to float |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        if "error" in r:
            print(f"| {r['artifact']} | failed: {r['error'][:80]} | | | | | |")
            continue
        size = f"{r['bytes'] / 1e6:.1f}" if r["bytes"] else ""
        print(
            f"| {r['artifact']} | {r['runtime']} | {size} | {r['kld']:.4f} | {r['top1']:.4f} "
            f"| {r['ppl']:.3f} | {r['gap']:+.4f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
