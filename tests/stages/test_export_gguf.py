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


IMATRIX = ["export_gguf.imatrix=true", "export_gguf.imatrix_chunk_size=32"]


@pytest.mark.slow
def test_export_gguf_with_imatrix_records_how_it_was_made(run_copy, tiny_teacher_dir):
    import gguf

    from edgekd.formats import imatrix as imatrix_file

    run, data = run_copy
    recipe = fast_recipe(tiny_teacher_dir, data, [*NO_TRAINING, *IMATRIX])
    assert pipeline.build(load_profile("phone-1gb"), recipe, run, ["export_gguf"]) == {
        "export_gguf": "ran"
    }
    stage = run / "04-export-gguf"
    report = json.loads((stage / "report.json").read_text())
    method = report["method"]
    assert method["imatrix"] == "imatrix.gguf" and method["chunk_size"] == 32
    assert method["imatrix_made_by"] == "export_gguf (its input model)"
    # 2 layers x 7 weights, less the two attn_v that Q4_K_M makes Q8_0 (no weighted path there)
    assert method["chunks"] > 0 and method["tensors"]["imatrix"] == 2 * 7 - 2
    fields = gguf.GGUFReader(stage / "model-Q4_K_M.gguf").fields
    assert fields["quantize.imatrix.file"].contents() == "imatrix.gguf"
    assert fields["quantize.imatrix.chunks_count"].contents() == method["chunks"]
    assert "training split" in fields["quantize.imatrix.dataset"].contents()
    assert len(imatrix_file.read(stage / "imatrix.gguf").sums) == 2 * 7
    assert not list(stage.glob("plain-*"))
    manifest = json.loads((run / "manifest.json").read_text())
    assert "04-export-gguf/imatrix.gguf" in manifest["stages"]["export_gguf"]["artifacts"]
    q4 = LlamaCpp(stage / "model-Q4_K_M.gguf", threads=1)
    assert isinstance(q4.chat([[{"role": "user", "content": "hi"}]], max_tokens=4)[0], str)


@pytest.mark.slow
def test_an_imatrix_of_another_model_is_refused(run_copy, tiny_teacher_dir):
    from edgekd.errors import EdgekdError
    from edgekd.formats import imatrix as imatrix_file
    from edgekd.quant.imatrix import Imatrix

    run, data = run_copy
    other = Imatrix(chunk_count=1, chunk_size=32, datasets=["x"])
    import torch

    for name in ("blk.0.attn_q.weight", "blk.7.ffn_up.weight"):
        other.sums[name], other.counts[name] = torch.ones(128), 32
    imatrix_file.write(other, run / "01-distill" / imatrix_file.FILE)
    recipe = fast_recipe(tiny_teacher_dir, data, [*NO_TRAINING, *IMATRIX])
    with pytest.raises(EdgekdError, match="it was made for another model") as e:
        pipeline.build(load_profile("phone-1gb"), recipe, run, ["export_gguf"])
    assert "\n" not in str(e.value)
    assert not (run / "04-export-gguf").exists()
