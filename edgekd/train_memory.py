"""Per-GPU memory of a KD training step, estimated from model configs and settings alone.

An estimate, for planning: it counts the big tensors (weights, gradients, AdamW states, the
teacher, activations, the logits) and leaves out allocator fragmentation, CUDA context and
communication buffers, which add a few GB in practice.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgekd import models
from edgekd.config import TeacherSettings, TrainSettings

GB = 1024**3
STRATEGIES = ("DDP", "ZeRO-2", "FSDP2")
# Bytes per teacher parameter as it is held: NF4 adds a scale per 64 weights (~0.5 bit).
_TEACHER_BYTES = {"4bit": 0.56, "8bit": 1.0, "float32": 4.0, "bfloat16": 2.0, "float16": 2.0}
# Activations kept for backward per token and layer, in units of hidden-size 16-bit values
# (Korthikanti et al. 2022, with flash attention: no sequence-squared term).
_ACTIVATION_UNITS = 34
# AdamW's two moments per parameter: fp32, or bitsandbytes' 8-bit blocks (a scale per 256).
OPTIMIZER_BYTES = {"adamw": 8, "adamw_8bit": 2}


@dataclass(frozen=True)
class StepMemory:
    """Bytes per GPU of each part of a training step."""

    weights: float
    grads: float
    optimizer: float
    teacher: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return (
            self.weights
            + self.grads
            + self.optimizer
            + self.teacher
            + self.activations
            + self.logits
        )


def logits_bytes(tokens: int, vocab: int, mixed_precision: bool) -> float:
    """Both models' logits over `tokens` positions and the fp32 tensors the KD loss makes of them:
    the upcasts of both, the log-softmaxes, the teacher's probabilities and the gradient."""
    raw = 2 if mixed_precision else 4
    return tokens * vocab * (2 * raw + 4 * 4)


def step_memory(
    student_config,
    teacher_config,
    teacher: TeacherSettings,
    settings: TrainSettings,
    seq_len: int,
    *,
    gpus: int,
    strategy: str,
) -> StepMemory:
    """Per-GPU bytes of one training step of `settings` with `gpus` GPUs under `strategy`.

    The student is held in fp32 (master weights) with fp32 gradients and AdamW's two states (fp32,
    or 8-bit);
    ZeRO-2 shards gradients and states, FSDP2 also the weights, of which it holds whole one
    decoder layer at a time and the embedding and LM head through the step (the chunked loss reads
    the head); the frozen teacher is replicated on every GPU; activations and logits are per
    micro-batch.
    """
    params = models.param_count(student_config)
    shard = {"DDP": (1, 1, 1), "ZeRO-2": (1, gpus, gpus), "FSDP2": (gpus, gpus, gpus)}
    w_div, g_div, o_div = shard[strategy]
    hidden, layers = student_config.hidden_size, student_config.num_hidden_layers
    embeddings = student_config.vocab_size * hidden
    embeddings *= 1 if student_config.tie_word_embeddings else 2
    gathered = 0.0
    if strategy == "FSDP2" and gpus > 1:
        gathered = 4 * (embeddings + (params - embeddings) / layers) * (1 - 1 / gpus)
    tokens = settings.batch_size * seq_len
    act = 2 if settings.scale.mixed_precision != "no" else 4
    per_layer = tokens * hidden * act * _ACTIVATION_UNITS / 2
    if settings.scale.gradient_checkpointing:
        # Each layer's input is kept; one layer's activations are rebuilt at a time.
        activations = tokens * hidden * act * layers + per_layer
    else:
        activations = per_layer * layers
    rows = (
        min(tokens, settings.scale.loss_chunk_tokens)
        if settings.scale.loss_chunk_tokens
        else tokens
    )
    return StepMemory(
        weights=4 * params / w_div + gathered,
        grads=4 * params / g_div,
        optimizer=OPTIMIZER_BYTES[settings.optimizer] * params / o_div,
        teacher=teacher_bytes(teacher_config, teacher),
        activations=activations,
        logits=logits_bytes(
            rows, student_config.vocab_size, settings.scale.mixed_precision != "no"
        ),
    )


def estimate_lines(
    stage: str,
    student_config,
    teacher_config,
    teacher: TeacherSettings,
    settings: TrainSettings,
    seq_len: int,
    gpus: tuple[int, ...] = (1, 2, 8),
) -> list[str]:
    """The dry-run's table: per-GPU GB by strategy and GPU count, and the parts of one."""
    head = "".join(f"{f'{n} GPU' + ('s' if n > 1 else ''):>10}" for n in gpus)
    lines = [
        f"memory    {stage} per GPU, estimated (micro-batch {settings.batch_size} x {seq_len} "
        f"tokens, mixed_precision={settings.scale.mixed_precision}, gradient_checkpointing="
        f"{settings.scale.gradient_checkpointing}, teacher {teacher.load_in}/{teacher.dtype}):",
        f"          {'':16}{head}",
    ]

    def memory(n: int, strategy: str) -> StepMemory:
        return step_memory(
            student_config, teacher_config, teacher, settings, seq_len, gpus=n, strategy=strategy
        )

    for strategy in STRATEGIES:
        cells = "".join(f"{memory(n, strategy).total / GB:>8.1f}GB" for n in gpus)
        lines.append(f"          {strategy:16}{cells}")
    one = memory(1, "DDP")
    naive = logits_bytes(
        settings.batch_size * seq_len,
        student_config.vocab_size,
        settings.scale.mixed_precision != "no",
    )
    chunk = (
        f"chunked ({settings.scale.loss_chunk_tokens} tokens)"
        if settings.scale.loss_chunk_tokens
        else ""
    )
    lines.append(
        f"          1 GPU: student weights {one.weights / GB:.1f}, grads {one.grads / GB:.1f}, "
        f"AdamW {one.optimizer / GB:.1f}, teacher {one.teacher / GB:.1f}, activations "
        f"{one.activations / GB:.1f}, logits {one.logits / GB:.1f} GB "
        f"{chunk or 'naive (loss_chunk_tokens=0)'}; naive full logits would be {naive / GB:.1f} GB"
    )
    return lines


def embedding_params(config) -> int:
    """The input embedding and the LM head (one matrix when tied)."""
    return config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)


def held_bytes(config, load_in: str, dtype: str) -> float:
    """A model as it is held: all in `dtype`, or bitsandbytes' 4/8-bit decoder linears with the
    embedding and LM head (which it leaves unquantized) in `dtype`."""
    params = models.param_count(config)
    if load_in == "full":
        return _TEACHER_BYTES[dtype] * params
    embeddings = embedding_params(config)
    return _TEACHER_BYTES[load_in] * (params - embeddings) + _TEACHER_BYTES[dtype] * embeddings


def teacher_bytes(teacher_config, teacher: TeacherSettings) -> float:
    """The frozen teacher as it is held; 0 for a served one (not on this machine)."""
    if teacher_config is None:
        return 0.0
    return held_bytes(teacher_config, teacher.load_in, teacher.dtype)
