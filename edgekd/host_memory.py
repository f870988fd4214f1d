"""Peak resident memory of each stage on the host, estimated from model configs and settings alone.

Each stage's spec adds up the parts it holds at its peak from the functions here: the runtime, the
teacher, the held-out reference, the training step, and the copies a loader, an exporter or a
runtime makes. The parts were checked against peaks measured at Qwen2.5-0.5B/1.5B shapes on a CPU
(bench/real_size.py, docs/scale.md); an estimate, not a measurement.
"""

from __future__ import annotations

from edgekd import models, train_memory
from edgekd.config import Recipe, TrainSettings

GB = 1024**3
# A stage's process before any model: Python, torch, transformers, onnxruntime and a 150k-token
# tokenizer (measured).
RUNTIME_BYTES = 0.7 * GB


def reference_bytes(recipe: Recipe, vocab: int) -> float:
    """The teacher's held-out log-probs every stage scores against: fp32 over the whole vocabulary
    at each held-out position (the slice's sequences at max_seq_len at most)."""
    return 4.0 * recipe.data.max_heldout * recipe.data.max_seq_len * vocab


def common_bytes(recipe: Recipe, student_config) -> float:
    """What every stage holds: the runtime and the held-out reference."""
    return RUNTIME_BYTES + reference_bytes(recipe, student_config.vocab_size)


def train_step_bytes(
    student_config, teacher_config, recipe: Recipe, settings: TrainSettings
) -> float:
    """A full-parameter KD step on one host: student, gradients, AdamW, the teacher, activations
    and the loss's logits (train_memory.step_memory on one device)."""
    step = train_memory.step_memory(
        student_config,
        teacher_config,
        recipe.teacher,
        settings,
        recipe.data.max_seq_len,
        gpus=1,
        strategy="DDP",
    )
    return step.total


def teacher_bytes(teacher_config, recipe: Recipe) -> float:
    """The frozen teacher as it is held; 0 for a served one."""
    return train_memory.teacher_bytes(teacher_config, recipe.teacher)


def fp32_bytes(config) -> float:
    """A model's weights in fp32."""
    return 4.0 * models.param_count(config)


def nf4_bytes(config) -> float:
    """A model loaded in bitsandbytes NF4 for qlora on a CPU: the rest in fp32, its compute dtype
    there."""
    return train_memory.held_bytes(config, "4bit", "float32")
