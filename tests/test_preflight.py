"""Settings the host, the build or the data cannot honour are refused before work, in one line."""

import json
from pathlib import Path

import pytest
import torch

from edgekd.config import load_profile, load_recipe
from edgekd.errors import EdgekdError
from edgekd.plan import make_plan
from edgekd.preflight import check_data, check_launch, check_scale

CONFIGS = Path(__file__).parent / "data" / "configs"
QWEN = [f"teacher.source={CONFIGS / 'qwen2.5-7b-instruct'}"]
STUDENT = [f"student.source={CONFIGS / 'qwen2.5-1.5b-instruct'}"]
STAGES = ["distill", "qlora", "qat_kd"]


def _check(sets, stages=STAGES):
    recipe = load_recipe(None, sets)
    check_scale(recipe, make_plan(load_profile("phone-4gb"), recipe, stages, timing=False))


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed where CUDA is")
def test_fp16_needs_cuda():
    with pytest.raises(EdgekdError, match=r"distill.scale.mixed_precision=fp16 needs a CUDA GPU"):
        _check([*QWEN, *STUDENT, *(f"{s}.scale.mixed_precision=fp16" for s in STAGES)])


def test_one_precision_per_build():
    with pytest.raises(
        EdgekdError, match="distill.scale.mixed_precision=bf16, qlora.scale.mixed_precision=no"
    ):
        _check([*QWEN, *STUDENT, "distill.scale.mixed_precision=bf16"])
    _check([*QWEN, *STUDENT, *(f"{s}.scale.mixed_precision=bf16" for s in STAGES)])
    _check([*QWEN, *STUDENT, "distill.scale.mixed_precision=bf16"], stages=["distill"])


def test_quantized_teacher_needs_a_given_student():
    with pytest.raises(EdgekdError, match="pruned from a quantized teacher"):
        _check([*QWEN, "teacher.load_in=4bit"])
    _check([*QWEN, *STUDENT, "teacher.load_in=8bit"])


@pytest.mark.slow
def test_quantized_teacher_cannot_be_a_gguf():
    with pytest.raises(EdgekdError, match="teacher.load_in=4bit needs a Hugging Face model"):
        recipe = load_recipe(None, ["teacher.load_in=4bit"])  # the embedded GGUF teacher
        check_scale(recipe, make_plan(load_profile("phone-1gb"), recipe, STAGES, timing=False))


def test_launch_setups_edgekd_cannot_train_under():
    """What `accelerate launch` puts in the environment for FSDP and DeepSpeed configs."""
    sets = [*QWEN, *STUDENT]
    recipe = load_recipe(None, sets)
    plan = make_plan(load_profile("phone-4gb"), recipe, STAGES, timing=False)
    fsdp2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    zero = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
    for ok in ({}, fsdp2, zero):
        check_launch(recipe, plan, ok)
    with pytest.raises(EdgekdError, match="distill: .*ZeRO-3; .*configs/accelerate/fsdp.yaml"):
        check_launch(recipe, plan, zero | {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    with pytest.raises(EdgekdError, match="FSDP version 1; edgekd needs fsdp_version: 2"):
        check_launch(recipe, plan, fsdp2 | {"FSDP_VERSION": "1"})
    on_policy = load_recipe(None, [*sets, "qlora.on_policy.fraction=0.5"])
    with pytest.raises(EdgekdError, match="qlora.on_policy.fraction=0.5: .* launch with DDP"):
        check_launch(on_policy, plan, fsdp2)
    check_launch(on_policy, plan, {})


def test_cot_and_regenerate_on_user_data(chat_jsonl):
    with pytest.raises(EdgekdError, match="data.cot.enabled=true .* set data.regenerate=true"):
        check_data(load_recipe(None, ["data.cot.enabled=true"], data=str(chat_jsonl)))
    check_data(
        load_recipe(None, ["data.cot.enabled=true", "data.regenerate=true"], data=str(chat_jsonl))
    )
    rows = chat_jsonl.read_text().splitlines()
    rows[3] = json.dumps({"text": "plain text"})
    chat_jsonl.write_text("\n".join(rows) + "\n")
    with pytest.raises(EdgekdError, match="row 4 is not one user turn"):
        check_data(load_recipe(None, ["data.regenerate=true"], data=str(chat_jsonl)))
