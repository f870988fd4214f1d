"""No silent NaN models: a training whose loss or gradient becomes NaN or infinite stops with one
line and marks nothing done; no setting takes inf or NaN; a model whose weights hold NaN is never
saved, exported or reported as a number. Real builds, real tiny models, real runtimes."""

import json
import shutil
import typing
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file

from edgekd import models, pipeline, rundir
from edgekd.config import Profile, Recipe, load_profile, load_recipe
from edgekd.errors import EdgekdError
from edgekd.evaluate import evaluate_torch, quality
from edgekd.testing import (
    FAST_BUILD,
    Build,
    assert_killed_stage_not_done,
    manifest_stages,
    partial_folder,
    set_args,
    stage_folder,
    write_chat_jsonl,
)

PROFILE = Path(__file__).resolve().parents[1] / "edgekd" / "profiles" / "phone-1gb.yaml"


def _float_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every float setting of `model`, nested sections included, as dotted keys."""
    keys = []
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            keys += _float_keys(kind, f"{prefix}{name}.")
        elif kind is float or float in typing.get_args(kind):
            keys.append(f"{prefix}{name}")
    return keys


@pytest.mark.parametrize("key", _float_keys(Recipe))
@pytest.mark.parametrize("value", ["inf", ".inf", "-.inf", "nan", ".nan"])
def test_every_float_setting_refuses_inf_and_nan(key, value):
    with pytest.raises(EdgekdError, match=rf"^--set: '{key}' = .*finite number$"):
        load_recipe(None, [f"{key}={value}"])


def test_the_float_settings_are_found():
    keys = _float_keys(Recipe)
    assert {"distill.lr", "qlora.lr", "qat_kd.lr", "distill.kd.temperature"} <= set(keys)
    assert "qlora.lora_alpha" in keys and "data.heldout_fraction" in keys


@pytest.mark.parametrize("key", _float_keys(Profile))
def test_profile_float_refuses_inf(tmp_path, key):
    assert key == "memory_bandwidth_gbs"
    text = PROFILE.read_text().replace(f"{key}:", f"{key}: .inf #")
    profile = tmp_path / "fast.yaml"
    profile.write_text(text)
    with pytest.raises(EdgekdError, match=rf"'{key}' = inf: .*finite number"):
        load_profile(str(profile))


def _build(run: Path, teacher: Path, data: Path, *extra: str, stages: str = "distill"):
    """`edgekd build` in a child process: its exit code and output."""
    args = ["--teacher", str(teacher), "--data", str(data), "--stages", stages]
    build = Build(run, [*args, *set_args([*FAST_BUILD, *extra])])
    build.proc.wait(timeout=600)
    build.reader.join()
    return build.proc.returncode, build.output


def _error_line(output: str) -> str:
    assert "Traceback" not in output, output
    (line,) = [ln for ln in output.splitlines() if ln.startswith("error:")]
    return line


def _assert_nothing_done(run: Path, stage: str) -> None:
    assert_killed_stage_not_done(run, stage)
    partial = partial_folder(run, stage)
    assert not (partial / "model").exists(), "a diverged model was saved"


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [64, 0], ids=["chunked", "plain"])
def test_diverging_lr_stops_distill_and_keeps_the_last_good_checkpoint(
    tiny_teacher_dir, chat_jsonl, tmp_path, chunk
):
    run = tmp_path / "run"
    # One warmup step at lr 0: the first update does nothing, so the weights diverge at step 2
    # and its gradient is the first non-finite one.
    bad = [
        "distill.max_steps=6", "distill.checkpoint_every=2", "distill.lr=1e30",
        f"distill.scale.loss_chunk_tokens={chunk}", "distill.warmup_ratio=0.1",
    ]  # fmt: skip
    rc, out = _build(run, tiny_teacher_dir, chat_jsonl, *bad)
    assert rc == 2, out
    line = _error_line(out)
    assert "distill: the gradient norm became nan at step 3 of 6" in line
    assert "the checkpoint of step 2 is kept" in line and "lower distill.lr (1e+30)" in line
    _assert_nothing_done(run, "distill")
    checkpoint = partial_folder(run, "distill") / "checkpoint"
    assert json.loads((checkpoint / "progress.json").read_text())["step"] == 2
    if chunk == 0:
        return

    # The same settings resume from the kept checkpoint and stop at the same step again.
    rc, out = _build(run, tiny_teacher_dir, chat_jsonl, *bad)
    assert rc == 2 and "resuming from the checkpoint at step 2" in out
    assert "became nan at step 3 of 6" in _error_line(out)
    _assert_nothing_done(run, "distill")

    # A fixed learning rate is another key: the stage starts afresh and finishes.
    rc, out = _build(run, tiny_teacher_dir, chat_jsonl, *[s for s in bad if "lr=" not in s])
    assert rc == 0, out
    assert "resuming" not in out
    assert manifest_stages(run) == {"distill"}
    weights = load_file(stage_folder(run, "distill") / "model" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        # The student's own samples are drawn from the weights a large update left behind.
        (["distill.lr=1e15", "distill.on_policy.fraction=1"], "sampled model's logits became nan"),
        (["distill.lr=1e30", "distill.feature.weight=1"], "at step 3 of 8"),
        (["distill.kd.temperature=1e30"], "the loss became nan at step 1 of 8"),
        # lr / AdamW's bias correction overflows torch's float32 scalar before any weight does.
        (["distill.lr=3e38"], "the optimizer update became inf at step 2 of 8"),
    ],
    ids=["on-policy", "feature-term", "first-step", "optimizer-overflow"],
)
def test_non_finite_training_terms_stop_distill(
    tiny_teacher_dir, chat_jsonl, tmp_path, extra, expect
):
    run = tmp_path / "run"
    # One warmup step at lr 0 (as above): the steps named are the ones after it.
    warmup = "distill.warmup_ratio=0.1"
    rc, out = _build(run, tiny_teacher_dir, chat_jsonl, "distill.max_steps=8", warmup, *extra)
    assert rc == 2, out
    line = _error_line(out)
    assert expect in line and "training stopped, nothing saved or marked done" in line
    if "temperature" in extra[0]:
        # Before any update the learning rate is not the cause: the line says what else is.
        assert "no update had happened yet" in line and "distill.kd.temperature (1e+30)" in line
        assert "lower distill.lr" not in line
    _assert_nothing_done(run, "distill")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["qlora", "qat_kd"])
def test_diverging_lr_stops_qlora_and_qat_kd(tiny_teacher_dir, chat_jsonl, tmp_path, stage):
    run = tmp_path / "run"
    others = {"qlora": "qat_kd", "qat_kd": "qlora"}
    rc, out = _build(
        run, tiny_teacher_dir, chat_jsonl,
        "distill.max_steps=2", f"{stage}.enabled=true", f"{others[stage]}.enabled=false",
        f"{stage}.max_steps=6", f"{stage}.batch_size=2", f"{stage}.lr=1e30",
        stages=f"distill,{stage}",
    )  # fmt: skip
    assert rc == 2, out
    line = _error_line(out)
    assert f"{stage}: the loss became nan at step" in line and f"lower {stage}.lr" in line
    _assert_nothing_done(run, stage)
    assert manifest_stages(run) == {"distill"}


def _poisoned(model) -> torch.nn.Module:
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    return model


def test_save_model_refuses_nan_weights(tiny_teacher_dir, tokenizer, tmp_path):
    model = _poisoned(
        models.load_model(models.resolve_source(str(tiny_teacher_dir), role="student"))
    )
    with pytest.raises(
        EdgekdError, match=r"not saved: .*layers\.0\.mlp\.down_proj\.weight holds NaN"
    ):
        models.save_model(model, tokenizer, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_quality_refuses_non_finite_log_probs():
    ref = torch.randn(5, 11).log_softmax(-1)
    targets = torch.randint(0, 11, (5,))
    assert quality([ref], [ref], [targets]).kld == pytest.approx(0, abs=1e-6)
    for bad in (float("nan"), float("inf"), float("-inf")):
        lp = ref.clone()
        lp[2, 3] = bad
        with pytest.raises(EdgekdError, match="model's log-probs of held-out sequence 0 hold NaN"):
            quality([lp], [ref], [targets])
    with pytest.raises(EdgekdError, match="reference's log-probs"):
        quality([ref], [torch.full_like(ref, float("nan"))], [targets])
    # Finite but beyond any perplexity (exp overflows): refused, not a traceback.
    huge = torch.full((5, 11), -1e4)
    with pytest.raises(EdgekdError, match="mean negative log-likelihood is 1e\\+04 nats"):
        quality([huge], [ref], [targets])


def test_evaluate_refuses_a_real_nan_model(tiny_teacher_dir):
    from edgekd.evaluate import HeldOut, torch_logprobs

    model = models.load_model(models.resolve_source(str(tiny_teacher_dir), role="student"))
    ids = list(range(5, 30))
    heldout = HeldOut([ids], [torch.arange(10, 20)], [torch.tensor(ids[11:21])])
    reference = torch_logprobs(model, heldout)
    with pytest.raises(EdgekdError, match="model's log-probs"):
        evaluate_torch(_poisoned(model), heldout, reference)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_teacher_dir):
    """A finished distill stage whose model's weights were then set to NaN: what an older edgekd
    left after a diverged training, marked done."""
    root = tmp_path_factory.mktemp("nan-distill")
    data = write_chat_jsonl(root / "chat.jsonl")
    recipe = load_recipe(
        None, [*FAST_BUILD, "distill.max_steps=2"], str(tiny_teacher_dir), str(data)
    )
    pipeline.build(load_profile("phone-1gb"), recipe, root / "run", ["distill"])
    weights = root / "run" / "01-distill" / "model" / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"][:] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    return root / "run", data


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["export_gguf", "export_onnx"])
def test_exports_refuse_a_model_with_nan_weights(distilled, tiny_teacher_dir, tmp_path, stage):
    run = tmp_path / "run"
    shutil.copytree(distilled[0], run)
    rc, out = _build(run, tiny_teacher_dir, distilled[1], "distill.max_steps=2", stages=stage)
    assert rc == 2, out
    line = _error_line(out)
    folder = run / "01-distill" / "model"
    assert f"{folder}: model.safetensors:model.norm.weight holds NaN or inf" in line
    assert "is not exported" in line and "rebuild the stage that wrote it (01-distill)" in line
    assert_killed_stage_not_done(run, stage)
    left = {p.name for p in partial_folder(run, stage).iterdir()}
    assert left == {rundir.KEY, rundir.STAGE_LOG}  # no half-written artifact, and the stage's log


@pytest.mark.slow
def test_bench_of_a_gguf_with_nan_weights_says_so(tiny_teacher_dir, tmp_path):
    import subprocess
    import sys

    from edgekd.formats import gguf

    folder = tmp_path / "nan-model"
    shutil.copytree(tiny_teacher_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EdgekdError, match="tensor blk.0.ffn_down.weight holds NaN or inf"):
        gguf.write_gguf(folder, tmp_path / "nan-F16.gguf", dtype="F16")
    # F32 keeps the NaN, as a GGUF made elsewhere might.
    path = gguf.write_gguf(folder, tmp_path / "nan-F32.gguf", dtype="F32")
    proc = subprocess.run(
        [sys.executable, "-m", "edgekd.cli", "bench", str(path), "--profile", "phone-1gb",
         "--set", "bench.runs=1", "--set", "bench.warmup_runs=0", "--set", "bench.questions=1",
         "--set", "bench.decode_tokens=4", "--set", "bench.bandwidth_mib=16"],
        capture_output=True, text=True,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out and "PASS" not in out
    assert f"{path}: its logits on the benchmark prompt hold NaN or inf" in " ".join(out.split())
