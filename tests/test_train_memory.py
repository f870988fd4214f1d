"""The per-GPU training memory estimate: what each strategy shards, and the logits it holds."""

from pathlib import Path

import pytest
from transformers import AutoConfig

from edgekd import models
from edgekd.config import ScaleSettings, TeacherSettings, TrainSettings
from edgekd.train_memory import GB, estimate_lines, logits_bytes, step_memory

CONFIGS = Path(__file__).parent / "data" / "configs"


@pytest.fixture(scope="module")
def qwen():
    return tuple(
        AutoConfig.from_pretrained(CONFIGS / name)
        for name in ("qwen2.5-1.5b-instruct", "qwen2.5-7b-instruct")
    )


def _memory(qwen, gpus, strategy, teacher=None, **scale):
    student, teacher_config = qwen
    train = TrainSettings(batch_size=8, scale=ScaleSettings(**scale))
    teacher = teacher or TeacherSettings()
    return step_memory(student, teacher_config, teacher, train, 1024, gpus=gpus, strategy=strategy)


def test_sharding_by_strategy(qwen):
    params = models.param_count(qwen[0])
    ddp = _memory(qwen, 8, "DDP")
    assert (ddp.weights, ddp.grads, ddp.optimizer) == (4 * params, 4 * params, 8 * params)
    zero2 = _memory(qwen, 8, "ZeRO-2")
    assert (zero2.weights, zero2.grads, zero2.optimizer) == (4 * params, params / 2, params)
    fsdp = _memory(qwen, 8, "FSDP2")
    assert (fsdp.grads, fsdp.optimizer) == (params / 2, params)
    # The shard, plus the whole embedding/LM head (tied: one matrix) and one decoder layer.
    embed = 151936 * 1536
    layer = (params - embed) / 28
    assert fsdp.weights == pytest.approx(params / 2 + 4 * (embed + layer) * 7 / 8)
    assert _memory(qwen, 1, "FSDP2").total == _memory(qwen, 1, "DDP").total


def test_teacher_logits_and_activations(qwen):
    teacher_params = models.param_count(qwen[1])
    bf16 = TeacherSettings(dtype="bfloat16")
    assert _memory(qwen, 1, "DDP", bf16).teacher == 2 * teacher_params
    nf4 = TeacherSettings(load_in="4bit", dtype="bfloat16")
    # bitsandbytes leaves the embedding and the LM head (untied in the 7B) in the dtype.
    embeddings = 2 * 152064 * 3584
    nf4_bytes = 0.56 * (teacher_params - embeddings) + 2 * embeddings
    assert _memory(qwen, 1, "DDP", nf4).teacher == pytest.approx(nf4_bytes)
    assert _memory(qwen, 1, "DDP", nf4).teacher < 0.4 * _memory(qwen, 1, "DDP", bf16).teacher
    # 8 x 1024 positions of 151936 logits: the plain loss holds them all, the chunked one 1024.
    naive = _memory(qwen, 1, "DDP", loss_chunk_tokens=0).logits
    assert naive == logits_bytes(8 * 1024, 151936, mixed_precision=False)
    assert _memory(qwen, 1, "DDP", loss_chunk_tokens=1024).logits == naive / 8
    assert _memory(qwen, 8, "FSDP2", loss_chunk_tokens=1024).logits == naive / 8
    full = _memory(qwen, 1, "DDP").activations
    assert _memory(qwen, 1, "DDP", gradient_checkpointing=True).activations < full / 10
    assert _memory(qwen, 1, "DDP", mixed_precision="bf16").activations == full / 2


def test_lines_are_labelled_estimates_for_1_2_8_gpus(qwen):
    lines = estimate_lines("distill", *qwen, TeacherSettings(), TrainSettings(batch_size=8), 1024)
    assert "estimated" in lines[0]
    assert lines[1].split() == ["1", "GPU", "2", "GPUs", "8", "GPUs"]
    ddp = lines[2].split()
    assert ddp[0] == "DDP" and len(set(ddp[1:])) == 1  # DDP replicates: the same on every count
    gbs = [float(x.removesuffix("GB")) for x in lines[4].split()[-3:]]
    assert gbs[0] > gbs[1] > gbs[2] > 0
    assert "naive full logits would be" in lines[-1]
    assert _memory(qwen, 1, "DDP").total / GB == pytest.approx(float(ddp[1][:-2]), abs=0.06)


def test_an_8bit_optimizer_holds_a_quarter_of_adamw_states(qwen):
    student, teacher = qwen
    params = models.param_count(student)
    train = TrainSettings(optimizer="adamw_8bit")
    eight = step_memory(student, teacher, TeacherSettings(), train, 256, gpus=1, strategy="DDP")
    assert eight.optimizer == 2 * params
    assert _memory(qwen, 1, "DDP").optimizer == 4 * eight.optimizer
