import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from edgekd import pipeline
from edgekd.config import QLoraSettings, load_profile
from edgekd.stages.qlora import load_nf4
from tests.stages.conftest import fast_recipe


@pytest.mark.slow
def test_qlora_trains_adapters_on_nf4_and_merges(run_copy, tiny_teacher_dir):
    run, data = run_copy
    recipe = fast_recipe(tiny_teacher_dir, data)
    assert pipeline.build(load_profile("phone-1gb"), recipe, run, ["qlora"]) == {"qlora": "ran"}
    stage = run / "02-qlora"
    report = json.loads((stage / "report.json").read_text())
    assert list(report["quality"]) == ["student before", "nf4", "nf4 + lora", "merged"]
    assert report["lora"]["r"] == 4
    assert (stage / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(stage / "model")
    before = AutoModelForCausalLM.from_pretrained(run / "01-distill" / "model")
    # LoRA touched the linear layers only, and it did change them.
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], before.state_dict()[q])
    emb = "model.embed_tokens.weight"
    assert torch.equal(merged.state_dict()[emb], before.state_dict()[emb])
    assert not any("lora" in k for k in merged.state_dict())


def _lora_grads(model) -> dict[str, torch.Tensor]:
    lora = get_peft_model(
        model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    lora.train()
    ids = torch.arange(3, 19).reshape(2, 8)
    lora(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad}


def test_nf4_trains_the_same_after_an_evaluation(tiny_teacher_dir):
    """An eval pass must not switch bitsandbytes to its inference-only CPU kernel (no backward):
    the adapters of the lower layers would lose the gradient through the frozen weights."""
    settings = QLoraSettings()
    fresh = load_nf4(tiny_teacher_dir, settings, torch.device("cpu"))
    evaluated = load_nf4(tiny_teacher_dir, settings, torch.device("cpu"))
    # fp16 leftovers would send CPU matmuls to PyTorch's slow reference GEMM.
    assert {p.dtype for p in fresh.parameters() if p.is_floating_point()} == {torch.float32}
    evaluated.eval()
    with torch.no_grad():
        evaluated(input_ids=torch.arange(3, 11)[None])
    torch.manual_seed(0)
    want = _lora_grads(fresh)
    torch.manual_seed(0)
    got = _lora_grads(evaluated)
    assert want.keys() == got.keys()
    first = [n for n in want if ".layers.0." in n]
    assert first and all(want[n].abs().sum() > 0 for n in first)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)
