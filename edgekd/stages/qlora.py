"""qlora: load the student in 4-bit NF4 (bitsandbytes), train LoRA adapters (peft) with the KD
loss against the teacher, then merge them into the full-precision weights."""

from __future__ import annotations

import torch
from bitsandbytes.nn import Linear4bit
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from edgekd import host_memory, models
from edgekd.config import QLoraSettings
from edgekd.context import Context
from edgekd.evaluate import evaluate_torch
from edgekd.rundir import StageResult
from edgekd.stages.spec import SizeInputs, StageSpec
from edgekd.train import save_curve, train_kd


def load_nf4(model_dir, settings: QLoraSettings, device):
    """The model folder's weights in 4-bit NF4, ready to train adapters on."""
    # Compute in bf16 where the GPU has it, else fp32. The unquantized weights (embeddings, norms)
    # get the same dtype: left unset, transformers loads them in fp16 for bitsandbytes, and on a
    # CPU fp16 matmuls fall back to PyTorch's reference GEMM (one qlora step took minutes).
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    compute = torch.bfloat16 if bf16 else torch.float32
    config = models.bnb_config("4bit", compute, settings.double_quant)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=config,
        device_map=models.device_map(device),
        dtype=compute,
        use_safetensors=True,
    )
    # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its fast inference kernel
    # the first time the layer runs in eval mode without grad, and keeps it repacked; that kernel
    # has no backward, so after our "nf4" evaluation training would get no gradient through the
    # frozen base weights (only a warning). Keep the trainable layout throughout.
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def run(ctx: Context, settings: QLoraSettings) -> StageResult:
    model_dir = ctx.latest_model()
    reference = ctx.reference  # every process: its first use synchronizes them
    source = models.resolve_source(str(model_dir), role="student")
    quality = {}
    if ctx.is_main:
        before = models.load_model(source)
        quality["student before"] = evaluate_torch(before, ctx.heldout, reference).as_dict()
        del before
    nf4 = load_nf4(model_dir, settings, ctx.state.device)
    if ctx.is_main:
        quality["nf4"] = evaluate_torch(nf4, ctx.heldout, reference).as_dict()
    lora = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
    student = get_peft_model(nf4, lora)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    curve, train_report = train_kd(ctx, student, settings, name="qlora")
    artifacts: list[str] = []
    if ctx.is_main:
        quality["nf4 + lora"] = evaluate_torch(student, ctx.heldout, reference).as_dict()
        adapter_dir = ctx.work_dir / "adapter"
        student.save_pretrained(adapter_dir)
        # Merge into the full-precision weights, not the NF4 ones: the stages after this one
        # (and the exports) start from a plain float model.
        merged = PeftModel.from_pretrained(models.load_model(source), adapter_dir)
        merged = merged.merge_and_unload()
        quality["merged"] = evaluate_torch(merged, ctx.heldout, reference).as_dict()
        artifacts = [
            f"model/{a}" for a in models.save_model(merged, ctx.tokenizer, ctx.work_dir / "model")
        ]
        artifacts += [f"adapter/{p.name}" for p in sorted(adapter_dir.iterdir()) if p.is_file()]
        artifacts.append(save_curve(ctx.work_dir, curve))
    report = {
        "lora": lora.to_dict() | {"trainable_parameters": trainable},
        "training": train_report,
    }
    return StageResult(artifacts=artifacts, report=report, quality=quality)


def disk_bytes(s: SizeInputs) -> int:
    """Merged fp32 weights, the adapters and their small checkpoint."""
    return 5 * s.params


def host_bytes(s: SizeInputs) -> int:
    """The teacher, the NF4 student with its adapters, and two fp32 students: the one scored before
    training and the one the adapters are merged into (at Qwen2.5-0.5B's shape the peak held both,
    the first's pages kept by the allocator after it is freed)."""
    held = host_memory.teacher_bytes(s.teacher_config, s.recipe)
    held += host_memory.nf4_bytes(s.student_config) + 2 * host_memory.fp32_bytes(s.student_config)
    return int(host_memory.common_bytes(s.recipe, s.student_config) + held)


SPEC = StageSpec(
    name="qlora",
    settings=QLoraSettings,
    kind="train",
    folder="02-qlora",
    produces="hf",
    disk_bytes=disk_bytes,
    host_bytes=host_bytes,
    run=run,
    # Its KD targets may come from the logit cache: another folder or top_k is another output.
    keyed_with=("logit_cache",),
)
