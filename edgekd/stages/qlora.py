"""qlora: load the student in 4-bit NF4 (bitsandbytes), train LoRA adapters (peft) with the KD
loss against the teacher, then merge them into the full-precision weights."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from edgekd import models
from edgekd.config import QLoraSettings
from edgekd.context import Context
from edgekd.evaluate import evaluate_torch
from edgekd.pipeline import StageResult
from edgekd.train import save_curve, train_kd


def _load_nf4(model_dir, settings: QLoraSettings, device):
    # Compute in bf16 where the GPU has it; on CPU bitsandbytes computes NF4 matmuls in fp32.
    compute = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    config = models.bnb_config("4bit", compute or torch.float32, settings.double_quant)
    return AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=config,
        device_map=models.device_map(device),
        use_safetensors=True,
    )


def run(ctx: Context, settings: QLoraSettings) -> StageResult:
    model_dir = ctx.latest_model()
    reference = ctx.reference  # every process: its first use synchronizes them
    source = models.resolve_source(str(model_dir), role="student")
    quality = {}
    if ctx.is_main:
        before = models.load_model(source)
        quality["student before"] = evaluate_torch(before, ctx.heldout, reference).as_dict()
        del before
    nf4 = _load_nf4(model_dir, settings, ctx.state.device)
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
