"""The stage registry: one ordered tuple of specs, stable folder names, a Recipe section each."""

import pytest

from edgekd import stages
from edgekd.config import Recipe
from edgekd.stages import export_gguf, export_onnx
from edgekd.stages.spec import StageSpec

# Run folders of earlier builds carry these names: they never change.
SHIPPED = {
    "distill": "01-distill",
    "qlora": "02-qlora",
    "qat_kd": "03-qat-kd",
    "export_gguf": "04-export-gguf",
    "export_onnx": "05-export-onnx",
    "bench": "06-bench",
}


def test_folders_are_stable_and_in_build_order():
    assert {name: stages.get(name).folder for name in SHIPPED} == SHIPPED
    # A stage inserted later takes the next free number, wherever it runs.
    numbers = [spec.folder[:2] for spec in stages.SPECS]
    assert len(set(numbers)) == len(numbers)
    assert len(set(stages.NAMES)) == len(stages.SPECS)


def test_each_stage_has_its_recipe_section_and_exports_a_profile_format():
    formats = {"gguf", "onnx"}  # what shipped profiles ask for
    assert formats <= set(stages.FORMATS)
    for spec in stages.SPECS:
        assert Recipe.model_fields[spec.name].annotation is spec.settings, spec.name
        assert all(name in Recipe.model_fields for name in spec.keyed_with)
        if spec.kind == "export":
            assert spec.produces in formats and spec.main_only


def test_a_spec_refuses_an_unnumbered_folder_and_an_export_without_outputs():
    base = dict(settings=Recipe, produces="gguf", disk_bytes=lambda s: 0, run=lambda c, s: None)
    base["host_bytes"] = base["disk_bytes"]
    with pytest.raises(ValueError, match="'NN-name'"):
        StageSpec(name="x", kind="train", folder="x", **base)
    with pytest.raises(ValueError, match="its format and its outputs"):
        StageSpec(name="x", kind="export", folder="07-x", **base)


def test_exports_list_what_bench_measures(tmp_path):
    for name in ("model-F16.gguf", "model-Q4_K_M.gguf", "README.md"):
        (tmp_path / name).write_bytes(b"")
    found = export_gguf.outputs(tmp_path, {"quant": "Q4_K_M"})
    assert [(o.name, o.path.name, o.shipped) for o in found] == [
        ("student GGUF F16", "model-F16.gguf", False),
        ("student GGUF Q4_K_M", "model-Q4_K_M.gguf", True),
    ]
    for kind in ("int4", "genai-int4", "fp32", "int8"):
        (tmp_path / kind).mkdir()
        (tmp_path / kind / "model.onnx").write_bytes(b"")
    found = export_onnx.outputs(tmp_path, {"quant": ["int4"]})
    assert [(o.name, o.shipped) for o in found] == [
        ("student ONNX fp32", False),
        ("student ONNX genai-int4", False),
        ("student ONNX int4", True),
        ("student ONNX int8", False),
    ]


def test_stages_run_by_kind_then_folder_number():
    kinds = [spec.kind for spec in stages.SPECS]
    assert kinds == sorted(kinds, key=("train", "export", "bench").index)
    for kind in ("train", "export"):
        folders = [spec.folder for spec in stages.SPECS if spec.kind == kind]
        assert folders == sorted(folders)
    assert stages.FORMATS == ("gguf", "onnx")


def test_what_a_stage_needs_of_the_architecture_is_a_known_feature():
    from edgekd.architectures import FEATURES

    needs = {spec.name: spec.needs for spec in stages.SPECS if spec.needs}
    assert needs == {"qat_kd": "qat", "export_gguf": "gguf", "export_onnx": "onnx"}
    assert set(needs.values()) <= set(FEATURES)


def test_training_stages_rerun_when_the_logit_cache_changes():
    """Another logit_cache.path or top_k is another set of KD targets: every training stage's
    key changes with it."""
    from edgekd.pipeline import stage_settings

    base = Recipe()
    for changed in ({"path": "/elsewhere"}, {"top_k": 8}):
        other = base.model_copy(update={"logit_cache": base.logit_cache.model_copy(update=changed)})
        for name in stages.of_kind("train", list(stages.NAMES)):
            spec = stages.get(name)
            assert stage_settings(base, spec) != stage_settings(other, spec), name
