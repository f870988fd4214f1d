import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from edgekd import pipeline
from edgekd.config import load_profile
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
