"""The KD training loop shared by the training stages, on Hugging Face accelerate.

It runs unchanged in one process, or under `accelerate launch` in several (DDP, FSDP2 with the
student sharded, DeepSpeed ZeRO-2), and checkpoints every `checkpoint_every` optimizer steps into
the stage's work folder, so a killed build resumes from its last checkpoint. The batch order is a
pure function of (seed, step), which is what makes a resumed run see the same batches it would
have seen without the kill.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from edgekd import atomic, models, on_policy
from edgekd.chunked_kd import chunked_kd_loss, head_logits
from edgekd.config import TrainSettings
from edgekd.console import console
from edgekd.context import Context, on_gpu
from edgekd.data import collate, padding_id
from edgekd.errors import EdgekdError
from edgekd.feature_kd import MethodLosses
from edgekd.losses import IGNORE_INDEX, Divergence, KDLossOutput, kd_loss, shift_for_next_token
from edgekd.rundir import CHECKPOINT, PROGRESS

# Passed as logits_to_keep: the student's forward computes no logits, the chunked loss does.
_NO_LOGITS = torch.empty(0, dtype=torch.long)


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
        console=console,
        redirect_stderr=False,  # a library's stderr belongs to the stage's log, not the bar
        disable=not enabled,
    )


def kd_step_loss(
    student: torch.nn.Module,
    student_head: torch.nn.Module,
    teacher: torch.nn.Module | None,
    batch: dict,
    settings: TrainSettings,
    *,
    alpha: float,
    cached: torch.Tensor | None = None,
    methods: MethodLosses | None = None,
    extra_loss: torch.nn.Module | None = None,
) -> tuple[KDLossOutput, dict[str, float]]:
    """One micro-batch's loss: the KD loss with weight `alpha` on the divergence, on full logits
    (scale.loss_chunk_tokens=0) or chunked from the final hidden states and LM heads (`student`
    may be wrapped, e.g. by DDP; its head is given apart), plus the feature, attention and relation
    terms of `methods` (computed by `extra_loss`, the same module, maybe DDP-wrapped) when active.

    The teacher's logits come from `cached` ([B, L-1, V], aligned like shifted logits) when given,
    else from `teacher`. Returns the KD output (its loss includes the extra terms) and each extra
    term's value."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    kd_args = {
        "temperature": settings.kd.temperature,
        "alpha": alpha,
        "divergence": Divergence.of(settings.kd),
    }
    extra = methods is not None and methods.active
    wanted = methods.model_kwargs if extra else {}
    chunked = settings.scale.loss_chunk_tokens > 0
    live = alpha > 0 and cached is None
    t_out = None
    if live or extra:
        with torch.no_grad():
            # The chunked loss needs only the teacher's hidden states: its head runs per chunk.
            model = teacher.get_decoder() if chunked else teacher
            t_out = model(**inputs, **wanted)
    if chunked:
        s_out = student(
            **inputs, **(wanted | {"output_hidden_states": True}), logits_to_keep=_NO_LOGITS
        )
        s_hidden, labels = shift_for_next_token(s_out.hidden_states[-1], batch["labels"])
        kept = labels != IGNORE_INDEX
        t_logits = None
        if live:
            t_hidden, _ = shift_for_next_token(t_out.last_hidden_state, batch["labels"])
            t_head = teacher.get_output_embeddings()
            chunks = head_logits(t_hidden[kept], t_head.weight, t_head.bias)

            def t_logits(start: int, stop: int) -> torch.Tensor:
                return on_policy.teacher_targets(chunks(start, stop), settings)

        elif alpha > 0:
            rows = cached[kept]

            def t_logits(start: int, stop: int) -> torch.Tensor:
                return rows[start:stop]

        out = chunked_kd_loss(
            s_hidden,
            student_head.weight,
            student_head.bias,
            labels,
            t_logits,
            chunk_tokens=settings.scale.loss_chunk_tokens,
            **kd_args,
        )
    else:
        s_out = student(**inputs, **wanted)
        s_logits, labels = shift_for_next_token(s_out.logits, batch["labels"])
        t_logits = cached
        if live:
            t_logits = on_policy.teacher_targets(t_out.logits, settings)
            t_logits, _ = shift_for_next_token(t_logits, batch["labels"])
        out = kd_loss(s_logits, t_logits, labels, **kd_args)
    if not extra:
        return out, {}
    term_sum, terms = extra_loss(
        s_out.hidden_states,
        t_out.hidden_states,
        s_out.attentions,
        t_out.attentions,
        batch["attention_mask"],
    )
    return out._replace(loss=out.loss + term_sum), terms


def shards_weights(accelerator: Accelerator) -> bool:
    """Whether the prepared student's weights are sharded across processes (FSDP)."""
    return accelerator.distributed_type == DistributedType.FSDP


def full_state_dict(
    model: torch.nn.Module, names: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """A detached copy of `model`'s state dict (only `names` if given) with whole tensors, also
    when FSDP shards them (then every process must call it: gathering a shard is collective)."""
    state = model.state_dict()
    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in state.items()
        if names is None or k in names
    }


def check_strategy(
    name: str, settings: TrainSettings, *, fsdp_version: int | None, zero_stage: int | None
) -> None:
    """Refuse a launch setup stage `name` cannot train under (FSDP `fsdp_version`, DeepSpeed
    `zero_stage`; None when not in use), with what to launch instead."""
    if zero_stage == 3:
        # ZeRO-3 partitions the weights outside each module's forward and gathers them through
        # DeepSpeed's own context managers, which the stages do not call.
        raise EdgekdError(
            f"{name}: accelerate is set up for DeepSpeed ZeRO-3; edgekd shards the student's "
            "weights with FSDP2 instead: launch with configs/accelerate/fsdp.yaml (or ZeRO-2, "
            "deepspeed_zero2.yaml; see docs/scale.md)"
        )
    if fsdp_version is None:
        return
    if fsdp_version != 2:
        raise EdgekdError(
            f"{name}: accelerate is set up for FSDP version {fsdp_version}; edgekd needs "
            "fsdp_version: 2 (as in configs/accelerate/fsdp.yaml)"
        )
    if settings.on_policy.fraction > 0:
        # Each process samples a different number of tokens, but every forward of a sharded
        # model is collective: the processes would wait on each other forever.
        raise EdgekdError(
            f"{name}.on_policy.fraction={settings.on_policy.fraction}: on-policy KD samples "
            "from the student, which FSDP cannot do with different prompts per process; set "
            f"{name}.on_policy.fraction=0 or launch with DDP (configs/accelerate/ddp.yaml)"
        )


def _shard_tied_embeddings(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Put a tied embedding and LM head in one FSDP unit before accelerate shards the rest.

    accelerate groups them only when both modules' `.weight` is the same tensor; qat_kd's fake
    quantization makes `.weight` a new tensor at each read, so it would shard the one parameter
    they share in two units, which torch refuses. Kept whole after the forward, as accelerate
    keeps the LM head's unit, for the chunked loss."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or not {id(p) for p in embed.parameters()} & {id(p) for p in head.parameters()}:
        return
    plugin = accelerator.state.fsdp_plugin
    fully_shard(
        [embed, head],
        reshard_after_forward=False,
        mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        offload_policy=plugin.cpu_offload,
    )


def _accelerator(settings: TrainSettings, name: str) -> Accelerator:
    if settings.scale.mixed_precision == "fp16" and not on_gpu():
        raise EdgekdError(
            f"{name}.scale.mixed_precision=fp16 needs a CUDA GPU and none is visible; "
            "use bf16 or no"
        )
    accelerator = Accelerator(
        gradient_accumulation_steps=settings.grad_accum,
        cpu=not on_gpu(),
        mixed_precision=settings.scale.mixed_precision,
    )
    plugin = accelerator.state.deepspeed_plugin
    check_strategy(
        name,
        settings,
        fsdp_version=accelerator.state.fsdp_plugin.fsdp_version
        if shards_weights(accelerator)
        else None,
        zero_stage=plugin.zero_stage if plugin is not None else None,
    )
    return accelerator


def make_optimizer(params: list[torch.nn.Parameter], settings: TrainSettings):
    """AdamW over `params`, in fp32 states or bitsandbytes' 8-bit blockwise ones."""
    if settings.optimizer == "adamw_8bit":
        from bitsandbytes.optim import AdamW8bit

        return AdamW8bit(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


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
    accelerator = _accelerator(settings, name)
    examples = ctx.train_examples
    pad_id = padding_id(ctx.tokenizer)
    # A served teacher has no config here and trains from the cache only (preflight refuses
    # the layer-matching methods with it); the student's config stands in.
    served = ctx.teacher_source.kind == "served"
    teacher_config = student.config if served else models.load_config(ctx.teacher_source)
    methods = MethodLosses(settings, student.config, teacher_config)
    from_cache = settings.teacher_logits == "cache" or served
    cache = ctx.logit_cache if settings.kd.alpha > 0 and from_cache else None
    teacher = None
    # With the cache and no feature, attention or relation term the teacher is never loaded here.
    if (cache is None and not served) or methods.active:
        teacher = on_policy.training_teacher(lambda: ctx.teacher, student, settings)
        if not getattr(teacher, "is_quantized", False):  # bitsandbytes loaded it on its device
            teacher = teacher.to(accelerator.device)
    plain = student
    if shards_weights(accelerator):
        # FSDP turns the module it prepares into a sharded one in place; the caller's student
        # stays whole and gets the trained weights at the end.
        student = copy.deepcopy(student)
        _shard_tied_embeddings(accelerator, student)
    if settings.scale.gradient_checkpointing:
        student.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    student.train()
    # kd_step_loss reads its weight after the forward: under FSDP that is when the root module
    # (which holds the head) has its whole weights registered.
    student_head = student.get_output_embeddings()
    optimizer = make_optimizer(
        [p for p in student.parameters() if p.requires_grad] + list(methods.parameters()),
        settings,
    )
    warmup = math.ceil(settings.warmup_ratio * settings.max_steps)
    if settings.lr_schedule == "constant":
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    else:
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, settings.max_steps)
    if (ds := accelerator.state.deepspeed_plugin) is not None:
        # accelerate sizes DeepSpeed's batch from a dataloader, and edgekd batches itself; the
        # recipe's clipping wins over the config's, as its precision does.
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = settings.batch_size
        ds.deepspeed_config["gradient_clipping"] = settings.max_grad_norm
    student, optimizer = accelerator.prepare(student, optimizer)
    extra_loss = accelerator.prepare(methods) if list(methods.parameters()) else methods
    methods.attach(accelerator.unwrap_model(student), teacher)
    accelerator.register_for_checkpointing(scheduler)

    ckpt = ctx.work_dir / CHECKPOINT
    step, curve = 0, []
    if (progress := _resumable(accelerator, ckpt, ctx.stage_key, name)) is not None:
        accelerator.load_state(str(ckpt))
        step, curve = progress["step"], progress["curve"]
        accelerator.print(f"{name}: resuming from the checkpoint at step {step}")
    checkpoint_step = step
    # Under fp16's loss scaling a non-finite gradient is an overflow the scaler skips the step for
    # (and lowers its scale); DeepSpeed clips inside its own step and reports a stale norm here.
    check_norm = accelerator.scaler is None and (
        accelerator.distributed_type != DistributedType.DEEPSPEED
    )

    tokens_done, sampled_batches, start = 0, 0, time.perf_counter()
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
                try:
                    chosen, sampled = on_policy.training_examples(
                        [examples[i] for i in idx],
                        settings,
                        student=accelerator.unwrap_model(student),
                        teacher=teacher,
                        micro_step=step * settings.grad_accum + micro,
                        max_len=ctx.recipe.data.max_seq_len,
                        pad_id=pad_id,
                    )
                except FloatingPointError:
                    raise _diverged(
                        name, settings, step + 1, "sampled model's logits", math.nan,
                        first=step == 0 and micro == 0, checkpoint=checkpoint_step,
                    ) from None  # fmt: skip
                # Sampled answers are scored by the divergence alone (see edgekd.on_policy).
                alpha = 1.0 if sampled else settings.kd.alpha
                sampled_batches += sampled
                batch = {k: v.to(accelerator.device) for k, v in collate(chosen, pad_id).items()}
                with accelerator.accumulate(student):
                    cached = None
                    if cache is not None and alpha > 0:
                        cached = cache.teacher_logits(
                            idx, batch["input_ids"].shape[1], accelerator.device,
                            settings.kd.temperature,
                        )  # fmt: skip
                    with accelerator.autocast():
                        out, terms = kd_step_loss(
                            student,
                            student_head,
                            teacher,
                            batch,
                            settings,
                            alpha=alpha,
                            cached=cached,
                            methods=methods,
                            extra_loss=extra_loss,
                        )
                    accelerator.backward(out.loss)
                    grad_norm = None
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(
                            student.parameters(), settings.max_grad_norm
                        )
                    try:
                        optimizer.step()
                    except RuntimeError as err:
                        # torch's float32 scalars overflow on an update (lr / bias correction,
                        # lr * weight_decay) before any tensor turns non-finite.
                        if "without overflow" not in str(err):
                            raise
                        raise _diverged(
                            name, settings, step + 1, "optimizer update", math.inf,
                            first=False, checkpoint=checkpoint_step,
                        ) from None  # fmt: skip
                    optimizer.zero_grad()
                loss, norm = _host_values(out.loss, grad_norm if check_norm else None)
                if not (math.isfinite(loss) and math.isfinite(norm)):
                    # The step is applied, but only in memory: the stage stops before any save.
                    what, value = (
                        ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
                    )
                    raise _diverged(
                        name, settings, step + 1, what, value,
                        first=step == 0 and micro == 0, checkpoint=checkpoint_step,
                    )  # fmt: skip
                window_loss += loss
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
                if not bar.console.is_terminal and accelerator.is_main_process:
                    # No live bar in a log file or CI: one line per logging window instead.
                    last = curve[-1]
                    print(
                        f"{name}: step {step}/{settings.max_steps} loss {last['loss']:.4f} "
                        f"{tps:.0f} tok/s",
                        flush=True,
                    )
            bar.update(task, completed=step, loss=curve[-1]["loss"] if curve else 0.0, tps=tps)
            if on_step is not None:
                on_step(step, accelerator.unwrap_model(student))
            if step % settings.checkpoint_every == 0 and step < settings.max_steps:
                _save_checkpoint(accelerator, ckpt, step, curve, ctx.stage_key)
                checkpoint_step = step
    accelerator.wait_for_everyone()
    methods.detach()
    seconds = time.perf_counter() - start
    if shards_weights(accelerator):
        # Only what trained comes back: a frozen 4-bit base (qlora) stays as it was loaded.
        names = [n for n, p in plain.named_parameters() if p.requires_grad]
        gathered = full_state_dict(accelerator.unwrap_model(student), names)  # every process
        with torch.no_grad():
            for name in names:
                plain.get_parameter(name).copy_(gathered[name])
        del gathered
    plain.eval()
    if accelerator.is_main_process:
        atomic.remove(ckpt)
    summary = {
        "steps": settings.max_steps,
        "processes": accelerator.num_processes,
        "distributed": accelerator.distributed_type.value,
        "device": str(accelerator.device),
        "tokens_this_run": tokens_done,
        "seconds_this_run": round(seconds, 1),
        "tokens_per_s": round(tokens_done / seconds, 1) if seconds else None,
        "train_examples": len(examples),
        "sampled_batches_this_run": sampled_batches,
    }
    return curve, summary


def _host_values(loss: torch.Tensor, grad_norm: torch.Tensor | None) -> tuple[float, float]:
    """The micro-batch's loss and the clipped gradient's norm (0 when not given) as floats, in
    the one device sync the loss's logging already costs."""
    if grad_norm is None:
        return loss.item(), 0.0
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    value, norm = torch.stack([loss.detach().float(), grad_norm.float().to(loss.device)]).tolist()
    return value, norm


def _diverged(
    name: str,
    settings: TrainSettings,
    step: int,
    what: str,
    value: float,
    *,
    first: bool,
    checkpoint: int,
) -> EdgekdError:
    """The one line for `what` (the loss, the gradient norm...) NaN or infinite at `step`."""
    kept = f"the checkpoint of step {checkpoint} is kept" if checkpoint else "no checkpoint yet"
    if first:
        # No update has happened yet: the learning rate cannot be the cause.
        advice = (
            "no update had happened yet, so the starting student, the teacher or the data give "
            f"non-finite values: check their weights and {name}.kd.temperature "
            f"({settings.kd.temperature:g})"
        )
    else:
        advice = f"lower {name}.lr ({settings.lr:g})"
        if settings.scale.mixed_precision == "fp16":
            advice += f" or set {name}.scale.mixed_precision=bf16 (fp16 overflows)"
        advice += " and rerun"
    return EdgekdError(
        f"{name}: the {what} became {value} at step {step} of {settings.max_steps}; "
        f"training stopped, nothing saved or marked done ({kept}): {advice}"
    )


def save_curve(folder, curve: list[dict]) -> str:
    """Write the loss curve as JSON lines; returns the file name."""
    (folder / "loss_curve.jsonl").write_text("".join(json.dumps(row) + "\n" for row in curve))
    return "loss_curve.jsonl"


def _resumable(accelerator: Accelerator, ckpt, key: str | None, name: str) -> dict | None:
    """The checkpoint's progress if it was made by this stage with these settings (its key);
    None, saying why, for any other: another build's checkpoint is never resumed."""
    try:
        progress = json.loads((ckpt / PROGRESS).read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        progress = None
    if isinstance(progress, dict) and progress.get("key") == key:
        return progress
    held = progress.get("key") if isinstance(progress, dict) else None
    accelerator.print(
        f"{name}: the checkpoint in {ckpt} was made with other settings (key "
        f"{str(held)[:12]}, this stage's {str(key)[:12]}); not resumed: training starts from "
        "step 0"
    )
    return None


def _save_checkpoint(
    accelerator: Accelerator, ckpt, step: int, curve: list[dict], key: str | None
) -> None:
    tmp = ckpt.with_name(f".{ckpt.name}.tmp")
    if accelerator.is_main_process:
        atomic.remove(tmp)
        # Made before the barrier: under FSDP every process writes its shard into it, and
        # accelerate creates the folder in the main process only.
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / PROGRESS).write_text(json.dumps({"step": step, "curve": curve, "key": key}))
        atomic.fsync_path(tmp)
        atomic.remove(ckpt)
        os.replace(tmp, ckpt)
    accelerator.wait_for_everyone()
