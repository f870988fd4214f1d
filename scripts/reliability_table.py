"""Feed `edgekd` bad inputs and faults for real, and write what it said to docs/reliability.md.

Every case runs the real command line (`python -m edgekd.cli ...`) on tiny models in a temporary
folder, next to a finished run whose files are hashed before and after: the table's last column
says whether anything in it changed. Run from the repo root (a few minutes on two cores):

    python scripts/reliability_table.py [--out docs/reliability.md] [--fast] [--only TEXT] [--keep]

tests/test_reliability_table.py runs the cases marked fast through the same code, so the table
cannot go stale without a test failing.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgekd.atomic import TMP_MARK
from edgekd.rundir import BUILD_LOG, CACHE, KEY, LOCK, PROGRESS, STAGE_LOG
from edgekd.testing import (
    FAST_BUILD,
    Build,
    FaultProxy,
    assert_killed_stage_not_done,
    assert_no_leftovers,
    fill,
    free_port,
    kill_on_device,
    llama_server,
    marker,
    partial_holds_file,
    save_embedded_tokenizer,
    save_tiny_llama,
    set_args,
    sshd,
    tmpfs,
    write_chat_jsonl,
)

ROOT = Path(__file__).resolve().parents[1]
# The builds here never read or fill the user's machine-wide answer cache.
os.environ["EDGEKD_CACHE"] = tempfile.mkdtemp(prefix="edgekd-reliability-cache-")
atexit.register(shutil.rmtree, os.environ["EDGEKD_CACHE"], ignore_errors=True)
FAST = [*FAST_BUILD, "distill.max_steps=2"]


@dataclass
class Workspace:
    """Tiny inputs and a finished distill run that every case must leave as it was."""

    root: Path
    teacher: Path
    data: Path
    run: Path

    def path(self, name: str) -> Path:
        return self.root / name

    def build(self, *args: str, teacher: Path | None = None, out: Path | None = None) -> list[str]:
        """`build` arguments for this workspace; `args` come last and may override."""
        sets = set_args(FAST)
        return [
            "build", "--profile", "phone-1gb", "--teacher", str(teacher or self.teacher),
            "--data", str(self.data), "--out", str(out or self.run), "--stages", "distill",
            *sets, *args,
        ]  # fmt: skip


@dataclass
class Case:
    fault: str
    args: Callable[[Workspace], list[str]]  # prepares its inputs, returns the CLI arguments
    expect: str  # a piece of what edgekd must say
    exit_code: int = 2
    fast: bool = True  # in the test's subset
    intact: Callable[[Workspace], str] | None = None  # an extra "nothing lost" check


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _teacher_copy(ws: Workspace, name: str, drop: tuple[str, ...] = ()) -> Path:
    dst = ws.path(name)
    shutil.copytree(ws.teacher, dst, ignore=shutil.ignore_patterns(*drop))
    return dst


def _truncated_safetensors(ws: Workspace) -> list[str]:
    t = _teacher_copy(ws, "t-trunc")
    weights = t / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    return ws.build(teacher=t)


def _garbage_safetensors(ws: Workspace) -> list[str]:
    t = _teacher_copy(ws, "t-garbage")
    (t / "model.safetensors").write_bytes(b"\xff" * 8 + os.urandom(4096))
    return ws.build(teacher=t)


def _embedded_gguf() -> Path:
    from edgekd.models import embedded_teacher_gguf

    return embedded_teacher_gguf()


def _truncated_gguf(ws: Workspace) -> list[str]:
    src, dst = _embedded_gguf(), ws.path("cut.gguf")
    with open(src, "rb") as f:
        dst.write_bytes(f.read(src.stat().st_size // 2))
    return ws.build(teacher=dst)


def _not_gguf(ws: Workspace) -> list[str]:
    dst = ws.path("random.gguf")
    dst.write_bytes(os.urandom(65536))
    return ws.build(teacher=dst)


def _pickle_teacher(ws: Workspace) -> list[str]:
    import torch
    from safetensors.torch import load_file

    t = _teacher_copy(ws, "t-pickle", drop=("*.safetensors",))
    torch.save(load_file(ws.teacher / "model.safetensors"), t / "pytorch_model.bin")
    return ws.build(teacher=t)


def _remote_code_teacher(ws: Workspace) -> list[str]:
    t = _teacher_copy(ws, "t-remote")
    config = json.loads((t / "config.json").read_text())
    config.update(
        model_type="evil_llama",
        auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
    )
    (t / "config.json").write_text(json.dumps(config))
    marker = ws.path("remote-code-ran")
    _write(t / "evil.py", f"open({str(marker)!r}, 'w').write('ran')\n")
    return ws.build(teacher=t)


def _remote_code_not_run(ws: Workspace) -> str:
    assert not ws.path("remote-code-ran").exists(), "the model's Python file was executed"
    return "its evil.py never ran"


UNSAFE_TEMPLATE = "{{ ''.__class__.__mro__[1].__subclasses__() }}{{ messages[0]['content'] }}"


def _unsafe_template_teacher(ws: Workspace) -> list[str]:
    t = _teacher_copy(ws, "t-template")
    (t / "chat_template.jinja").write_text(UNSAFE_TEMPLATE)
    return ws.build(teacher=t)


def _broken_config_teacher(ws: Workspace) -> list[str]:
    t = _teacher_copy(ws, "t-config")
    (t / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    return ws.build(teacher=t)


def _other_tokenizer_student(ws: Workspace) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ws.teacher)
    tok.add_tokens(["<edgekd-extra>"])
    student = save_tiny_llama(ws.path("s-tok"), tok, num_layers=2)
    return ws.build("--set", f"student.source={student}")


def _pickle_student(ws: Workspace) -> list[str]:
    import torch
    from safetensors.torch import load_file

    s = _teacher_copy(ws, "s-pickle", drop=("*.safetensors",))
    torch.save(load_file(ws.teacher / "model.safetensors"), s / "pytorch_model.bin")
    return ws.build("--set", f"student.source={s}")


def _profile(ws: Workspace, name: str, extra: str) -> Path:
    base = (ROOT / "edgekd" / "profiles" / "phone-1gb.yaml").read_text()
    return _write(ws.path(f"{name}.yaml"), base + extra)


def _with(args: list[str], option: str, value: str | Path) -> list[str]:
    """`args` with `option`'s value replaced."""
    args[args.index(option) + 1] = str(value)
    return args


def _user_folder(ws: Workspace) -> list[str]:
    folder = ws.path("my-notes")
    _write(folder / "notes.txt", "mine")
    return ws.build(out=folder)


def _user_folder_kept(ws: Workspace) -> str:
    assert (ws.path("my-notes") / "notes.txt").read_text() == "mine"
    return "notes.txt untouched"


def _huge_teacher(ws: Workspace) -> list[str]:
    """A 9.5B-parameter teacher as a sparse file (valid header, zeros): a run that needs more disk
    than this machine has, without using any."""
    t = _teacher_copy(ws, "t-huge", drop=("*.safetensors", "config.json"))
    config = json.loads((ws.teacher / "config.json").read_text())
    config.update(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40)
    config.update(num_attention_heads=40, num_key_value_heads=40, tie_word_embeddings=False)
    (t / "config.json").write_text(json.dumps(config))
    # As many values as the config declares: preflight refuses weights that do not match it.
    from edgekd.models import load_config, param_count, resolve_source

    n = param_count(load_config(resolve_source(str(t), role="teacher")))
    header = json.dumps({"w": {"dtype": "BF16", "shape": [n], "data_offsets": [0, 2 * n]}})
    header += " " * (-len(header) % 8)
    with open(t / "model.safetensors", "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header.encode())
        f.truncate(8 + len(header) + 2 * n)
    args = _with(ws.build(teacher=t, out=ws.path("huge-run")), "--profile", "laptop-cpu")
    return [*args, "--set", "student.num_layers=30"]


def _stage_needs_input(ws: Workspace) -> list[str]:
    return _with(ws.build(out=ws.path("fresh-run")), "--stages", "export_gguf")


def _corrupt(ws: Workspace, how: str) -> list[str]:
    """A copy of the finished run with one fault in it, and `edgekd verify` on it."""
    copy = ws.path(f"run-{how}")
    shutil.copytree(ws.run, copy)
    weights = copy / "01-distill" / "model" / "model.safetensors"
    if how == "flip":
        data = bytearray(weights.read_bytes())
        data[-100] ^= 0x01
        weights.write_bytes(bytes(data))
    elif how == "delete":
        weights.unlink()
    elif how == "manifest":
        (copy / "manifest.json").write_text("{ not json")
    elif how == "no-manifest":
        (copy / "manifest.json").unlink()
    return ["verify", str(copy)]


def _data(ws: Workspace, name: str, text: str) -> list[str]:
    return ws.build("--data", str(_write(ws.path(name), text)))


def _recipe(ws: Workspace, name: str, text: str) -> list[str]:
    return ws.build("--recipe", str(_write(ws.path(name), text)))


# Non-finite numbers: no NaN model saved, exported or reported.
def _diverged_not_done(ws: Workspace, name: str) -> str:
    run = ws.path(name)
    assert_killed_stage_not_done(run, "distill")
    assert not (run / ".01-distill.partial" / "model").exists(), "a diverged model was saved"
    return "distill not marked done, no model saved"


def _nan_weights(folder: Path) -> None:
    """Set one weight of a saved model to NaN, as a diverged training left it."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _nan_model_export(ws: Workspace) -> list[str]:
    """A copy of the finished run whose distill model holds NaN (an older edgekd marked such a
    model done), then its ONNX export."""
    copy = ws.path("run-nan")
    shutil.copytree(ws.run, copy)
    _nan_weights(copy / "01-distill" / "model")
    return _with(ws.build(out=copy), "--stages", "export_onnx")


def _no_stage_started(ws: Workspace) -> str:
    run = ws.path("bench-task-run")
    started = [p.name for p in run.iterdir() if "distill" in p.name] if run.is_dir() else []
    assert not started, started
    return "no stage started"


def _export_not_done(ws: Workspace) -> str:
    run = ws.path("run-nan")
    assert_killed_stage_not_done(run, "export_onnx")
    left = {p.name for p in (run / ".05-export-onnx.partial").iterdir()}
    assert left == {KEY, STAGE_LOG}, left
    return "export_onnx not marked done, nothing written (its key and log only)"


def _nan_gguf_bench(ws: Workspace) -> list[str]:
    from edgekd.formats import gguf

    folder = ws.path("nan-model")
    shutil.copytree(ws.teacher, folder)
    _nan_weights(folder)
    path = gguf.write_gguf(folder, ws.path("nan-F32.gguf"), dtype="F32")
    sets = set_args(["bench.runs=1", "bench.warmup_runs=0", "bench.questions=1"])
    return ["bench", str(path), "--profile", "phone-1gb", *sets]


# Untrusted inputs: bounded templates and YAML, weights that match their config, bad files.
NESTED_LOOPS = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"


def _template_teacher(ws: Workspace, name: str, template: str) -> list[str]:
    t = _teacher_copy(ws, f"t-{name}")
    (t / "chat_template.jinja").write_text(template)
    return ws.build(teacher=t)


def _huge_config_teacher(ws: Workspace) -> list[str]:
    """The tiny teacher's weights under a config declaring a 9.5B-parameter model."""
    t = _teacher_copy(ws, "t-huge-config")
    config = json.loads((t / "config.json").read_text())
    config.update(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40)
    config.update(num_attention_heads=40, num_key_value_heads=40, tie_word_embeddings=False)
    (t / "config.json").write_text(json.dumps(config))
    args = _with(ws.build(teacher=t, out=ws.path("huge-config-run")), "--profile", "laptop-cpu")
    return [*args, "--set", "student.num_layers=1"]


LAUGHS = "".join(
    f"{x}: &{x} [{', '.join([f'*{p}'] * 9 if p else ['lol'] * 9)}]\n"
    for p, x in zip(["", *"abcdefgh"], "abcdefghi", strict=True)
)


def _bench_gguf(ws: Workspace, keep: float = 1.0, profile: str | Path = "phone-1gb") -> list[str]:
    from edgekd.formats.gguf import write_gguf

    whole = ws.path("bench-whole.gguf")
    if not whole.is_file():
        write_gguf(ws.teacher, whole, dtype="F16")
    path = whole
    if keep < 1:
        path = ws.path("bench-cut.gguf")
        path.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * keep)])
    return ["bench", str(path), "--profile", str(profile)]


def _eval_gguf(ws: Workspace, *args: str, keep: float = 1.0) -> list[str]:
    """`edgekd eval` on the tiny teacher's GGUF (cut to `keep` of its bytes)."""
    path = _bench_gguf(ws, keep=keep)[1]
    return ["eval", path, *args, "--set", "eval.threads=1"]


def _write_bytes(path: Path, raw: bytes) -> Path:
    path.write_bytes(raw)
    return path


def _bench_random_onnx(ws: Workspace) -> list[str]:
    folder = _teacher_copy(ws, "onnx-random", drop=("*.safetensors",))
    (folder / "model.onnx").write_bytes(os.urandom(65536))
    return ["bench", str(folder), "--profile", "phone-1gb"]


def _run_copy(ws: Workspace, name: str) -> Path:
    copy = ws.path(name)
    shutil.copytree(ws.run, copy, symlinks=True)
    return copy


def _outside(ws: Workspace, name: str) -> Path:
    """A folder of the user's outside the run, with a file named like an edgekd temporary."""
    folder = ws.path(name)
    _write(folder / "notes.txt", "mine")
    _write(folder / f".notes{TMP_MARK}1", "mine too")
    return folder


def _outside_kept(name: str) -> Callable[[Workspace], str]:
    def check(ws: Workspace) -> str:
        folder = ws.path(name)
        assert sorted(p.name for p in folder.iterdir()) == [f".notes{TMP_MARK}1", "notes.txt"]
        assert (folder / "notes.txt").read_text() == "mine"
        return f"both files in <tmp>/{name} untouched"

    return check


_IMATRIX_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _imatrix_beside(ws: Workspace, name: str, entries: dict[str, int]) -> list[str]:
    """A copy of the run with an imatrix.gguf beside its student (GGUF name -> width), then its
    imatrix-weighted GGUF export."""
    import torch

    from edgekd.formats import imatrix as imatrix_file
    from edgekd.quant.imatrix import Imatrix

    copy = _run_copy(ws, name)
    imatrix = Imatrix(chunk_count=1, chunk_size=32, datasets=["another corpus"])
    for tensor, width in entries.items():
        imatrix.sums[tensor], imatrix.counts[tensor] = torch.ones(width), 32
    imatrix_file.write(imatrix, copy / "01-distill" / imatrix_file.FILE)
    return _imatrix_export(ws, copy)


def _imatrix_export(ws: Workspace, run: Path, *sets: str) -> list[str]:
    args = _with(ws.build(out=run), "--stages", "export_gguf")
    return [*args, "--set", "export_gguf.imatrix=true", *[a for s in sets for a in ("--set", s)]]


def _imatrix_not_gguf(ws: Workspace) -> list[str]:
    from edgekd.formats import imatrix as imatrix_file

    copy = _run_copy(ws, "run-imatrix-dat")
    _write(copy / "01-distill" / imatrix_file.FILE, "a legacy .dat or anything else")
    return _imatrix_export(ws, copy)


def _linked_cache(ws: Workspace) -> list[str]:
    copy = _run_copy(ws, "run-linked-cache")
    shutil.rmtree(copy / CACHE)
    (copy / CACHE).symlink_to(_outside(ws, "outside-cache"))
    return ws.build("--set", "distill.lr=3e-5", out=copy)


def _linked_partial(ws: Workspace) -> list[str]:
    copy = _run_copy(ws, "run-linked-partial")
    (copy / ".01-distill.partial").symlink_to(_outside(ws, "outside-partial"))
    return ws.build("--set", "distill.lr=3e-5", out=copy)


def _linked_artifact(ws: Workspace) -> list[str]:
    copy = _run_copy(ws, "run-linked-artifact")
    weights = copy / "01-distill" / "model" / "model.safetensors"
    outside = ws.path("outside.safetensors")
    shutil.move(weights, outside)
    weights.symlink_to(outside)  # the same bytes: the hash matches, the link is the fault
    return ["verify", str(copy)]


def _manifest_path(ws: Workspace, name: str, bad: str) -> list[str]:
    copy = _run_copy(ws, name)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["stages"]["distill"]["artifacts"][bad] = {"bytes": 1, "sha256": "0" * 64}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return ["verify", str(copy)]


def _unlisted_file(ws: Workspace) -> list[str]:
    copy = _run_copy(ws, "run-unlisted")
    _write(copy / "01-distill" / "extra.bin", "x")
    return ["verify", str(copy)]


def _force_other_profile(ws: Workspace) -> list[str]:
    copy = _run_copy(ws, "run-force")
    _write(copy / "notes.txt", "mine")
    return [*_with(ws.build(out=copy), "--profile", "laptop-cpu"), "--force"]


def _notes_kept(name: str) -> Callable[[Workspace], str]:
    def check(ws: Workspace) -> str:
        assert (ws.path(name) / "notes.txt").read_text() == "mine"
        return "notes.txt kept"

    return check


def _out_is_a_file(ws: Workspace) -> list[str]:
    return ws.build(out=_write(ws.path("a-file"), "mine"))


def _out_read_only(ws: Workspace) -> list[str]:
    folder = ws.path("read-only")
    folder.mkdir()
    if os.geteuid() != 0:  # permissions bind everyone but root
        folder.chmod(0o555)
    else:  # a read-only mount, which _read_only_undone takes away
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,ro", "tmpfs", str(folder)])
        assert done.returncode == 0, "root, but cannot mount a read-only file system"
    return ws.build(out=folder / "run")


def _read_only_undone(ws: Workspace) -> str:
    folder = ws.path("read-only")
    assert not (folder / "run").exists()
    if os.geteuid() == 0:
        subprocess.run(["umount", "-l", str(folder)], check=True)
    folder.chmod(0o755)
    return "nothing written"


def _cut_answer_cache(ws: Workspace) -> list[str]:
    """The machine's cached answers of a GGUF teacher to the workspace's prompts, cut short."""
    from edgekd import answer_cache, data, teacher_data
    from edgekd.config import DataSettings
    from edgekd.formats.gguf import write_gguf

    teacher = ws.path("answering-teacher.gguf")
    if not teacher.exists():
        write_gguf(ws.teacher, teacher, dtype="F16")
    sets = ["data.regenerate=true", "data.generation.max_tokens=4"]
    prompts = teacher_data.prompt_rows(data.load_corpus(ws.data), str(ws.data))
    settings = DataSettings(regenerate=True, generation={"max_tokens": 4})
    generation = teacher_data.generation_key(settings)
    entry = answer_cache.entry(teacher, data.fingerprint(prompts), generation)
    _write(entry, '{"messages": [{"role": "user", "content": "cut')
    return ws.build(*set_args(sets), teacher=teacher, out=ws.path("run-cut-answer-cache"))


def _not_json(ws: Workspace, name: str, file: str, *extra: str) -> list[str]:
    copy = _run_copy(ws, name)
    _write(copy / file, "{ not json")
    _write(copy / "notes.txt", "mine")
    return [*ws.build(out=copy), *extra]


PROFILE = (ROOT / "edgekd" / "profiles" / "phone-1gb.yaml").read_text()

# The device faults: `edgekd bench` of a tiny GGUF on a real OpenSSH server on 127.0.0.1 (started
# once, for the cases that need it), the host bench kept small.
_BOARD: dict = {}
_BENCH = [
    "bench.runs=1", "bench.warmup_runs=0", "bench.prompt_tokens=16", "bench.decode_tokens=4",
    "bench.questions=1", "bench.answer_max_tokens=4", "bench.threads=1", "bench.bandwidth_mib=16",
    "bench.memory_cap=false",
]  # fmt: skip
_OOM_CGROUP = Path("/sys/fs/cgroup/memory/edgekd-reliability-device")


def _board(ws: Workspace):
    """The loopback device and a tiny GGUF of the workspace's teacher, made once."""
    if "server" not in _BOARD:
        from edgekd.formats.gguf import write_gguf

        stack = contextlib.ExitStack()
        atexit.register(stack.close)
        _BOARD["server"] = stack.enter_context(sshd(ws.path("sshd")))
        _BOARD["gguf"] = write_gguf(ws.teacher, ws.path("board.gguf"), dtype="F16")
    return _BOARD["server"], _BOARD["gguf"]


def _on_board(ws: Workspace, name: str, *sets: str, **device) -> list[str]:
    """`edgekd bench` of the tiny GGUF with a profile whose device is the loopback board."""
    server, gguf = _board(ws)
    settings = server.device(**device)
    yaml_lines = "".join(f"  {k}: {json.dumps(v)}\n" for k, v in settings.items())
    profile = _write(ws.path(f"{name}.yaml"), PROFILE + "device:\n" + yaml_lines)
    return ["bench", str(gguf), "--profile", str(profile), *set_args([*_BENCH, *sets])]


def _board_left_clean(ws: Workspace) -> str:
    server, _ = _board(ws)
    runs = server.folder / "device" / "runs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"{server.folder / 'device'}/runs/" not in ps, ps  # this device's runners
    return "host bench printed; nothing left running or in runs/ on the device"


def _wrong_port(ws: Workspace) -> list[str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return _on_board(ws, "board-port", host=f"ssh://root@127.0.0.1:{port}")


def _refused_key(ws: Workspace) -> list[str]:
    server, _ = _board(ws)
    other = ws.path("other_key")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    config = _write(
        ws.path("other_ssh_config"),
        server.ssh_config.read_text().replace(str(server.client_key), str(other)),
    )
    return _on_board(ws, "board-key", ssh_config=str(config))


def _unknown_host_key(ws: Workspace) -> list[str]:
    empty = _write(ws.path("empty_known_hosts"), "")
    return _on_board(ws, "board-host-key", ssh_options=[f"UserKnownHostsFile={empty}"])


def _board_disk(ws: Workspace) -> list[str]:
    small = ws.path("board-disk")
    small.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)])
    assert done.returncode == 0, "cannot mount a small file system (root needed)"
    return _on_board(ws, "board-disk", workdir=str(small))


def _board_disk_undone(ws: Workspace) -> str:
    subprocess.run(["umount", "-l", str(ws.path("board-disk"))], check=True)
    return _board_left_clean(ws)


def _board_memory(ws: Workspace) -> list[str]:
    """The device's Python, as its out-of-memory killer sees it: a 40 MB cgroup for the run."""
    _OOM_CGROUP.mkdir(exist_ok=True)
    (_OOM_CGROUP / "memory.limit_in_bytes").write_text(str(40 << 20))
    wrapper = _write(
        ws.path("capped-python"),
        '#!/bin/sh\nif [ "$2" = run ]; then echo $$ > '
        f'{_OOM_CGROUP}/cgroup.procs; fi\nexec {sys.executable} "$@"\n',
    )
    wrapper.chmod(0o755)
    return _on_board(ws, "board-memory", python=str(wrapper))


def _board_memory_undone(ws: Workspace) -> str:
    _OOM_CGROUP.rmdir()
    return _board_left_clean(ws)


def _killed_on_board(what: str) -> Callable[[Workspace], list[str]]:
    def args(ws: Workspace) -> list[str]:
        args = _on_board(ws, f"board-{what}", "bench.runs=300", "bench.decode_tokens=64")
        server, _ = _board(ws)
        kill_on_device(server.folder / "device", what, timeout=600)
        return args

    return args


CASES = [
    Case(
        "profile name unknown",
        lambda ws: _with(ws.build(), "--profile", "phone-2gb"),
        "unknown profile 'phone-2gb'",
    ),
    Case(
        "profile file with an unknown key",
        lambda ws: _with(
            ws.build(), "--profile", _write(ws.path("typo.yaml"), PROFILE + "ram_gb: 1\n")
        ),
        "unknown key 'ram_gb'",
    ),
    Case(
        "profile whose name would put the run outside export/ (`name: ../../outside`)",
        lambda ws: _with(
            ws.build(),
            "--profile",
            _write(ws.path("escape.yaml"), PROFILE + "name: ../../outside\n"),
        ),
        "'name' = '../../outside'",
    ),
    Case(
        "profile asking for a format no export stage writes (`formats: [gguf, tflite]`)",
        lambda ws: _with(
            ws.build(),
            "--profile",
            _write(
                ws.path("tflite.yaml"),
                PROFILE.replace("formats: [gguf, onnx]", "formats: [gguf, tflite]"),
            ),
        ),
        "which no export stage writes",
    ),
    Case(
        "profile budget too small for any student (1 MB)",
        lambda ws: _with(
            ws.build(),
            "--profile",
            _write(
                ws.path("small.yaml"),
                PROFILE.replace("memory_budget_mb: 480", "memory_budget_mb: 1"),
            ),
        ),
        "allows 1 MB",
    ),
    Case(
        "recipe file missing",
        lambda ws: ws.build("--recipe", str(ws.path("no.yaml"))),
        "does not exist",
    ),
    Case(
        "recipe with a misspelled key (`distill.temprature`)",
        lambda ws: _recipe(ws, "typo-recipe.yaml", "distill:\n  temprature: 4\n"),
        "unknown key 'distill.temprature'",
    ),
    Case(
        "recipe that is not YAML",
        lambda ws: _recipe(ws, "broken.yaml", "distill: [\n"),
        "not valid YAML",
    ),
    Case(
        "`--set` with a value of the wrong type (`distill.lr=fast`)",
        lambda ws: ws.build("--set", "distill.lr=fast"),
        "'distill.lr' = 'fast'",
    ),
    Case(
        "`--set` without `=`",
        lambda ws: ws.build("--set", "distill.lr"),
        "expected stage.key=value",
    ),
    Case(
        "`--set` aiming an export file outside the run (`export_gguf.quant=../../../tmp/x`)",
        lambda ws: ws.build("--set", "export_gguf.quant=../../../tmp/x"),
        "'export_gguf.quant' = '../../../tmp/x'",
    ),
    Case(
        "`--set` naming a projection ONNX int4 has no 8-bit option for "
        "(`export_onnx.int8_projections=[w_proj]`)",
        lambda ws: ws.build("--set", "export_onnx.int8_projections=[w_proj]"),
        "'export_onnx.int8_projections.0' = 'w_proj'",
    ),
    Case(
        "unknown stage (`--stages distil`)",
        lambda ws: _with(ws.build(), "--stages", "distil"),
        "unknown stage 'distil'",
    ),
    Case(
        "stage whose input was never built (`--stages export_gguf` in a new folder)",
        _stage_needs_input,
        "stage 'distill' must be built first",
    ),
    Case(
        "teacher path that does not exist",
        lambda ws: ws.build(teacher=ws.path("no-model")),
        "does not exist",
    ),
    Case(
        "teacher folder without config.json",
        lambda ws: ws.build(teacher=_teacher_copy(ws, "t-noconf", drop=("config.json",))),
        "has no config.json",
    ),
    Case(
        "teacher config.json cut short (malformed JSON)",
        _broken_config_teacher,
        "truncated or malformed",
    ),
    Case(
        "teacher with pickle weights only (pytorch_model.bin), no `--allow-pickle`",
        _pickle_teacher,
        "only pickle weights",
    ),
    Case(
        "teacher model.safetensors truncated to half",
        _truncated_safetensors,
        "model.safetensors is truncated or malformed",
    ),
    Case(
        "teacher model.safetensors with a garbage header",
        _garbage_safetensors,
        "model.safetensors is truncated or malformed",
    ),
    Case("teacher GGUF truncated to half", _truncated_gguf, "cut.gguf is truncated or malformed"),
    Case("teacher .gguf file of random bytes", _not_gguf, "random.gguf is truncated or malformed"),
    Case(
        "teacher that needs its own Python code (auto_map, custom model_type, evil.py)",
        _remote_code_teacher,
        "trust_remote_code",
        intact=_remote_code_not_run,
    ),
    Case(
        "teacher chat template that reaches for Python internals (`__subclasses__`)",
        _unsafe_template_teacher,
        "stopped by the sandbox",
    ),
    Case("student.source with pickle weights only", _pickle_student, "only pickle weights"),
    Case(
        "student.source with a different tokenizer", _other_tokenizer_student, "differ in 1 tokens"
    ),
    Case(
        "student.num_layers larger than the teacher's",
        lambda ws: ws.build("--set", "student.num_layers=9"),
        "exceeds the teacher's 4 layers",
    ),
    Case(
        "student.target_params smaller than any pruned student",
        lambda ws: ws.build("--set", "student.prune=width", "--set", "student.target_params=1000"),
        "set student.target_params to at least",
    ),
    Case(
        "student.num_attention_heads not a multiple of the teacher's KV heads",
        lambda ws: ws.build(
            "--set", "student.prune=width", "--set", "student.num_attention_heads=3"
        ),
        "does not divide over the teacher's 2 key/value heads",
    ),
    Case(
        "student.hidden_size not a multiple of the quantization block",
        lambda ws: ws.build("--set", "student.prune=width", "--set", "student.hidden_size=40"),
        "student.hidden_size=40 is not a multiple of 32",
    ),
    Case(
        "no pruned student fits the profile's memory budget",
        lambda ws: ws.build("--set", "student.prune=width", "--set", "student.budget_margin=0.999"),
        "needs memory_budget_mb of at least",
    ),
    Case(
        "student.source combined with pruning settings",
        lambda ws: ws.build(
            "--set", f"student.source={ws.teacher}", "--set", "student.prune=width"
        ),
        "student.source is given, so nothing is pruned",
    ),
    Case(
        "qat_kd asked for with a Q8_0 export",
        lambda ws: _with(ws.build("--set", "export_gguf.quant=Q8_0"), "--stages", "distill,qat_kd"),
        "qat_kd imitates llama.cpp's Q4_K_M",
    ),
    Case(
        "data file that does not exist",
        lambda ws: ws.build("--data", str(ws.path("no.jsonl"))),
        "no such file",
    ),
    Case("data file that is empty", lambda ws: _data(ws, "empty.jsonl", ""), "holds no examples"),
    Case(
        "data with a malformed JSON line",
        lambda ws: _data(ws, "bad.jsonl", '{"text": "ok"}\n{"text": \n'),
        "bad.jsonl:2: malformed JSON",
    ),
    Case(
        "data rows with neither text nor messages",
        lambda ws: _data(ws, "shape.jsonl", '{"prompt": "hi"}\n'),
        "missing both 'text' and 'messages'",
    ),
    Case(
        "data too small for a held-out slice and one batch",
        lambda ws: _data(ws, "two.jsonl", '{"text": "a"}\n{"text": "b"}\n'),
        "cannot fill one batch",
    ),
    Case(
        "run folder holding a different build (another teacher)",
        lambda ws: ws.build(teacher=_teacher_copy(ws, "t-other")),
        "holds a different build",
    ),
    Case(
        "run folder with the user's own files in it",
        _user_folder,
        "is not empty and holds no edgekd build",
        intact=_user_folder_kept,
    ),
    Case(
        "run that needs more disk than is free (9.5B teacher as a sparse file)",
        _huge_teacher,
        "GB is free",
        fast=False,
    ),
    Case(
        "artifact with one bit flipped, then `edgekd verify`",
        lambda ws: _corrupt(ws, "flip"),
        "differs: 01-distill/model/model.safetensors",
        exit_code=1,
    ),
    Case(
        "artifact deleted, then `edgekd verify`",
        lambda ws: _corrupt(ws, "delete"),
        "missing: 01-distill/model/model.safetensors",
        exit_code=1,
    ),
    Case(
        "manifest.json overwritten with garbage, then `edgekd verify`",
        lambda ws: _corrupt(ws, "manifest"),
        "is not an edgekd manifest",
    ),
    Case(
        "manifest.json deleted, then `edgekd verify`",
        lambda ws: _corrupt(ws, "no-manifest"),
        "manifest.json does not exist",
    ),
    # Non-finite numbers: no NaN model saved, exported or reported.
    Case(
        "`--set distill.lr=inf` (passes `> 0`)",
        lambda ws: ws.build("--set", "distill.lr=inf"),
        "'distill.lr' = 'inf': Input should be a finite number",
    ),
    Case(
        "profile with `memory_bandwidth_gbs: .nan`",
        lambda ws: _with(
            ws.build(),
            "--profile",
            _write(
                ws.path("nan-bw.yaml"),
                PROFILE.replace("memory_bandwidth_gbs:", "memory_bandwidth_gbs: .nan #"),
            ),
        ),
        "'memory_bandwidth_gbs' = nan: Input should be a finite number",
    ),
    Case(
        "learning rate that diverges (`distill.lr=1e30`)",
        lambda ws: ws.build(
            "--set", "distill.lr=1e30", "--set", "distill.max_steps=4", out=ws.path("diverged")
        ),
        "distill: the gradient norm became nan at step 2 of 4",
        intact=lambda ws: _diverged_not_done(ws, "diverged"),
    ),
    Case(
        "on-policy KD sampling from a student a large update broke (`distill.lr=1e15`)",
        lambda ws: ws.build(
            *set_args(["distill.lr=1e15", "distill.on_policy.fraction=1", "distill.max_steps=4"]),
            out=ws.path("diverged-on-policy"),
        ),
        "distill: the sampled model's logits became nan at step 2 of 4",
        intact=lambda ws: _diverged_not_done(ws, "diverged-on-policy"),
    ),
    Case(
        "imatrix.gguf beside the student made for another model (its tensor names)",
        lambda ws: _imatrix_beside(ws, "run-imatrix-other", {"blk.40.attn_q.weight": 64}),
        "it was made for another model",
    ),
    Case(
        "imatrix.gguf beside the student made for another model (its widths)",
        lambda ws: _imatrix_beside(
            ws,
            "run-imatrix-width",
            {f"blk.{i}.{t}.weight": 4096 for i in range(2) for t in _IMATRIX_TENSORS},
        ),
        "columns, the model's tensor",
    ),
    Case(
        "imatrix.gguf beside the student with no entries for some of its tensors",
        lambda ws: _imatrix_beside(ws, "run-imatrix-partial", {"blk.0.attn_q.weight": 64}),
        "has no entry for",
    ),
    Case(
        "imatrix.gguf beside the student that is not a GGUF imatrix",
        _imatrix_not_gguf,
        "is not a GGUF imatrix file",
    ),
    Case(
        "imatrix calibration data under one chunk (`export_gguf.imatrix_chunk_size=1000000`)",
        lambda ws: _imatrix_export(
            ws, _run_copy(ws, "run-imatrix-small"), "export_gguf.imatrix_chunk_size=1000000"
        ),
        "the imatrix needs at least one chunk",
    ),
    Case(
        "imatrix with a type the weighted search does not cover (`export_gguf.quant=Q8_0`)",
        lambda ws: _imatrix_export(ws, _run_copy(ws, "run-imatrix-q8"), "export_gguf.quant=Q8_0"),
        "edgekd's weighted search covers Q4_K_M",
    ),
    Case(
        "finished distill whose model holds NaN (marked done by an older edgekd), then its export",
        _nan_model_export,
        "holds NaN or inf, so the model is broken and is not exported",
        intact=_export_not_done,
    ),
    Case(
        "`edgekd bench` on a GGUF whose weights hold NaN",
        _nan_gguf_bench,
        "its logits on the benchmark prompt hold NaN or inf",
        fast=False,
    ),
    # Untrusted inputs: bounded templates and YAML, weights that match their config, bad files.
    Case(
        "teacher chat template with nested loops and no attribute access (the sandbox allows it)",
        lambda ws: _template_teacher(ws, "loops", NESTED_LOOPS),
        "it took more than 1,000,000 loop iterations and calls",
    ),
    Case(
        "teacher chat template that builds a 10 GB string (`'x' * 10**10`)",
        lambda ws: _template_teacher(ws, "bomb", "{{ 'x' * 10**10 }}"),
        "it would build more than 16,000,000 characters",
    ),
    Case(
        "recipe with nested YAML aliases (billion laughs, 9^9 values)",
        lambda ws: _recipe(ws, "laughs.yaml", LAUGHS + "distill:\n  lr: *i\n"),
        "its aliases (*name) expand to more than 100,000 values",
    ),
    Case(
        "profile file that is not UTF-8 (a Latin-1 byte)",
        lambda ws: _with(
            ws.build(),
            "--profile",
            _write_bytes(ws.path("latin1.yaml"), PROFILE.encode() + b"# caf\xe9\n"),
        ),
        "latin1.yaml: not UTF-8 text",
    ),
    Case(
        "teacher config.json declaring a 9.5B-parameter model over 13 MB of weights",
        _huge_config_teacher,
        "its config declares 9,521,",
    ),
    Case(
        "data file with a byte that is not UTF-8",
        lambda ws: ws.build(
            "--data",
            str(_write_bytes(ws.path("latin1.jsonl"), b'{"text": "ok"}\n{"text": "caf\xe9"}\n')),
        ),
        "latin1.jsonl:2: not UTF-8 text (byte 28",
    ),
    Case(
        "data text file with binary content (NUL bytes)",
        lambda ws: _data(ws, "binary.txt", "notes\n\n" + "\0" * 64),
        "binary.txt:3: binary content",
    ),
    Case(
        "data whose chat rows have no assistant turn (nothing to train on)",
        lambda ws: _data(
            ws,
            "prompts.jsonl",
            "".join(
                json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"}]}) + "\n"
                for i in range(40)
            ),
        ),
        "has a token to train on",
    ),
    Case(
        "`edgekd bench` on a GGUF cut to half",
        lambda ws: _bench_gguf(ws, keep=0.5),
        "llama.cpp could not load GGUF file",
    ),
    Case(
        "`edgekd bench` on a model.onnx of random bytes",
        _bench_random_onnx,
        "model.onnx is truncated or malformed",
    ),
    Case(
        "`edgekd bench` with a profile context llama.cpp cannot allocate (2,000,000,000 tokens)",
        lambda ws: _bench_gguf(
            ws,
            profile=_write(
                ws.path("huge-context.yaml"),
                PROFILE.replace("context_length: 2048", "context_length: 2000000000"),
            ),
        ),
        "allocates the whole 2000000000-token context",
    ),
    Case(
        "`edgekd eval` with a misspelt task name (edgekd_choise)",
        lambda ws: _eval_gguf(ws, "--tasks", "edgekd_choise"),
        "did you mean edgekd_choice",
    ),
    Case(
        "`edgekd eval` on a standard task whose dataset is not on this machine (arc_easy)",
        lambda ws: _eval_gguf(ws, "--tasks", "arc_easy"),
        "its dataset allenai/ai2_arc is not on this machine",
    ),
    Case(
        "`edgekd eval --limit 0`",
        lambda ws: _eval_gguf(ws, "--tasks", "edgekd_choice", "--limit", "0"),
        "scores none",
    ),
    Case(
        "`edgekd eval` on a GGUF cut to half",
        lambda ws: _eval_gguf(ws, "--tasks", "edgekd_choice", "--limit", "1", keep=0.5),
        "is truncated or malformed",
    ),
    Case(
        "`edgekd eval` on a file no runtime runs (notes.txt)",
        lambda ws: [
            "eval",
            str(_write(ws.path("notes.txt"), "not a model")),
            "--tasks",
            "edgekd_choice",
        ],
        "is neither a .gguf file",
    ),
    Case(
        "`bench.tasks` naming a task the harness does not know, before any stage runs",
        lambda ws: ws.build(
            "--stages",
            "distill,bench",
            "--set",
            "bench.tasks=[edgekd_choise]",
            out=ws.path("bench-task-run"),
        ),
        "unknown task 'edgekd_choise'",
        intact=_no_stage_started,
    ),
    # The run folder: what --out may be, its files, --force, symbolic links, verify.
    Case(
        "`--out` an existing regular file",
        _out_is_a_file,
        "is a file, not a folder",
    ),
    Case(
        "`--out` on a read-only file system",
        _out_read_only,
        "cannot write in",
        fast=False,  # needs a read-only mount where the user is root
        intact=_read_only_undone,
    ),
    Case(
        "the machine's answer cache holds a cut file for this teacher and these prompts",
        _cut_answer_cache,
        "is unreadable",
        exit_code=0,
    ),
    Case(
        "build.json in the run folder that is not JSON",
        lambda ws: _not_json(ws, "run-bad-build-json", "build.json"),
        "build.json is not valid JSON",
    ),
    Case(
        "build.json that is not JSON, with `--force`",
        lambda ws: _not_json(ws, "run-bad-build-json-force", "build.json", "--force"),
        "kept 1 file edgekd did not write: notes.txt",
        exit_code=0,
        intact=_notes_kept("run-bad-build-json-force"),
    ),
    Case(
        "a finished stage's report.json that is not JSON",
        lambda ws: _not_json(ws, "run-bad-report", "01-distill/report.json"),
        "report.json is not valid JSON",
    ),
    Case(
        "`--force` into a folder of another build (another profile) and the user's notes.txt",
        _force_other_profile,
        "kept 1 file edgekd did not write: notes.txt",
        exit_code=0,
        intact=_notes_kept("run-force"),
    ),
    Case(
        "cache/ a symbolic link to the user's folder outside the run",
        _linked_cache,
        "cache is a symbolic link",
        intact=_outside_kept("outside-cache"),
    ),
    Case(
        "a stage's .partial folder a symbolic link to the user's folder outside the run",
        _linked_partial,
        ".01-distill.partial is a symbolic link",
        intact=_outside_kept("outside-partial"),
    ),
    Case(
        "artifact replaced by a link to an identical file outside the run, then `edgekd verify`",
        _linked_artifact,
        "symbolic link",
        exit_code=1,
    ),
    Case(
        "manifest.json listing `../outside.bin`, then `edgekd verify`",
        lambda ws: _manifest_path(ws, "run-dotdot", "../outside.bin"),
        "a path that is not inside the run folder",
    ),
    Case(
        "manifest.json listing an absolute path (`/etc/hostname`), then `edgekd verify`",
        lambda ws: _manifest_path(ws, "run-absolute", "/etc/hostname"),
        "a path that is not inside the run folder",
    ),
    Case(
        "a file in a stage folder that the manifest does not list, then `edgekd verify`",
        _unlisted_file,
        "not in the manifest: 01-distill/extra.bin",
        exit_code=1,
    ),
    # The device faults: each one line after the host bench's rows, exit 2, nothing left there.
    *(
        Case(fault, args, expect, fast=False, intact=intact or _board_left_clean)
        for fault, args, expect, intact in [
            (
                "`edgekd bench --device` to a host that does not resolve "
                "(`ssh://root@board.invalid`)",
                lambda ws: _on_board(ws, "board-unreachable", host="ssh://root@board.invalid"),
                "is unreachable: its name does not resolve",
                None,
            ),
            (
                "device on a port where no SSH server listens",
                _wrong_port,
                "refused the connection: no SSH server listens on that port",
                None,
            ),
            (
                "device that refuses the SSH key (another key than its authorized one)",
                _refused_key,
                "refused the SSH key",
                None,
            ),
            (
                "device whose host key is not in known_hosts",
                _unknown_host_key,
                "its host key is not in known_hosts",
                None,
            ),
            (
                "device without Python (`device.python: /opt/nothing/python3`)",
                lambda ws: _on_board(ws, "board-no-python", python="/opt/nothing/python3"),
                "has no Python at '/opt/nothing/python3'",
                None,
            ),
            (
                "device Python without the runtime (Debian's python3: no numpy, no "
                "llama-cpp-python)",
                lambda ws: _on_board(ws, "board-no-runtime", python="/usr/bin/python3"),
                "lacks numpy, llama_cpp",
                None,
            ),
            (
                "device out of disk (its device.workdir on a 2 MB file system)",
                _board_disk,
                "is out of disk",
                _board_disk_undone,
            ),
            (
                "device out of memory (the runner's Python confined to 40 MB there: the kernel "
                "kills it)",
                _board_memory,
                "the runner was killed there",
                _board_memory_undone,
            ),
            (
                "runner killed on the device mid-run (SIGKILL)",
                _killed_on_board("runner"),
                "the runner was killed there",
                None,
            ),
            (
                "device whose profile names a llama-bench binary that is not there "
                "(`device.llama_bench: /opt/nothing/llama-bench`)",
                lambda ws: _on_board(
                    ws, "board-no-llama-bench", llama_bench="/opt/nothing/llama-bench"
                ),
                "has no executable llama-bench at '/opt/nothing/llama-bench'",
                None,
            ),
            (
                "connection to the device dropped mid-run (its sshd session killed)",
                _killed_on_board("connection"),
                "dropped while measuring",
                None,
            ),
        ]
    ),
]


# A served teacher for the cases below: llama-cpp-python's own server on the loopback, serving the
# workspace teacher's GGUF, started once at the first case that needs it and stopped at exit;
# proxies in front of it inject the faults.
_SERVED = contextlib.ExitStack()
atexit.register(_SERVED.close)
_SERVERS: dict[Path, str] = {}


def _server(ws: Workspace) -> str:
    if ws.root not in _SERVERS:
        from edgekd.formats.gguf import write_gguf

        gguf = write_gguf(ws.teacher, ws.path("served/teacher-F16.gguf"), dtype="F16")
        _SERVERS[ws.root] = _SERVED.enter_context(llama_server(gguf, alias="tiny"))
    return _SERVERS[ws.root]


def _proxy(ws: Workspace, fault: str, paths=("/v1/",)) -> str:
    proxy = FaultProxy(_server(ws), fault, paths=paths)
    _SERVED.callback(proxy.close)
    return proxy.url


def _served(ws: Workspace, url: str, *sets: str, name: str = "run-served") -> list[str]:
    """A distill build from the served teacher at `url`, the workspace teacher as the student (it
    shares the tokenizer), into its own folder."""
    return [
        *ws.build(out=ws.path(name)), "--teacher", url,
        *set_args(["teacher.model=tiny", f"student.source={ws.teacher}", "teacher.max_retries=1",
                   "logit_cache.top_k=8", *sets]),
    ]  # fmt: skip


def _served_text_rows(ws: Workspace, url: str) -> list[str]:
    """A served build on plain text rows, to which the tokenizer adds no BOS token."""
    rows = [{"text": f"the quick brown fox jumps over the lazy dog {i}"} for i in range(30)]
    text = _write(ws.path("text-rows.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    args = _served(ws, url, name="run-served-text")
    args[args.index("--data") + 1] = str(text)
    return args


def _teacher_cache(ws: Workspace, name: str, data: Path, teacher: Path | None = None) -> Path:
    """`edgekd teacher-cache` of the workspace teacher (or `teacher`, in process) for `data`."""
    out = ws.path(name)
    rc, said = run_cli(
        ["teacher-cache", "--teacher", str(teacher or ws.teacher), "--data", str(data),
         "--out", str(out), *set_args(FAST)]
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"teacher-cache failed:\n{said}")
    return out


def _cache_of_another_corpus(ws: Workspace) -> list[str]:
    other = write_chat_jsonl(ws.path("other-corpus.jsonl"), n=30)
    cache = _teacher_cache(ws, "cache-other", other)
    return _with_sets(ws, f"logit_cache.path={cache}", "distill.teacher_logits=cache")


def _cache_of_another_tokenizer(ws: Workspace) -> list[str]:
    from transformers import AutoTokenizer

    # The workspace tokenizer with one token more: other ids, another vocabulary hash.
    tok = AutoTokenizer.from_pretrained(ws.teacher)
    tok.add_tokens(["<edgekd-extra>"])
    other = save_tiny_llama(ws.path("teacher-other-tokenizer"), tok)
    cache = _teacher_cache(ws, "cache-other-tokenizer", ws.data, teacher=other)
    return _with_sets(ws, f"logit_cache.path={cache}", "distill.teacher_logits=cache")


def _cache_with_a_cut_shard(ws: Workspace) -> list[str]:
    cache = _teacher_cache(ws, "cache-cut", ws.data)
    shard = cache / "shard-00000.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    return _with_sets(ws, f"logit_cache.path={cache}", "distill.teacher_logits=cache")


def _with_sets(ws: Workspace, *sets: str) -> list[str]:
    return [*ws.build(out=ws.path("run-cache")), *set_args(list(sets))]


SERVED_CASES = [
    Case(
        "served teacher down (nothing listens on the port)",
        lambda ws: _served(ws, f"http://127.0.0.1:{free_port()}/v1"),
        "cannot be reached for the model list",
        fast=False,
    ),
    Case(
        "served teacher refusing the API key (HTTP 401)",
        lambda ws: _served(ws, _proxy(ws, "401")),
        "with HTTP 401",
        fast=False,
    ),
    Case(
        "served teacher too slow (answers after teacher.timeout_s)",
        lambda ws: _served(ws, _proxy(ws, "stall"), "teacher.timeout_s=1", "teacher.max_retries=0"),
        "did not answer the model list (GET /models) within teacher.timeout_s=1 s",
        fast=False,
    ),
    Case(
        "served teacher answering HTTP 500 on every retry",
        lambda ws: _served(ws, _proxy(ws, "500")),
        "with HTTP 500",
        fast=False,
    ),
    Case(
        "served teacher answering malformed JSON",
        lambda ws: _served(ws, _proxy(ws, "malformed")),
        "malformed JSON",
        fast=False,
    ),
    Case(
        "served teacher: teacher.model names a model the server does not serve",
        lambda ws: _served(ws, _server(ws), "teacher.model=llama-70b"),
        "teacher.model=llama-70b is not served at",
        fast=False,
    ),
    Case(
        "served teacher without prompt log-probs (completions answer 404): trains on labels",
        lambda ws: _served(ws, _proxy(ws, "404", paths=("/v1/completions",))),
        "returns no prompt log-probs",
        exit_code=0,
        fast=False,
    ),
    Case(
        "served teacher giving fewer top log-probs with a generation than logit_cache.top_k: "
        "its answers are scored in a second pass",
        lambda ws: _served(
            ws,
            _proxy(ws, "cap:4"),
            "data.regenerate=true",
            "data.generation.max_tokens=4",
            name="run-served-capped",
        ),
        "fewer than logit_cache.top_k=8: its answers are scored in a second pass",
        exit_code=0,
        fast=False,
    ),
    Case(
        "served teacher refusing more log-probs than its cap (HTTP 400, vLLM's --max-logprobs)",
        lambda ws: _served(ws, _proxy(ws, "max:4")),
        "logit_cache.top_k=8: the teacher server at",
        fast=False,
    ),
    Case(
        "served teacher without log-probs for generations, text rows without a leading BOS "
        "(the echo's pairing cannot be found)",
        lambda ws: _served_text_rows(ws, _proxy(ws, "nogen")),
        "do not start with the tokenizer's BOS token",
        fast=False,
    ),
    Case(
        "served teacher: the API key variable teacher.api_key_env is not set",
        lambda ws: _served(ws, _server(ws), "teacher.api_key_env=EDGEKD_NO_SUCH_KEY"),
        "teacher.api_key_env=EDGEKD_NO_SUCH_KEY: that environment variable is not set",
        fast=False,
    ),
    Case(
        "logit_cache.path: a cache made by `edgekd teacher-cache` for another corpus",
        _cache_of_another_corpus,
        "was made for another training corpus",
        fast=False,
    ),
    Case(
        "logit_cache.path: a cache made by `edgekd teacher-cache` with another tokenizer",
        _cache_of_another_tokenizer,
        "was made for another tokenizer",
        fast=False,
    ),
    Case(
        "logit_cache.path: a cache whose shard was cut short in the copy",
        _cache_with_a_cut_shard,
        "truncated or replaced",
        fast=False,
    ),
]
CASES += SERVED_CASES


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path; the lock file (who last held the
    folder) and the build log (the libraries' messages, appended to) change with every build that
    reaches the folder and are no part of the build."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder) not in (Path(LOCK), Path(BUILD_LOG))
    }


def make_workspace(root: Path, cli=None, teacher: Path | None = None) -> Workspace:
    """The tiny teacher (real SmolLM2 tokenizer, random 4-layer Llama) unless given, a chat corpus
    and a finished distill run built through the command line."""
    if teacher is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(save_embedded_tokenizer(root / "tokenizer"))
        teacher = save_tiny_llama(root / "teacher", tok, num_layers=4)
    ws = Workspace(root, teacher, write_chat_jsonl(root / "chat.jsonl"), root / "run")
    rc, out = (cli or run_cli)(ws.build())
    if rc != 0:
        raise RuntimeError(f"the base run failed:\n{out}")
    return ws


def run_cli(args: list[str]) -> tuple[int, str]:
    """The real command line in a child process: exit code and output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    proc = subprocess.run(
        [sys.executable, "-m", "edgekd.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    return proc.returncode, proc.stdout + proc.stderr


@dataclass
class Row:
    fault: str
    said: str
    exit_code: int
    intact: str


def said(output: str, expect: str) -> str:
    """The line of the output that holds `expect` (the whole output if none does)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return next((line for line in lines if expect in line), " / ".join(lines[-3:]))


def run_case(case: Case, ws: Workspace, cli=run_cli) -> Row:
    """Run one case; raise AssertionError if edgekd said the wrong thing or lost anything."""
    before = snapshot(ws.run)
    rc, output = cli(case.args(ws))
    line = said(output, case.expect)
    assert rc == case.exit_code, f"{case.fault}: exit {rc}, expected {case.exit_code}:\n{output}"
    assert case.expect in line, f"{case.fault}: expected {case.expect!r} in:\n{output}"
    assert "Traceback" not in output, f"{case.fault}: a traceback reached the user:\n{output}"
    assert snapshot(ws.run) == before, f"{case.fault}: the finished run changed"
    intact = f"finished run unchanged ({len(before)} files, same sha256)"
    if case.intact is not None:
        intact += f"; {case.intact(ws)}"
    return Row(case.fault, line.replace(str(ws.root), "<tmp>"), rc, intact)


def markdown(rows: list[Row]) -> str:
    head = [
        "# Reliability: bad inputs and faults",
        "",
        "Generated by `python scripts/reliability_table.py` (do not edit by hand): each row ran",
        "the real `edgekd` command line on tiny models in a temporary folder, beside a finished",
        "distill run whose files were hashed before and after the case. The SIGKILL rows kill",
        "`edgekd build` when the run folder (or the live progress) shows it at that point, then",
        "run it again; tests/test_reliability.py asserts the same.",
        "",
        f"{len(rows)} cases.",
        "",
        "| # | bad input or fault | what edgekd said | exit | nothing lost |",
        "|---|---|---|---|---|",
    ]
    body = [
        f"| {i} | {r.fault} | `{r.said.replace('|', '/')}` | {r.exit_code} | {r.intact} |"
        for i, r in enumerate(rows, 1)
    ]
    return "\n".join(head + body) + "\n"


def _resumed(fault: str, run: Path, out: str, expect: str, kept: str) -> Row:
    """The row of a kill case, after its rerun finished: nothing cut short survived."""
    from edgekd.verify import verify

    assert_no_leftovers(run)
    checked, findings = verify(run)
    assert not findings, findings
    intact = f"{kept}; rerun exit 0, `edgekd verify`: all {checked} artifacts match"
    line = " ".join(said(out, expect).replace("━", " ").split()).replace(str(run.parent), "<tmp>")
    return Row(fault, f"(rerun) {line}", 0, intact)


def _kill_args(ws: Workspace, stages: str, extra: list[str], data: bool = True) -> list[str]:
    args = ["--teacher", str(ws.teacher), "--stages", stages, *set_args([*FAST, *extra])]
    return [*args, "--data", str(ws.data)] if data else args


def kill_generation(ws: Workspace) -> Row:
    run = ws.path("kill-generation")
    args = _kill_args(
        ws, "distill", ["data.num_prompts=32", "data.generation.max_tokens=32"], data=False
    )
    build = Build(run, args, live=True)
    build.kill_when(
        lambda: (run / ".01-distill.partial").is_dir() and "Teacher answers" in build.output
    )
    assert not list((run / "cache").glob("corpus-*")), "a cut-short corpus looks complete"
    assert_killed_stage_not_done(run, "distill")
    out = Build(run, args).finish()
    kept = "no corpus file and no distill marker after the kill; the rerun answered every prompt"
    return _resumed("SIGKILL during teacher generation", run, out, "Teacher answers", kept)


def kill_training(ws: Workspace) -> Row:
    run = ws.path("kill-training")
    args = _kill_args(ws, "distill", ["distill.max_steps=30", "distill.checkpoint_every=3"])
    build = Build(run, args)
    build.kill_when((run / ".01-distill.partial" / "checkpoint" / "progress.json").exists)
    assert_killed_stage_not_done(run, "distill")
    out = Build(run, args).finish()
    kept = "distill not marked done after the kill; the rerun resumed from its last checkpoint"
    return _resumed(
        "SIGKILL mid-training (distill)", run, out, "resuming from the checkpoint", kept
    )


def kill_export(ws: Workspace, stage: str, seen: str, expect: str) -> Row:
    run = ws.path(f"kill-{stage}")
    shutil.copytree(ws.run, run)
    args = _kill_args(ws, "export_gguf,export_onnx", [])
    distill = marker(run, "distill")
    build = Build(run, args)
    build.kill_when(partial_holds_file(run, stage, seen))
    assert_killed_stage_not_done(run, stage)
    out = Build(run, args).finish()
    assert marker(run, "distill") == distill
    kept = f"{stage} neither marked done nor in manifest.json after the kill; distill reused"
    return _resumed(f"SIGKILL during {stage} (`{seen}` being written)", run, out, expect, kept)


# The run folder: a second build, another build's checkpoint, a full disk, SIGINT.


def _line(out: str, expect: str, root: Path) -> str:
    return " ".join(said(out, expect).split()).replace(str(root), "<tmp>")


def second_build(ws: Workspace) -> Row:
    run = ws.path("locked")
    args = _kill_args(ws, "distill", ["distill.max_steps=150"])
    first = Build(run, args)
    first.wait_for(lambda: "distill: step 1/" in first.output)
    second = Build(run, args).fail()
    assert first.proc.poll() is None, "the first build ended before the second was refused"
    expect = f"is in use by another edgekd build (pid {first.proc.pid}, started"
    assert expect in second and "Traceback" not in second, second
    first.finish()
    line = _line(second, "is in use", ws.root).replace(str(first.proc.pid), "<pid>")
    line = re.sub(r"started [^)]*\)", "started <time>: <its command line>)", line)
    intact = "the first build went on and finished (exit 0); the second did nothing"
    return Row("a second `edgekd build` into a run folder while the first runs", line, 2, intact)


def foreign_checkpoint(ws: Workspace) -> Row:
    run = ws.path("foreign-checkpoint")
    steps = ["distill.max_steps=30", "distill.checkpoint_every=3"]
    ours = _kill_args(ws, "distill", steps)
    theirs = _kill_args(ws, "distill", [*steps, "distill.lr=3e-5"])
    checkpoint = run / ".01-distill.partial" / "checkpoint"
    written = (checkpoint / PROGRESS).exists
    Build(run, theirs).kill_when(written)
    shutil.move(checkpoint, ws.path("their-checkpoint"))
    Build(run, ours).kill_when(written)
    shutil.rmtree(checkpoint)
    shutil.move(ws.path("their-checkpoint"), checkpoint)
    out = Build(run, ours).finish()
    expect = "was made with other settings"
    assert expect in out and "resuming from the checkpoint" not in out, out
    fault = "a partial folder holding another build's checkpoint (other `distill.lr`)"
    line = _line(out, expect, ws.root)
    return Row(fault, line, 0, "trained from step 0 with its own settings; exit 0")


def _verified(run: Path) -> str:
    """Nothing cut short left in `run`, and every artifact matches its manifest."""
    from edgekd.verify import verify

    assert_no_leftovers(run)
    checked, findings = verify(run)
    assert not findings, findings
    return f"`edgekd verify`: all {checked} artifacts match"


def disk_fills(ws: Workspace) -> Row:
    mount = ws.path("small-disk")
    args = _kill_args(ws, "distill", ["distill.max_steps=20", "distill.checkpoint_every=1"])
    with tmpfs(mount, 300):  # OSError, saying why, where tmpfs cannot be mounted
        run = mount / "run"
        build = Build(run, args)
        build.wait_for(lambda: "distill: running in" in build.output)
        filler = fill(mount)
        out = build.fail()
        assert "Traceback" not in out, out
        assert_killed_stage_not_done(run, "distill")
        filler.unlink()
        Build(run, args).finish()
        intact = f"distill not marked done; space freed, the rerun exit 0, {_verified(run)}"
    fault = "the disk fills during a stage (a 300 MB tmpfs, filled once the stage runs)"
    return Row(fault, _line(out, "disk full", ws.root), 2, intact)


def interrupted(ws: Workspace) -> Row:
    run = ws.path("interrupted")
    args = _kill_args(ws, "distill", ["distill.max_steps=200", "distill.checkpoint_every=3"])
    build = Build(run, args)
    code = build.interrupt_when((run / ".01-distill.partial" / "checkpoint" / PROGRESS).exists)
    assert code == 130 and "Traceback" not in build.output, build.output
    assert_killed_stage_not_done(run, "distill")
    out = Build(run, args).finish()
    assert "resuming from the checkpoint" in out, out
    line = _line(build.output, "(SIGINT)", ws.root).split("resume:")[0] + "resume: <command>"
    intact = f"distill not marked done; the rerun resumed from its checkpoint, {_verified(run)}"
    return Row("SIGINT (Ctrl-C) mid-training", line, 130, intact)


KILLS = [
    kill_generation,
    kill_training,
    lambda ws: kill_export(ws, "export_gguf", ".gguf", "export_gguf: running"),
    lambda ws: kill_export(ws, "export_onnx", "fp32", "export_gguf: up to date"),
    second_build,
    foreign_checkpoint,
    disk_fills,
    interrupted,
]


def kept_rows(doc: Path) -> tuple[dict[str, Row], list[Row]]:
    """The rows of a table written earlier: the cases' rows by fault, and the kill rows (its
    last ones, written after every case)."""
    row = re.compile(r"^\| \d+ \| (.*) \| `(.*)` \| (-?\d+) \| (.*) \|$")
    rows = [
        Row(m[1], m[2], int(m[3]), m[4]) for m in map(row.match, doc.read_text().splitlines()) if m
    ]
    return {r.fault: r for r in rows[: len(rows) - len(KILLS)]}, rows[len(rows) - len(KILLS) :]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability.md")
    ap.add_argument("--fast", action="store_true", help="only the cases the test runs")
    ap.add_argument(
        "--only", metavar="TEXT", help="run the cases whose fault contains TEXT; write nothing"
    )
    ap.add_argument(
        "--keep",
        action="store_true",
        help="reuse the rows of --out for cases it already holds (and still says what they "
        "expect) and its kill rows; run only the new cases",
    )
    args = ap.parse_args()
    kept, kill_rows = kept_rows(args.out) if args.keep else ({}, [])
    with tempfile.TemporaryDirectory(prefix="edgekd-reliability-") as tmp:
        ws = make_workspace(Path(tmp))
        rows = []
        for case in CASES:
            if (args.fast and not case.fast) or (args.only and args.only not in case.fault):
                continue
            old = kept.get(case.fault)
            rows.append(old if old and case.expect in old.said else run_case(case, ws))
            print(f"{len(rows):2d}. {case.fault}: {rows[-1].said}", flush=True)
        for kill in [] if args.fast or args.only or kill_rows else KILLS:
            rows.append(kill(ws))
            print(f"{len(rows):2d}. {rows[-1].fault}: {rows[-1].said}", flush=True)
        rows += [] if args.fast or args.only else kill_rows
    if args.only:
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows))
    print(f"{len(rows)} cases written to {args.out}")


if __name__ == "__main__":
    main()
