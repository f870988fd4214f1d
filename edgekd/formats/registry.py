"""Every runtime edgekd runs models in, by name, and which one a path needs."""

from __future__ import annotations

from pathlib import Path

from edgekd.errors import EdgekdError
from edgekd.formats.hf_torch import HfTorch
from edgekd.formats.llama_cpp import LlamaCpp
from edgekd.formats.ort import MODEL, Ort
from edgekd.formats.ort_genai import OrtGenai
from edgekd.formats.runtime import Runtime

# In the order a path is matched: a genai folder holds a model.onnx too, and an ONNX folder may
# hold a config.json.
RUNTIMES: dict[str, type[Runtime]] = {r.name: r for r in (LlamaCpp, OrtGenai, Ort, HfTorch)}


def runtime_class(name: str) -> type[Runtime]:
    """The runtime called `name`."""
    if name not in RUNTIMES:
        raise EdgekdError(f"unknown runtime {name!r}; one of {', '.join(RUNTIMES)}")
    return RUNTIMES[name]


def runtime_of(path: Path) -> str:
    """The name of the runtime an artifact runs in, from what the path holds."""
    path = Path(path)
    for runtime in RUNTIMES.values():
        if runtime.holds(path):
            return runtime.name
    raise EdgekdError(
        f"{path} is neither a .gguf file, a folder with {MODEL}, nor a model folder with "
        "config.json; pass one of those"
    )


def open_runtime(path: Path, *, threads: int, n_ctx: int = 0, tokenizer=None) -> Runtime:
    """The runtime for `path`, opened (nothing loaded yet); see `Runtime`."""
    return runtime_class(runtime_of(path))(path, threads=threads, n_ctx=n_ctx, tokenizer=tokenizer)
