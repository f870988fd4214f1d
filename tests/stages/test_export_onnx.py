import json

import pytest

from edgekd import pipeline
from edgekd.config import load_profile
from tests.stages.conftest import fast_recipe


@pytest.mark.slow
def test_export_onnx_proves_parity_and_writes_every_format(run_copy, tiny_teacher_dir):
    run, data = run_copy
    recipe = fast_recipe(
        tiny_teacher_dir, data, ["qlora.enabled=false", "qat_kd.enabled=false",
                                 "export_onnx.quant=[int4, int8]"]
    )  # fmt: skip
    outcome = pipeline.build(load_profile("phone-1gb"), recipe, run, ["export_onnx"])
    assert outcome == {"export_onnx": "ran"}
    stage = run / "05-export-onnx"
    report = json.loads((stage / "report.json").read_text())
    assert report["fp32_vs_torch_max_abs_logit_diff"] < 1e-3
    assert set(report["quality"]) == {
        "onnx fp32 (onnxruntime)",
        "onnx int4 (onnxruntime)",
        "onnx int8 (onnxruntime)",
    }
    # On this barely trained tiny student 4-bit noise can land either side of fp32's kld to the
    # teacher; it must move it, and not far.
    fp32, int4 = (report["quality"][f"onnx {k} (onnxruntime)"]["kld"] for k in ("fp32", "int4"))
    assert fp32 != int4 and abs(int4 - fp32) < 0.05
    assert report["method"]["int4"].startswith("onnxruntime MatMulNBits rtn_asym, block 32")
    assert set(report["samples"]) == {"prompt", "fp32", "int4", "int8", "genai-int4"}
    assert (stage / "genai-int4" / "genai_config.json").exists()
    assert (stage / "int4" / "model.onnx").exists()
    assert "onnxruntime_genai" in (stage / "README.md").read_text()
