"""The exports of the embedded default student (SmolLM2-135M pruned to 20 layers), end to end."""

import json

import pytest

from edgekd import pipeline
from edgekd.config import load_profile, load_recipe


@pytest.mark.slow
def test_embedded_default_student_exports_match_torch(tmp_path, chat_jsonl):
    recipe = load_recipe(
        None,
        [
            # One step, all warmup (lr 0): the exports of the pruned student as pruning made it,
            # whose held-out top tokens are clear of F16's rounding.
            "distill.max_steps=1",
            "distill.warmup_ratio=0.5",
            "distill.batch_size=2",
            "data.max_seq_len=64",
            "qlora.enabled=false",
            "qat_kd.enabled=false",
            "eval.sample_max_tokens=8",
        ],
        data=str(chat_jsonl),
    )
    profile = load_profile("phone-1gb")
    stages = ["distill", "export_gguf", "export_onnx"]
    assert pipeline.select_stages(None, profile, recipe) == [*stages, "bench"]
    pipeline.build(profile, recipe, tmp_path / "run", stages)
    distill = json.loads((tmp_path / "run" / "01-distill" / "report.json").read_text())
    assert distill["student"]["shape"] == {
        "layers": 20,
        "hidden": 576,
        "intermediate": 1536,
        "heads": 9,
    }
    gguf = json.loads((tmp_path / "run" / "04-export-gguf" / "report.json").read_text())
    assert gguf["tokenizer"]["mismatches"] == 0
    assert gguf["f16_vs_torch"]["kld"] < 1e-3 and gguf["f16_vs_torch"]["top1"] > 0.97
    onnx = json.loads((tmp_path / "run" / "05-export-onnx" / "report.json").read_text())
    assert onnx["fp32_vs_torch_max_abs_logit_diff"] < 1e-3
    q4 = gguf["quality"]["gguf Q4_K_M (llama.cpp)"]
    f16 = gguf["quality"]["gguf F16 (llama.cpp)"]
    assert f16["kld"] <= q4["kld"]
    assert gguf["sizes"]["model-Q4_K_M.gguf"] < 0.45 * gguf["sizes"]["model-F16.gguf"]
