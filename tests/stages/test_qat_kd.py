import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from edgekd import pipeline
from edgekd.config import load_profile, load_recipe
from edgekd.errors import EdgekdError
from edgekd.plan import make_plan
from edgekd.quant.gguf_k import fake_quantize
from edgekd.stages.qat_kd import attach_fake_quant, check, detach_fake_quant, requantize
from tests.stages.conftest import fast_recipe


def test_check_refuses_an_export_other_than_q4_k_m(tiny_teacher_dir):
    profile = load_profile("phone-1gb")
    recipe = load_recipe(None, ["export_gguf.quant=Q8_0"], str(tiny_teacher_dir))
    with pytest.raises(EdgekdError, match="this build exports Q8_0"):
        check(make_plan(profile, recipe, ["qat_kd"], timing=False), None)
    check(
        make_plan(profile, load_recipe(None, [], str(tiny_teacher_dir)), ["qat_kd"], timing=False),
        None,
    )


def test_fake_quant_parametrization_round_trip(tiny_teacher_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    types = attach_fake_quant(model)
    q = model.model.layers[0].self_attn.q_proj
    want = fake_quantize(plain["model.layers.0.self_attn.q_proj.weight"], types[
        "model.layers.0.self_attn.q_proj.weight"])  # fmt: skip
    assert torch.equal(q.weight, want)
    # Tied output projection sees the quantized embedding too, and they stay one tensor.
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert not torch.equal(model.lm_head.weight, plain["model.embed_tokens.weight"])
    detach_fake_quant(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, plain[k]), k
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_training_keeps_the_quantized_values_until_requantize(tiny_teacher_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    kind = attach_fake_quant(model)["model.layers.0.self_attn.q_proj.weight"]
    q = model.model.layers[0].self_attn.q_proj
    raw = q.parametrizations.weight.original
    model.train()
    first = q.weight.detach().clone()
    with torch.no_grad():
        raw.add_(0.05 * torch.randn_like(raw))  # far across rounding boundaries
    moved = fake_quantize(raw.detach(), kind)
    assert torch.equal(q.weight, first) and not torch.equal(first, moved)
    # Gradients still pass straight to the float weights.
    q.weight.sum().backward()
    assert torch.equal(raw.grad, torch.ones_like(raw))
    requantize(model)
    assert torch.equal(q.weight, moved)
    with torch.no_grad():
        raw.add_(0.05 * torch.randn_like(raw))
    model.eval()  # a held-out check always sees the current weights quantized
    assert torch.equal(q.weight, fake_quantize(raw.detach(), kind))


@pytest.mark.slow
def test_qat_kd_measures_recovery_in_llama_cpp(run_copy, tiny_teacher_dir):
    run, data = run_copy
    recipe = fast_recipe(tiny_teacher_dir, data, ["qlora.enabled=false"])
    assert pipeline.build(load_profile("phone-1gb"), recipe, run, ["qat_kd"]) == {"qat_kd": "ran"}
    report = json.loads((run / "03-qat-kd" / "report.json").read_text())
    assert list(report["quality"]) == [
        "student before",
        "fake Q4_K_M before",
        "fake Q4_K_M after",
        "student after",
    ]
    rec = report["recovery"]
    if rec["gap_before"] > 0:
        assert rec["recovered"] == pytest.approx(1 - rec["gap_after"] / rec["gap_before"])
    else:  # hidden 64 exports as Q5_0/Q8_0, whose loss can be below measurement: none to recover
        assert rec["recovered"] is None and abs(rec["gap_before"]) < 1e-3
    assert rec["gap_after"] == pytest.approx(rec["kld_q4_k_m_after"] - rec["kld_full_precision"])
    own = rec["kld_q4_k_m_after"] - report["quality"]["student after"]["kld"]
    assert rec["gap_after_own_weights"] == pytest.approx(own)
    assert report["types"]["Q5_0"] > 0  # hidden 64: rows fall back from Q4_K to Q5_0
    assert 0 <= report["best_step"] <= 4


@pytest.mark.slow
def test_qat_kd_trains_against_the_exports_imatrix(run_copy, tiny_teacher_dir):
    """qat_kd computes the imatrix of its incoming student, trains against the weighted search,
    leaves the file beside its model, and export_gguf quantizes with that same file."""
    run, data = run_copy
    extra = ["qlora.enabled=false", "export_gguf.imatrix=true", "export_gguf.imatrix_chunk_size=32"]
    recipe = fast_recipe(tiny_teacher_dir, data, extra)
    built = pipeline.build(load_profile("phone-1gb"), recipe, run, ["qat_kd", "export_gguf"])
    assert built == {"qat_kd": "ran", "export_gguf": "ran"}
    qat = json.loads((run / "03-qat-kd" / "report.json").read_text())
    assert qat["fake_quantizer"] == "llama.cpp's imatrix-weighted search"
    assert (run / "03-qat-kd" / "imatrix.gguf").is_file()
    export = json.loads((run / "04-export-gguf" / "report.json").read_text())
    assert export["method"]["imatrix_made_by"] == "the training stage before (its input model)"
    same = (run / "03-qat-kd" / "imatrix.gguf").read_bytes()
    assert (run / "04-export-gguf" / "imatrix.gguf").read_bytes() == same
