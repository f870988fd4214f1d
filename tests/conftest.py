"""Shared fixtures: the real SmolLM2 tokenizer (from the embedded GGUF) and tiny Llama models,
built by edgekd.testing (which scripts/reliability_table.py shares)."""

import os
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from edgekd.formats.gguf import write_gguf
from edgekd.testing import (
    save_embedded_tokenizer,
    save_tiny_llama,
    save_tiny_qwen2_without_bos,
    sshd,
    write_chat_jsonl,
)

# Tiny models gain nothing from threads, and OpenMP threads fighting over two shared cores make a
# tiny forward pass 30 times slower; subprocesses the tests start inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
# The machine-wide answer cache is never the user's: session fixtures get this one, each test its
# own (below).
os.environ["EDGEKD_CACHE"] = tempfile.mkdtemp(prefix="edgekd-test-cache-")


@pytest.fixture(autouse=True)
def _own_answer_cache(tmp_path, monkeypatch):
    """Each test its own machine-wide answer cache: none reuses another's teacher answers."""
    monkeypatch.setenv("EDGEKD_CACHE", str(tmp_path / "edgekd-cache"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The embedded teacher's tokenizer, saved as tokenizer.json alone (no tokenizer.model)."""
    return save_embedded_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tokenizer) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("teacher"), tokenizer, num_layers=4)


@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    """A tiny tied Llama (HF folder) and its F16 GGUF."""
    root = tmp_path_factory.mktemp("tiny-model")
    folder = save_tiny_llama(root / "model", tokenizer, num_layers=2)
    return folder, write_gguf(folder, root / "model-F16.gguf", dtype="F16")


@pytest.fixture(scope="session")
def no_bos_gguf(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    """A tiny Qwen2-style model whose tokenizer has no BOS token (HF folder) and its F16 GGUF."""
    root = tmp_path_factory.mktemp("no-bos")
    folder = save_tiny_qwen2_without_bos(root / "model", tokenizer)
    return folder, write_gguf(folder, root / "model-F16.gguf", dtype="F16")


@pytest.fixture
def chat_jsonl(tmp_path) -> Path:
    return write_chat_jsonl(tmp_path / "chat.jsonl")


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny_llama_gguf):
    """The tiny Llama exported to ONNX (fp32)."""
    from edgekd.formats.onnx import export_onnx

    return export_onnx(tiny_llama_gguf[0], tmp_path_factory.mktemp("tiny-onnx") / "fp32")


@pytest.fixture(scope="session")
def ssh_server(tmp_path_factory):
    """A real OpenSSH server on 127.0.0.1 with throwaway keys: the stand-in for a board."""
    with sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def _llama_tool(name: str) -> Path:
    binary = Path(os.environ.get("EDGEKD_LLAMA_TOOLS", "/nonexistent")) / name
    if not os.access(binary, os.X_OK):
        pytest.skip(
            f"no {name}: run `export EDGEKD_LLAMA_TOOLS=$(scripts/build_llama_tools.sh)` "
            "(cmake and a C++ compiler; several minutes) before pytest"
        )
    return binary


@pytest.fixture(scope="session")
def llama_bench_bin() -> Path:
    """llama.cpp's llama-bench, built by scripts/build_llama_tools.sh (`.ci/run` builds it and
    sets EDGEKD_LLAMA_TOOLS to its folder)."""
    return _llama_tool("llama-bench")


@pytest.fixture(scope="session")
def llama_quantize_bin() -> Path:
    """llama.cpp's llama-quantize, built beside llama-bench."""
    return _llama_tool("llama-quantize")
