import json

import pytest

from edgekd import pipeline
from edgekd.config import load_profile
from edgekd.formats.llama_cpp import LlamaCpp
from tests.stages.conftest import fast_recipe

NO_TRAINING = ["qlora.enabled=false", "qat_kd.enabled=false"]


@pytest.mark.slow
def test_export_gguf_proves_parity_and_quality(run_copy, tiny_teacher_dir):
    run, data = run_copy
    recipe = fast_recipe(tiny_teacher_dir, data, NO_TRAINING)
    outcome = pipeline.build(load_profile("phone-1gb"), recipe, run, ["export_gguf"])
    assert outcome == {"export_gguf": "ran"}
    stage = run / "04-export-gguf"
    report = json.loads((stage / "report.json").read_text())
    assert report["tokenizer"]["mismatches"] == 0 and report["tokenizer"]["texts"] > 0
    assert report["f16_vs_torch"]["kld"] < 1e-3
    assert set(report["quality"]) == {"gguf F16 (llama.cpp)", "gguf Q4_K_M (llama.cpp)"}
    assert report["sizes"]["model-Q4_K_M.gguf"] < report["sizes"]["model-F16.gguf"]
    assert "llama-cli -m model-Q4_K_M.gguf" in (stage / "README.md").read_text()
    chat = [{"role": "user", "content": "hi"}]
    q4 = LlamaCpp(stage / "model-Q4_K_M.gguf", threads=1)
    assert isinstance(q4.chat([chat], max_tokens=4)[0], str)
    manifest = json.loads((run / "manifest.json").read_text())
    assert "04-export-gguf/model-Q4_K_M.gguf" in manifest["stages"]["export_gguf"]["artifacts"]


@pytest.mark.slow
def test_changed_export_setting_reruns_only_that_export(run_copy, tiny_teacher_dir):
    run, data = run_copy
    recipe = fast_recipe(tiny_teacher_dir, data, NO_TRAINING)
    profile = load_profile("phone-1gb")
    pipeline.build(profile, recipe, run, ["export_gguf"])
    changed = fast_recipe(tiny_teacher_dir, data, [*NO_TRAINING, "export_gguf.keep_f16=false"])
    assert pipeline.build(profile, changed, run, ["distill", "export_gguf"]) == {
        "distill": "up to date",
        "export_gguf": "ran",
    }
    assert not (run / "04-export-gguf" / "model-F16.gguf").exists()
