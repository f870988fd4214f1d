"""Shared fixtures: the real SmolLM2 tokenizer (from the embedded GGUF) and tiny Llama models."""

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from edgekd.models import load_tokenizer, resolve_source

# Tiny models gain nothing from threads, and OpenMP threads fighting over two shared cores make a
# tiny forward pass 30 times slower; subprocesses the tests start inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The embedded teacher's tokenizer, saved as tokenizer.json alone (no tokenizer.model)."""
    tok = load_tokenizer(resolve_source("embedded", role="teacher"))
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    (out / "tokenizer.model").unlink(missing_ok=True)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def tiny_llama_config(tokenizer, num_layers: int = 2, hidden: int = 64) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def save_tiny_llama(path: Path, tokenizer, num_layers: int = 2, hidden: int = 64, seed: int = 0):
    """A random tiny Llama with the real tokenizer, saved in HF layout (safetensors)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, num_layers, hidden))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "tokenizer.model").unlink(missing_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tokenizer) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("teacher"), tokenizer, num_layers=4)


def write_chat_jsonl(path: Path, n: int = 40) -> Path:
    """A small chat corpus in JSONL, enough for a held-out split and a few training steps."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i + 1}?"},
                {"role": "assistant", "content": f"{i} plus {i + 1} is {2 * i + 1}."},
            ]
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def chat_jsonl(tmp_path) -> Path:
    return write_chat_jsonl(tmp_path / "chat.jsonl")
