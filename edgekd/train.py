"""The KD training loop shared by the training stages, on Hugging Face accelerate.

It runs unchanged in one process, or under `accelerate launch` in several (DDP), and checkpoints
every `checkpoint_every` optimizer steps into the stage's work folder, so a killed build resumes
from its last checkpoint. The batch order is a pure function of (seed, step), which is what makes a
resumed run see the same batches it would have seen without the kill.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import get_cosine_schedule_with_warmup

from edgekd import atomic, models
from edgekd.config import TrainSettings
from edgekd.context import Context, on_gpu
from edgekd.data import collate
from edgekd.feature_kd import MethodLosses
from edgekd.losses import kd_loss, shift_for_next_token

CHECKPOINT = "checkpoint"


def batch_indices(
    n_examples: int, batch_size: int, seed: int, micro_step: int, rank: int, world: int
):
    """The example indices of one process's micro-batch: epoch-wise shuffles, sharded by rank."""
    per_epoch = n_examples // (batch_size * world)
    if per_epoch == 0:
        raise ValueError(
            f"{n_examples} training examples cannot fill one batch of {batch_size} per process "
            f"on {world} processes"
        )
    epoch, offset = divmod(micro_step, per_epoch)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch))
    start = (offset * world + rank) * batch_size
    return order[start : start + batch_size].tolist()


def _progress(name: str, enabled: bool) -> Progress:
    return Progress(
        TextColumn(f"[bold]{name}[/]"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tps]:.0f} tok/s"),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def train_kd(
    ctx: Context,
    student: torch.nn.Module,
    settings: TrainSettings,
    *,
    name: str,
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
) -> tuple[list[dict], dict]:
    """Train `student`'s trainable parameters in place against ctx.teacher.

    Returns the loss curve and a summary. The caller chooses what trains (requires_grad);
    `on_step(step, model)` runs in every process after each optimizer step."""
    set_seed(settings.seed)
    accelerator = Accelerator(gradient_accumulation_steps=settings.grad_accum, cpu=not on_gpu())
    examples = ctx.train_examples
    pad_id = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else 0
    methods = MethodLosses(settings, student.config, models.load_config(ctx.teacher_source))
    live = settings.alpha > 0 and settings.teacher_logits == "live"
    cache = ctx.logit_cache if settings.alpha > 0 and settings.teacher_logits == "cache" else None
    # With the cache and no feature, attention or relation term the teacher is never loaded here.
    teacher = ctx.teacher.to(accelerator.device) if live or methods.active else None
    student.train()
    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad] + list(methods.parameters()),
        lr=settings.lr,
        weight_decay=settings.weight_decay,
    )
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, math.ceil(settings.warmup_ratio * settings.max_steps), settings.max_steps
    )
    student, optimizer = accelerator.prepare(student, optimizer)
    extra_loss = accelerator.prepare(methods) if list(methods.parameters()) else methods
    methods.attach(accelerator.unwrap_model(student), teacher)
    accelerator.register_for_checkpointing(scheduler)

    ckpt = ctx.work_dir / CHECKPOINT
    step, curve = 0, []
    if (ckpt / "progress.json").exists():
        accelerator.load_state(str(ckpt))
        progress = json.loads((ckpt / "progress.json").read_text())
        step, curve = progress["step"], progress["curve"]
        accelerator.print(f"{name}: resuming from the checkpoint at step {step}")

    tokens_done, start = 0, time.perf_counter()
    window_loss = window_kd = window_ce = 0.0
    window_n, window_terms = 0, {}
    with _progress(name, accelerator.is_main_process) as bar:
        task = bar.add_task(name, total=settings.max_steps, completed=step, loss=0.0, tps=0.0)
        while step < settings.max_steps:
            for micro in range(settings.grad_accum):
                idx = batch_indices(
                    len(examples),
                    settings.batch_size,
                    settings.seed,
                    step * settings.grad_accum + micro,
                    accelerator.process_index,
                    accelerator.num_processes,
                )
                batch = {
                    k: v.to(accelerator.device)
                    for k, v in collate([examples[i] for i in idx], pad_id).items()
                }
                with accelerator.accumulate(student):
                    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
                    t_out = t_logits = None  # alpha=0 trains on hard labels alone
                    if teacher is not None:
                        with torch.no_grad():
                            t_out = teacher(**inputs, **methods.model_kwargs)
                    if live:
                        t_logits, _ = shift_for_next_token(t_out.logits, batch["labels"])
                    if cache is not None:
                        width = batch["input_ids"].shape[1]
                        t_logits = cache.teacher_logits(
                            idx, width, accelerator.device, settings.temperature
                        )
                    s_out = student(**inputs, **methods.model_kwargs)
                    s_logits, labels = shift_for_next_token(s_out.logits, batch["labels"])
                    out = kd_loss(
                        s_logits,
                        t_logits,
                        labels,
                        temperature=settings.temperature,
                        alpha=settings.alpha,
                        divergence=settings.divergence,
                        skew_alpha=settings.skew_alpha,
                        jsd_beta=settings.jsd_beta,
                    )
                    loss, terms = out.loss, {}
                    if methods.active:
                        extra, terms = extra_loss(
                            s_out.hidden_states,
                            t_out.hidden_states,
                            s_out.attentions,
                            t_out.attentions,
                            batch["attention_mask"],
                        )
                        loss = loss + extra
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(student.parameters(), settings.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                window_loss += loss.item()
                for k, v in terms.items():
                    window_terms[k] = window_terms.get(k, 0.0) + v
                window_kd += float(out.kd)
                window_ce += float(out.ce)
                window_n += 1
                tokens_done += int(batch["attention_mask"].sum()) * accelerator.num_processes
            scheduler.step()
            step += 1
            tps = tokens_done / (time.perf_counter() - start)
            if step % settings.log_every == 0 or step == settings.max_steps:
                curve.append(
                    {
                        "step": step,
                        "loss": window_loss / window_n,
                        "kd": window_kd / window_n,
                        "ce": window_ce / window_n,
                        "lr": scheduler.get_last_lr()[0],
                        "tokens_per_s": tps,
                    }
                    | {k: v / window_n for k, v in window_terms.items()}
                )
                window_loss = window_kd = window_ce = 0.0
                window_n, window_terms = 0, {}
            bar.update(task, completed=step, loss=curve[-1]["loss"] if curve else 0.0, tps=tps)
            if on_step is not None:
                on_step(step, accelerator.unwrap_model(student))
            if step % settings.checkpoint_every == 0 and step < settings.max_steps:
                _save_checkpoint(accelerator, ckpt, step, curve)
    accelerator.wait_for_everyone()
    methods.detach()
    seconds = time.perf_counter() - start
    unwrapped = accelerator.unwrap_model(student)
    unwrapped.eval()
    if accelerator.is_main_process:
        atomic.remove(ckpt)
    summary = {
        "steps": settings.max_steps,
        "processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "tokens_this_run": tokens_done,
        "seconds_this_run": round(seconds, 1),
        "tokens_per_s": round(tokens_done / seconds, 1) if seconds else None,
        "train_examples": len(examples),
    }
    return curve, summary


def save_curve(folder, curve: list[dict]) -> str:
    """Write the loss curve as JSON lines; returns the file name."""
    (folder / "loss_curve.jsonl").write_text("".join(json.dumps(row) + "\n" for row in curve))
    return "loss_curve.jsonl"


def _save_checkpoint(accelerator: Accelerator, ckpt, step: int, curve: list[dict]) -> None:
    tmp = ckpt.with_name(f".{ckpt.name}.tmp")
    if accelerator.is_main_process:
        atomic.remove(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "progress.json").write_text(json.dumps({"step": step, "curve": curve}))
        atomic.fsync_path(tmp)
        atomic.remove(ckpt)
        os.replace(tmp, ckpt)
    accelerator.wait_for_everyone()
