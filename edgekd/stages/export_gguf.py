"""export_gguf: write the student as GGUF with gguf-py, quantize it with llama.cpp's own quantizer
(or, with export_gguf.imatrix, with edgekd's importance-weighted search, bit-exact with
llama-quantize --imatrix), and prove in llama.cpp that the file is the model it came from."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from edgekd import calibration, host_memory, models
from edgekd.config import ExportGgufSettings
from edgekd.context import Context
from edgekd.errors import EdgekdError
from edgekd.evaluate import quality, torch_logprobs
from edgekd.formats import gguf
from edgekd.formats import imatrix as imatrix_file
from edgekd.formats.gguf_weighted import quantize_weighted
from edgekd.formats.registry import open_runtime
from edgekd.quant.imatrix import Imatrix
from edgekd.quant.imatrix import check as check_imatrix
from edgekd.report.export_readme import gguf_readme
from edgekd.rundir import StageResult
from edgekd.stages.spec import Output, SizeInputs, StageSpec

if TYPE_CHECKING:
    from edgekd.plan import Plan


def _imatrix(ctx: Context, model_dir: Path) -> tuple[Imatrix, str]:
    """The imatrix that came with the model (qat_kd's), else one computed from it now, checked
    against the model before any file is written; and which stage made it."""
    path = imatrix_file.beside(model_dir)
    source = models.resolve_source(str(model_dir), role="student")
    if path.exists():
        imatrix, made_by = imatrix_file.read(path), "the training stage before (its input model)"
    else:
        imatrix = calibration.of_build(ctx, models.load_model(source))
        made_by = "export_gguf (its input model)"
    widths = calibration.weighted_tensors(models.load_config(source))
    check_imatrix(imatrix, widths, str(path))
    return imatrix, made_by


def run(ctx: Context, settings: ExportGgufSettings) -> StageResult:
    quant = ctx.effective.gguf_quant
    model_dir, out = ctx.latest_model(), ctx.work_dir
    models.check_finite_weights(model_dir)
    heldout, threads = ctx.heldout, ctx.threads
    imatrix = _imatrix(ctx, model_dir) if settings.imatrix else None

    start = time.perf_counter()
    f16 = gguf.write_gguf(model_dir, out / "model-F16.gguf", dtype="F16")
    seconds = {"write_f16": time.perf_counter() - start}
    start = time.perf_counter()
    quantized = out / f"model-{quant}.gguf"
    method = {"quantizer": "llama.cpp (llama_model_quantize, no imatrix)"}
    if imatrix is None:
        gguf.quantize_gguf(f16, quantized, quant, threads=threads)
    else:
        plain = gguf.quantize_gguf(f16, out / f"plain-{quant}.gguf", quant, threads=threads)
        written = imatrix_file.write(imatrix[0], out / imatrix_file.FILE)
        tensors = quantize_weighted(f16, plain, quantized, imatrix[0], written.name)
        plain.unlink()
        method = {
            "quantizer": "edgekd's importance-weighted search (llama.cpp's imatrix path)",
            "imatrix": written.name,
            "imatrix_made_by": imatrix[1],
            "dataset": imatrix[0].datasets[0],
            "chunks": imatrix[0].chunk_count,
            "chunk_size": imatrix[0].chunk_size,
            "tensors": dict(Counter(tensors.values())),
        }
    seconds[f"quantize_{quant}"] = time.perf_counter() - start

    hf_ids = [ctx.tokenizer(t)["input_ids"] for t in ctx.heldout_texts]
    cpp_ids = open_runtime(f16, threads=threads).tokenize(ctx.heldout_texts)
    mismatches = sum(a != b for a, b in zip(hf_ids, cpp_ids, strict=True))

    student = models.load_model(models.resolve_source(str(model_dir), role="student"))
    torch_lp = torch_logprobs(student, heldout)
    report = {"quant": quant, "method": method}
    report["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    report["tokenizer"] = {"texts": len(hf_ids), "mismatches": mismatches}
    files = {"F16": f16, quant: quantized}
    rows, sizes, samples = {}, {}, {}
    for name, path in files.items():
        runtime = open_runtime(path, threads=threads)
        lp = runtime.heldout_logprobs(heldout)
        rows[f"gguf {name} (llama.cpp)"] = quality(lp, ctx.reference, heldout.targets).as_dict()
        if name == "F16":
            vs_torch = quality(lp, torch_lp, heldout.targets)
            report["f16_vs_torch"] = {"kld": vs_torch.kld, "top1": vs_torch.top1}
        sizes[path.name] = path.stat().st_size
        samples[path.name] = runtime.chat(
            [[{"role": "user", "content": ctx.recipe.eval.sample_prompt}]],
            max_tokens=ctx.recipe.eval.sample_max_tokens,
        )[0]
    report.update(sizes=sizes, samples={"prompt": ctx.recipe.eval.sample_prompt, **samples})
    artifacts = [quantized.name] + ([imatrix_file.FILE] if imatrix is not None else [])
    if settings.keep_f16:
        artifacts.append(f16.name)
    else:
        f16.unlink()
    (out / "README.md").write_text(gguf_readme(artifacts, ctx.profile))
    return StageResult(artifacts=[*artifacts, "README.md"], report=report, quality=rows)


def disk_bytes(s: SizeInputs) -> int:
    """The F16 GGUF and the quantized one."""
    return 2 * s.params + s.gguf_bytes


def check(plan: Plan, tokenizer) -> None:
    gguf.check_exportable(plan.student_config, tokenizer)
    quant = plan.effective.gguf_quant
    if plan.effective.gguf_imatrix and quant != "Q4_K_M":
        raise EdgekdError(
            f"export_gguf.imatrix: edgekd's weighted search covers Q4_K_M's tensor types, but "
            f"this build exports {quant}; set export_gguf.imatrix=false or export Q4_K_M"
        )


def outputs(folder: Path, report: dict) -> list[Output]:
    """Every GGUF the stage kept; the one of the build's quant type is what it ships."""
    found = []
    for path in sorted(folder.glob("model-*.gguf")):
        quant = path.stem.removeprefix("model-")
        scored = report.get("quality", {}).get(f"gguf {quant} (llama.cpp)")
        found.append(
            Output(f"student GGUF {quant}", path, quant == report.get("quant"), quality=scored)
        )
    return found


def host_bytes(s: SizeInputs) -> int:
    """The fp32 student and the F16 GGUF llama.cpp scores."""
    held = 1.5 * host_memory.fp32_bytes(s.student_config)
    return int(host_memory.common_bytes(s.recipe, s.student_config) + held)


SPEC = StageSpec(
    name="export_gguf",
    settings=ExportGgufSettings,
    kind="export",
    folder="04-export-gguf",
    produces="gguf",
    disk_bytes=disk_bytes,
    host_bytes=host_bytes,
    run=run,
    check=check,
    outputs=outputs,
    main_only=True,
    keyed_with=("eval",),
    needs="gguf",
)
