"""export_onnx: export the student with optimum-onnx (KV cache), quantize it with onnxruntime's
quantizers, and prove in onnxruntime that each folder is the model it came from."""

from __future__ import annotations

import time

import torch

from edgekd import models
from edgekd.config import ExportOnnxSettings
from edgekd.context import Context
from edgekd.evaluate import at_positions, quality
from edgekd.formats import onnx
from edgekd.formats.registry import open_runtime
from edgekd.pipeline import StageResult
from edgekd.report.export_readme import onnx_readme


def _max_logit_diff(student, sequences: list[list[int]], onnx_logits) -> float:
    worst = 0.0
    with torch.no_grad():
        for seq, theirs in zip(sequences, onnx_logits, strict=True):
            ours = student(torch.tensor([seq])).logits[0]
            worst = max(worst, (ours - theirs).abs().max().item())
    return worst


def run(ctx: Context, settings: ExportOnnxSettings) -> StageResult:
    if not ctx.is_main:
        return StageResult(artifacts=[])
    kinds = settings.quant if settings.quant is not None else ctx.profile.onnx_quant
    model_dir, out = ctx.latest_model(), ctx.work_dir
    heldout, threads = ctx.heldout, ctx.threads
    chat = [{"role": "user", "content": ctx.recipe.eval.sample_prompt}]
    max_tokens = ctx.recipe.eval.sample_max_tokens

    start = time.perf_counter()
    folders = {"fp32": onnx.export_onnx(model_dir, out / "fp32")}
    seconds = {"export_fp32": time.perf_counter() - start}
    for kind in kinds:
        start = time.perf_counter()
        folders[kind] = onnx.quantize_onnx(
            folders["fp32"],
            out / kind,
            kind,
            block_size=settings.block_size,
            accuracy_level=settings.accuracy_level,
        )
        seconds[f"quantize_{kind}"] = time.perf_counter() - start

    student = models.load_model(models.resolve_source(str(model_dir), role="student"))
    rows, sizes, samples = {}, {}, {}
    report: dict = {
        "quant": kinds,
        "block_size": settings.block_size,
        "accuracy_level": settings.accuracy_level,
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
