"""qat_kd: train the student through fake quantization that reproduces llama.cpp's Q4_K_M export
tensor by tensor (weighted by the importance matrix of its incoming student when the export uses
one, which it leaves beside its model), against the full-precision teacher, and measure in
llama.cpp how much of the quantization loss it recovered."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate.utils import broadcast_object_list
from torch import nn
from torch.nn.utils import parametrize

from edgekd import calibration, host_memory, models
from edgekd.config import QatKdSettings
from edgekd.context import Context
from edgekd.errors import EdgekdError
from edgekd.evaluate import evaluate_torch, quality
from edgekd.formats import gguf
from edgekd.formats import imatrix as imatrix_file
from edgekd.formats.gguf_weighted import quantize_weighted
from edgekd.formats.registry import open_runtime
from edgekd.quant import ggml_types
from edgekd.quant.gguf_k import fake_quantize, q4_k_m_types
from edgekd.quant.imatrix import Imatrix, importance
from edgekd.rundir import StageResult
from edgekd.stages.spec import SizeInputs, StageSpec
from edgekd.train import full_state_dict, save_curve, train_kd

if TYPE_CHECKING:
    from edgekd.plan import Plan


class _StraightThrough(torch.autograd.Function):
    """The quantized values forward, the gradient straight to the weight backward: without the
    full-size copy that `kept + (w - w.detach())` would make of every weight in each forward."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        return kept.view_as(kept)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class FakeQuant(nn.Module):
    """A weight parametrization: forward sees the exported values, gradients pass straight.

    The quantized values are kept until `requantize` or a switch between training and
    evaluation asks for new ones: llama.cpp's search costs several times a training step, so a
    held-out check quantizes once (not once per batch), and in training a few steps at QAT's
    learning rate move almost no weight across a rounding boundary.
    """

    def __init__(self, ggml_type: str, importance: torch.Tensor | None = None):
        super().__init__()
        self.ggml_type = ggml_type
        self.register_buffer("importance", importance, persistent=False)
        self.kept: torch.Tensor | None = None

    def train(self, mode: bool = True) -> FakeQuant:
        if mode != self.training:
            self.kept = None
        return super().train(mode)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        # Under FSDP the same weight comes as a full tensor in the forward and as a sharded
        # DTensor when the loss reads the head: values kept for one are not the other's.
        fresh = w.detach()  # a Parameter's is a Tensor, a sharded one's a DTensor
        if self.kept is None or type(self.kept) is not type(fresh) or self.kept.shape != w.shape:
            self.kept = fake_quantize(fresh, self.ggml_type, self.importance)
        # The kept values exactly (w + (kept - w) could round off their last bit).
        return _StraightThrough.apply(w, self.kept)


def requantize(model: nn.Module) -> None:
    """The next forward quantizes the current weights again."""
    for module in model.modules():
        if isinstance(module, FakeQuant):
            module.kept = None


def attach_fake_quant(model: nn.Module, imatrix: Imatrix | None = None) -> dict[str, str]:
    """Fake-quantize every weight the way Q4_K_M exports it (weighted by `imatrix` where it has
    the tensor, as the export does); returns weight name -> ggml type."""
    types = q4_k_m_types(model.config)
    modules = dict(model.named_modules())
    targets = dict(types)
    if model.config.tie_word_embeddings:
        # The output projection reads the same tensor, exported once at the embedding's type.
        targets["lm_head.weight"] = types["model.embed_tokens.weight"]
    weights = {}
    if imatrix is not None:
        weights = {ggml_types.hf_name(n): importance(imatrix, n) for n in imatrix.sums}
    for weight, ggml_type in targets.items():
        owner, _, attr = weight.rpartition(".")
        imp = weights.get(weight)
        if imp is not None:
            imp = imp.to(getattr(modules[owner], attr).device)
        parametrize.register_parametrization(modules[owner], attr, FakeQuant(ggml_type, imp))
    return types


def detach_fake_quant(model: nn.Module) -> None:
    """Back to plain float weights (the trained ones, not their quantized values)."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


def _q4_k_m_kld(ctx: Context, model_dir: Path, folder: Path, imatrix: Imatrix | None) -> float:
    """Held-out kld to the teacher of the model's Q4_K_M GGUF (made as the export makes it),
    measured in llama.cpp."""
    f16 = gguf.write_gguf(model_dir, folder / "model-F16.gguf")
    q = gguf.quantize_gguf(f16, folder / "model-Q4_K_M.gguf", "Q4_K_M", threads=ctx.threads)
    if imatrix is not None:
        q = folder / "weighted-Q4_K_M.gguf"
        quantize_weighted(f16, folder / "model-Q4_K_M.gguf", q, imatrix, imatrix_file.FILE)
    lp = open_runtime(q, threads=ctx.threads).heldout_logprobs(ctx.heldout)
    return quality(lp, ctx.reference, ctx.heldout.targets).kld


def run(ctx: Context, settings: QatKdSettings) -> StageResult:
    model_dir = ctx.latest_model()
    reference = ctx.reference  # every process: its first use synchronizes them
    student = models.load_model(models.resolve_source(str(model_dir), role="student"))
    quality_rows = {}
    if ctx.is_main:
        quality_rows["student before"] = evaluate_torch(student, ctx.heldout, reference).as_dict()
    # The export's importance matrix, of the student as it comes in, before training moves it.
    imatrix = calibration.of_build(ctx, student) if ctx.effective.gguf_imatrix else None
    types = attach_fake_quant(student, imatrix)
    student.requires_grad_(True)
    before = evaluate_torch(student, ctx.heldout, reference)
    quality_rows["fake Q4_K_M before"] = before.as_dict()

    best = {"quality": before, "step": 0, "state": None}

    def keep_best(step: int, model: nn.Module) -> None:
        if step % settings.requantize_every == 0:
            requantize(model)
        if step % settings.eval_every and step != settings.max_steps:
            return
        # Every process takes main's decision: under FSDP gathering the weights is collective.
        checked = broadcast_object_list([evaluate_torch(model, ctx.heldout, reference)])[0]
        if checked.kld < best["quality"].kld:
            best.update(quality=checked, step=step, state=full_state_dict(model))

    curve, train_report = train_kd(ctx, student, settings, name="qat_kd", on_step=keep_best)
    if best["state"] is not None:
        student.load_state_dict(best["state"])
    artifacts: list[str] = []
    report = {"best_step": best["step"], "types": Counter(types.values()), "training": train_report}
    report["fake_quantizer"] = "llama.cpp's imatrix-weighted search" if imatrix else "llama.cpp's"
    if ctx.is_main:
        # A check that improved kept its weights, and its scores are theirs (checks quantize
        # afresh); else the last weights stay, not yet scored.
        kept = best["state"] is not None
        after = best["quality"] if kept else evaluate_torch(student, ctx.heldout, reference)
        quality_rows["fake Q4_K_M after"] = after.as_dict()
        detach_fake_quant(student)
        quality_rows["student after"] = evaluate_torch(student, ctx.heldout, reference).as_dict()
        saved = models.save_model(student, ctx.tokenizer, ctx.work_dir / "model")
        artifacts = [f"model/{a}" for a in saved] + [save_curve(ctx.work_dir, curve)]
        if imatrix is not None:
            imatrix_file.write(imatrix, imatrix_file.beside(ctx.work_dir / "model"))
            artifacts.append(imatrix_file.FILE)
        with tempfile.TemporaryDirectory(dir=ctx.work_dir) as tmp:
            q_before = _q4_k_m_kld(ctx, model_dir, Path(tmp) / "before", imatrix)
            q_after = _q4_k_m_kld(ctx, ctx.work_dir / "model", Path(tmp) / "after", imatrix)
        full = quality_rows["student before"]["kld"]
        full_after = quality_rows["student after"]["kld"]
        gap_before, gap_after = q_before - full, q_after - full
        # qat_kd also goes on learning from the teacher, so its Q4_K_M model can beat the input
        # student (recovered > 100%). The gap to its own float weights isolates quantization.
        gap_own = q_after - full_after
        report["recovery"] = {
            "measured_in": "llama.cpp, Q4_K_M GGUF vs the full-precision input student",
            "kld_full_precision": full,
            "kld_q4_k_m_before": q_before,
            "kld_q4_k_m_after": q_after,
            "kld_full_precision_after": full_after,
            "gap_before": gap_before,
            "gap_after": gap_after,
            "recovered": 1 - gap_after / gap_before if gap_before > 0 else None,
            "gap_after_own_weights": gap_own,
            "recovered_own_weights": 1 - gap_own / gap_before if gap_before > 0 else None,
        }
    return StageResult(artifacts=artifacts, report=report, quality=quality_rows)


def disk_bytes(s: SizeInputs) -> int:
    """The student and its checkpoint, plus the F16 and quantized GGUFs it measures before and
    after."""
    return 16 * s.params + 2 * (2 * s.params + s.gguf_bytes)


def check(plan: Plan, tokenizer) -> None:
    """The build exports the type qat_kd imitates, and the student's tensors have its layout."""
    quant = plan.effective.gguf_quant
    if quant != "Q4_K_M":
        raise EdgekdError(
            f"qat_kd imitates llama.cpp's Q4_K_M, but this build exports {quant}; "
            "set qat_kd.enabled=false or export Q4_K_M"
        )
    q4_k_m_types(plan.student_config)


def host_bytes(s: SizeInputs) -> int:
    """The KD step, the fake-quantized copy of every weight autograd keeps for backward, and the
    best step's weights kept aside."""
    step = host_memory.train_step_bytes(
        s.student_config, s.teacher_config, s.recipe, s.recipe.qat_kd
    )
    step += 2 * host_memory.fp32_bytes(s.student_config)
    return int(host_memory.common_bytes(s.recipe, s.student_config) + step)


SPEC = StageSpec(
    name="qat_kd",
    settings=QatKdSettings,
    kind="train",
    folder="03-qat-kd",
    produces="hf",
    disk_bytes=disk_bytes,
    host_bytes=host_bytes,
    run=run,
    check=check,
    needs="qat",
    # Its KD targets may come from the logit cache: another folder or top_k is another output;
    # its fake quantizer follows export_gguf's imatrix settings.
    keyed_with=("logit_cache", "export_gguf"),
)
