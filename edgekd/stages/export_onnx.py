"""export_onnx: export the student with optimum-onnx (KV cache), quantize it with onnxruntime's
quantizers, and prove in onnxruntime that each folder is the model it came from."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from edgekd import host_memory, models
from edgekd.config import ExportOnnxSettings
from edgekd.context import Context
from edgekd.evaluate import at_positions, quality
from edgekd.formats import onnx
from edgekd.formats.registry import open_runtime
from edgekd.report.export_readme import onnx_readme
from edgekd.rundir import StageResult
from edgekd.stages.spec import Output, SizeInputs, StageSpec

if TYPE_CHECKING:
    from edgekd.plan import Plan


def _max_logit_diff(student, sequences: list[list[int]], onnx_logits) -> float:
    worst = 0.0
    with torch.no_grad():
        for seq, theirs in zip(sequences, onnx_logits, strict=True):
            ours = student(torch.tensor([seq])).logits[0]
            worst = max(worst, (ours - theirs).abs().max().item())
    return worst


def run(ctx: Context, settings: ExportOnnxSettings) -> StageResult:
    kinds = list(ctx.effective.onnx_quant)
    model_dir, out = ctx.latest_model(), ctx.work_dir
    models.check_finite_weights(model_dir)
    heldout, threads = ctx.heldout, ctx.threads
    chat = [{"role": "user", "content": ctx.recipe.eval.sample_prompt}]
    max_tokens = ctx.recipe.eval.sample_max_tokens

    start = time.perf_counter()
    folders = {"fp32": onnx.export_onnx(model_dir, out / "fp32")}
    seconds = {"export_fp32": time.perf_counter() - start}
    for kind in kinds:
        start = time.perf_counter()
        calibration = None
        if kind == "int4" and settings.int4_method == "gptq":
            sequences = [ex.input_ids for ex in ctx.train_examples[: settings.gptq_sequences]]
            calibration = onnx.Calibration(folders["fp32"], sequences)
        folders[kind] = onnx.quantize_onnx(
            folders["fp32"],
            out / kind,
            kind,
            block_size=settings.block_size,
            accuracy_level=settings.accuracy_level,
            method=settings.int4_method,
            head_bits=settings.head_bits,
            int8_projections=settings.int8_projections,
            calibration=calibration,
        )
        seconds[f"quantize_{kind}"] = time.perf_counter() - start

    student = models.load_model(models.resolve_source(str(model_dir), role="student"))
    rows, sizes, samples = {}, {}, {}
    report: dict = {
        "quant": kinds,
        "block_size": settings.block_size,
        "accuracy_level": settings.accuracy_level,
        "method": {
            "int4": f"onnxruntime MatMulNBits {settings.int4_method}, block {settings.block_size}, "
            f"{'float' if settings.head_bits == 32 else f'{settings.head_bits}-bit'} head, "
            + (
                f"8-bit {', '.join(settings.int8_projections)}, "
                if settings.int8_projections
                else ""
            )
            + "4-bit embedding",
            "int8": f"onnxruntime MatMulNBits 8-bit symmetric, block {settings.block_size}, "
            "float embedding",
        },
    }
    for name, folder in folders.items():
        runtime = open_runtime(folder, threads=threads, tokenizer=ctx.tokenizer)
        logits = runtime.logits(heldout.sequences)
        if name == "fp32":
            report["fp32_vs_torch_max_abs_logit_diff"] = _max_logit_diff(
                student, heldout.sequences, logits
            )
        lp = at_positions([x.log_softmax(-1) for x in logits], heldout)
        rows[f"onnx {name} (onnxruntime)"] = quality(lp, ctx.reference, heldout.targets).as_dict()
        sizes[name] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        samples[name] = runtime.chat([chat], max_tokens=max_tokens)[0]
    # The builder below loads the student again in its own process: nothing of it stays here.
    del student, runtime, logits, lp
    if settings.genai:
        start = time.perf_counter()
        genai = onnx.build_genai(model_dir, out / "genai-int4")
        seconds["genai_int4"] = time.perf_counter() - start
        sizes["genai-int4"] = sum(f.stat().st_size for f in genai.rglob("*") if f.is_file())
        genai_runtime = open_runtime(genai, threads=threads, tokenizer=ctx.tokenizer)
        samples["genai-int4"] = genai_runtime.chat([chat], max_tokens=max_tokens)[0]
        folders["genai-int4"] = genai
    report.update(
        seconds={k: round(v, 1) for k, v in seconds.items()},
        sizes=sizes,
        samples={"prompt": ctx.recipe.eval.sample_prompt, **samples},
    )
    (out / "README.md").write_text(onnx_readme(list(folders), ctx.profile))
    artifacts = [str(f.relative_to(out)) for d in folders.values() for f in sorted(d.rglob("*"))]
    return StageResult(
        artifacts=[a for a in artifacts if (out / a).is_file()] + ["README.md"],
        report=report,
        quality=rows,
    )


def disk_bytes(s: SizeInputs) -> int:
    """The fp32 export, each quantized copy and the genai int4 folder."""
    p = s.params
    quantized = sum({"int4": p * 5 // 8, "int8": p}[k] for k in s.effective.onnx_quant)
    return 4 * p + quantized + (p * 5 // 8 if s.recipe.export_onnx.genai else 0)


def check(plan: Plan, tokenizer) -> None:
    onnx.check_exportable(plan.student_config)


def outputs(folder: Path, report: dict) -> list[Output]:
    """Every ONNX folder the stage wrote, fp32 first; the quantized kinds asked for are shipped."""
    shipped = report.get("quant") or []
    folders = [p.parent for p in folder.glob("*/model.onnx")]  # a genai folder holds one too
    return [
        Output(
            f"student ONNX {f.name}",
            f,
            shipped=f.name in shipped,
            quality=report.get("quality", {}).get(f"onnx {f.name} (onnxruntime)"),
        )
        for f in sorted(folders, key=lambda f: (f.name != "fp32", f.name))
    ]


# Peak resident memory in fp32 copies of the student (measured at Qwen2.5-0.5B's and -1.5B's
# shapes, bench/real_size.py): the export holds the student, the exporter's traced graph and the
# ONNX model's weights; optimum's post-processing, where the weights fit one protobuf message,
# loads the exported model once more; onnxruntime-genai's builder, in its own process, the student
# it loads and the int4 graph it makes of it.
EXPORT_FP32 = 2.5
POST_PROCESS_FP32 = 1.5
GENAI_BUILDER_FP32 = 2.5


def host_bytes(s: SizeInputs) -> int:
    """The larger of the export and onnxruntime-genai's builder, which runs in a child process
    once this one has let go of the student."""
    fp32 = host_memory.fp32_bytes(s.student_config)
    export = EXPORT_FP32 + (POST_PROCESS_FP32 if onnx.post_processable(s.params) else 0)
    builder = GENAI_BUILDER_FP32 * fp32 + host_memory.RUNTIME_BYTES
    held = max(export * fp32, builder if s.recipe.export_onnx.genai else 0)
    return int(host_memory.common_bytes(s.recipe, s.student_config) + held)


SPEC = StageSpec(
    name="export_onnx",
    settings=ExportOnnxSettings,
    kind="export",
    folder="05-export-onnx",
    produces="onnx",
    disk_bytes=disk_bytes,
    host_bytes=host_bytes,
    run=run,
    check=check,
    outputs=outputs,
    main_only=True,
    keyed_with=("eval",),
    needs="onnx",
)
