"""The bench on a device, through a real OpenSSH server on 127.0.0.1 standing in for the board:
the device runner's rows must equal the host bench's for the same artifact in everything but
timing, a second bench copies nothing, and nothing is left running or lying on the device."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from edgekd import benchmark, device, remote
from edgekd.benchmark import Artifact
from edgekd.cli import app
from edgekd.config import BenchSettings, DeviceSettings, load_profile
from edgekd.errors import EdgekdError
from edgekd.evaluate import HeldOut, torch_logprobs
from edgekd.models import load_model, resolve_source
from edgekd.testing import TOKEN_IDS

SETTINGS = BenchSettings(
    runs=2,
    warmup_runs=0,
    prompt_tokens=16,
    decode_tokens=4,
    questions=2,
    answer_max_tokens=6,
    threads=1,
    bandwidth_mib=16,
    memory_cap=False,
)
QUESTIONS = [
    {"prompt": "What is 2 plus 2?", "category": "arithmetic", "answer": "4"},
    {"prompt": "Name the capital of France.", "category": "facts", "answer": "Paris"},
]


def _profile(server, **device):
    base = load_profile("phone-1gb").model_copy(update={"context_length": 256})
    return base.model_copy(update={"device": DeviceSettings(**server.device(**device))})


@pytest.fixture(scope="module")
def heldout_file(tiny_llama_gguf, tmp_path_factory):
    """A held-out slice with the tiny model's own torch log-probs as the reference."""
    folder, _ = tiny_llama_gguf
    seqs = [TOKEN_IDS, TOKEN_IDS[3:] + TOKEN_IDS[:5]]
    positions = [torch.arange(2, len(s) - 1) for s in seqs]
    targets = [torch.tensor(s)[p + 1] for s, p in zip(seqs, positions, strict=True)]
    heldout = HeldOut(seqs, positions, targets)
    model = load_model(resolve_source(str(folder), role="student"))
    path = tmp_path_factory.mktemp("heldout") / "heldout.safetensors"
    benchmark.save_heldout(path, heldout, torch_logprobs(model, heldout))
    return path


def _host_row(artifact, profile, heldout_file, tmp_path):
    return benchmark.benchmark_artifact(
        artifact,
        profile=profile,
        settings=SETTINGS,
        threads=1,
        host_bandwidth_bps=1e10,
        prompt=(TOKEN_IDS * 2)[:16],
        questions=QUESTIONS,
        heldout_file=heldout_file,
        scratch=tmp_path / "host",
    )


def _device_part(profile, artifact, heldout_file):
    return device.bench_on_device(
        profile.device,
        [artifact],
        profile=profile,
        settings=SETTINGS,
        prompt=(TOKEN_IDS * 2)[:16],
        questions=QUESTIONS,
        heldout_file=heldout_file,
    )


def _same_but_timing(host: dict, dev: dict) -> None:
    """The numbers that do not depend on time, to the report's printed precision (a random
    model's perplexity of ~5e4 printed to 0.01 asks for more digits than float32 sums hold: the
    device and the host sum the same float32 log-probs in another order)."""
    for key, digits in (("kld", 4), ("top1", 3), ("ppl", 2)):
        if key != "ppl" or host["quality"]["ppl"] < 1000:
            assert f"{dev['quality'][key]:.{digits}f}" == f"{host['quality'][key]:.{digits}f}", key
        assert dev["quality"][key] == pytest.approx(host["quality"][key], rel=1e-5, abs=1e-7)
    assert dev["quality"]["tokens"] == host["quality"]["tokens"]
    assert dev["exact_match"] == host["exact_match"]
    for key in ("size_bytes", "weights_bytes", "kv_bytes_per_token", "budget"):
        assert dev[key] == host[key], key
    assert dev["speed"]["decode_tps"]["n"] == host["speed"]["decode_tps"]["n"] == 2


def _nothing_left(server) -> None:
    """No runner runs and no run folder lies on the device; only the artifact cache stays."""
    runs = server.folder / "device" / "runs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"{server.folder / 'device'}/runs/" not in ps, ps  # this device's runners


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gguf", "onnx"])
def test_device_rows_equal_the_host_rows(
    kind, ssh_server, tiny_llama_gguf, tiny_onnx, tmp_path, heldout_file
):
    path = tiny_llama_gguf[1] if kind == "gguf" else tiny_onnx
    runtime = "llama.cpp" if kind == "gguf" else "onnxruntime"
    artifact = Artifact(path.name, runtime, path, shipped=True)
    profile = _profile(ssh_server)
    host = _host_row(artifact, profile, heldout_file, tmp_path)
    first = _device_part(profile, artifact, heldout_file)
    assert not first["errors"] and "error" not in first, first
    (row,) = first["rows"]
    assert row["measured_on"] == profile.device.label and row["threads"] == 1
    _same_but_timing(host, row)
    assert row["remote"]["copy_s"] is not None and row["remote"]["copy_bytes"] > 0
    assert row["bandwidth"]["host_limit_tps"] is None
    measured = row["speed"]["decode_tps"]["median"]
    projected = row["bandwidth"]["device_projection_tps"]
    assert row["projection_error"] == pytest.approx(projected / measured - 1)
    # The same bytes again: nothing copied, the same answers.
    again = _device_part(profile, artifact, heldout_file)
    assert again["rows"][0]["remote"]["copy_s"] is None
    assert again["rows"][0]["remote"]["heldout_copy_s"] is None
    _same_but_timing(host, again["rows"][0])
    _nothing_left(ssh_server)


@pytest.mark.slow
def test_heldout_slice_is_copied_once(
    ssh_server, tiny_llama_gguf, tiny_onnx, heldout_file, tmp_path
):
    """Two artifacts of one build: the held-out slice goes to the device with the first only,
    and both measure against it."""
    profile = _profile(ssh_server, workdir=str(tmp_path / "fresh-device"))
    artifacts = [
        Artifact(tiny_llama_gguf[1].name, "llama.cpp", tiny_llama_gguf[1], shipped=True),
        Artifact(tiny_onnx.name, "onnxruntime", tiny_onnx, shipped=True),
    ]
    part = device.bench_on_device(
        profile.device,
        artifacts,
        profile=profile,
        settings=SETTINGS,
        prompt=(TOKEN_IDS * 2)[:16],
        questions=QUESTIONS,
        heldout_file=heldout_file,
    )
    assert not part["errors"] and "error" not in part, part
    first, second = (r["remote"] for r in part["rows"])
    assert first["heldout_copy_bytes"] > heldout_file.stat().st_size, first
    assert second["heldout_copy_s"] is None and second["heldout_copy_bytes"] == 0, second
    assert second["copy_s"] is not None  # the artifact itself was new
    assert all(r["quality"]["tokens"] > 0 for r in part["rows"])
    kept = list((tmp_path / "fresh-device" / "artifacts").glob("*/heldout.safetensors"))
    assert len(kept) == 1, kept
    _nothing_left(ssh_server)


@pytest.mark.slow
def test_llama_bench_on_the_device(ssh_server, tiny_llama_gguf, llama_bench_bin, tmp_path):
    """device.llama_bench: the device's llama-bench measures the GGUF file's speed; what it
    does not measure is marked, never filled."""
    _, gguf = tiny_llama_gguf
    profile = _profile(ssh_server, llama_bench=str(llama_bench_bin))
    artifact = Artifact(gguf.name, "llama.cpp", gguf, shipped=True)
    part = _device_part(profile, artifact, heldout_file=None)
    assert not part["errors"] and "error" not in part, part
    (row,) = part["rows"]
    assert row["measured_on"] == f"{profile.device.label} (llama-bench)"
    assert row["not_measured"] == ["held-out quality", "exact match", "peak memory"]
    assert row["quality"] is None and row["exact_match"]["total"] == 0
    assert row["memory"]["peak_rss_bytes"] is None
    speed = row["speed"]
    assert speed["prompt_tokens"] == 16 and speed["decode_tokens"] == SETTINGS.decode_tokens
    assert speed["decode_tps"]["n"] == speed["prompt_tps"]["n"] == SETTINGS.runs
    assert speed["decode_tps"]["median"] > 0 and speed["prompt_tps"]["median"] > 0
    assert row["remote"]["load_s"] is None and row["remote"]["copy_bytes"] >= 0
    _nothing_left(ssh_server)


def test_llama_bench_missing_on_the_device(ssh_server, tiny_llama_gguf, tmp_path):
    _, gguf = tiny_llama_gguf
    profile = _profile(ssh_server, llama_bench=str(tmp_path / "nowhere" / "llama-bench"))
    artifact = Artifact(gguf.name, "llama.cpp", gguf, shipped=True)
    part = _device_part(profile, artifact, heldout_file=None)
    assert not part["rows"]
    assert "has no executable llama-bench at" in part["errors"][gguf.name]
    with pytest.raises(EdgekdError, match="has no executable llama-bench"):
        device.check_device(profile.device, ["gguf"])
    _nothing_left(ssh_server)


def _run_folder(gguf: Path, run: Path) -> Path:
    """A finished build's run folder, as far as `edgekd bench` reads it: its GGUF export."""
    stage = run / "04-export-gguf"
    stage.mkdir(parents=True)
    (run / "build.json").write_text("{}")
    shutil.copy(gguf, stage / "model-F16.gguf")
    (stage / "report.json").write_text(json.dumps({"quant": "F16"}))
    (stage / ".done").write_text(json.dumps({"key": "k", "artifacts": {}}))
    return run


@pytest.mark.slow
@pytest.mark.parametrize("what", ["file", "run folder"])
def test_bench_command_with_device(what, ssh_server, tiny_llama_gguf, tmp_path):
    _, gguf_path = tiny_llama_gguf
    if what == "run folder":
        gguf_path = _run_folder(gguf_path, tmp_path / "run")
    profile = tmp_path / "my-board.yaml"
    settings = ssh_server.device(name="loopback board")
    profile.write_text(
        (Path(__file__).parents[1] / "edgekd" / "profiles" / "phone-1gb.yaml").read_text()
        + "device:\n"
        + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in settings.items() if k != "host")
        + "  host: ssh://nobody@elsewhere.invalid\n"  # --device replaces it
    )
    out = tmp_path / "bench.json"
    keys = ("runs", "warmup_runs", "prompt_tokens", "decode_tokens", "answer_max_tokens")
    sets = [f"bench.{k}={getattr(SETTINGS, k)}" for k in (*keys, "threads", "bandwidth_mib")]
    args = ["bench", str(gguf_path), "--profile", str(profile), "--device", settings["host"]]
    args += ["--json", str(out), *[a for s in [*sets, "bench.questions=1"] for a in ("--set", s)]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    (host,) = report["artifacts"]
    (dev,) = report["device"]["rows"]
    assert dev["measured_on"] == "loopback board"
    assert dev["name"] == ("student GGUF F16" if what == "run folder" else "model-F16.gguf")
    assert dev["exact_match"] == host["exact_match"]
    text = " ".join(result.output.split())
    assert "side by side" in text and "loopback board" in text
    assert "would have projected the measurement" in text
    assert ("ran within the 480 MB cap" in text) or ("NO CAP" in text)
    _nothing_left(ssh_server)


def test_settings_refuse_a_bad_address():
    with pytest.raises(ValueError, match="only ssh://"):
        DeviceSettings(host="http://pi")
    with pytest.raises(ValueError, match="port"):
        DeviceSettings(host="ssh://pi@board:abc")
    with pytest.raises(ValueError, match="leading '-'"):
        DeviceSettings(host="-oProxyCommand=x")
    ssh = remote.Ssh.of(DeviceSettings(host="ssh://pi@board:2222", ssh_options=["Foo=bar"]))
    argv = ssh.argv("true")
    assert argv[-2:] == ["pi@board", "true"] and argv[argv.index("-p") + 1] == "2222"
    assert "BatchMode=yes" in argv and "Foo=bar" in argv
    assert remote.remote_path("~/.cache/edgekd") == '"$HOME"/.cache/edgekd'


def test_build_preflight_asks_the_device_before_any_work(
    ssh_server, tiny_teacher_dir, chat_jsonl, tmp_path
):
    profile = tmp_path / "board.yaml"
    settings = {**ssh_server.device(), "python": "/usr/bin/python3"}  # no numpy, no runtimes
    if subprocess.run([settings["python"], "-c", "import numpy"]).returncode == 0:
        pytest.skip("/usr/bin/python3 has numpy here")
    profile.write_text(
        (Path(__file__).parents[1] / "edgekd" / "profiles" / "phone-1gb.yaml").read_text()
        + "device:\n"
        + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in settings.items())
    )
    out = tmp_path / "run"
    args = ["build", "--profile", str(profile), "--teacher", str(tiny_teacher_dir)]
    args += ["--data", str(chat_jsonl), "--out", str(out), "--set", "student.num_layers=2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "lacks numpy, llama_cpp" in result.output and "pip install" in result.output
    assert not (out / "01-distill").exists() and not list(out.glob(".*.partial"))
