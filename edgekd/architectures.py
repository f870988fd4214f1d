"""The model architectures edgekd supports, and which parts of a build support each.

The one list: the planner (sizing from a config), the GGUF exporter, the ONNX exporter and QAT
(llama.cpp's Q4_K_M types) read it, and the planner refuses a build whose stages need what the
student's architecture lacks before any work.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from edgekd.errors import EdgekdError


@dataclass(frozen=True)
class Architecture:
    """One Hugging Face decoder architecture and what edgekd can do with it. Every entry is a
    Llama-family decoder that models.param_count and the GGUF size estimate can size."""

    model_type: str  # config.model_type
    hf_class: str  # config.architectures[0]
    name: str  # for messages
    gguf_arch: gguf.MODEL_ARCH | None  # what the GGUF writer writes it as; None: no GGUF export
    onnx: bool  # the ONNX export (through optimum-onnx, which checks again)
    qat: bool  # qat_kd's fake quantization knows llama.cpp's tensor types for it

    def supports(self, feature: str) -> bool:
        """Whether `feature` (a key of FEATURES) handles this architecture."""
        return {
            "plan": True,
            "gguf": self.gguf_arch is not None,
            "onnx": self.onnx,
            "qat": self.qat,
        }[feature]


ARCHITECTURES = (
    Architecture("llama", "LlamaForCausalLM", "Llama", gguf.MODEL_ARCH.LLAMA, onnx=True, qat=True),
    # llama.cpp runs Mistral checkpoints as its llama architecture (as its converter does).
    Architecture(
        "mistral", "MistralForCausalLM", "Mistral", gguf.MODEL_ARCH.LLAMA, onnx=True, qat=True
    ),
    Architecture("qwen2", "Qwen2ForCausalLM", "Qwen2", gguf.MODEL_ARCH.QWEN2, onnx=True, qat=True),
    # Its per-head q/k norms are sized, but the GGUF writer and QAT do not handle them yet.
    Architecture("qwen3", "Qwen3ForCausalLM", "Qwen3", None, onnx=True, qat=False),
)
# Each feature: what refuses, and what the user can do instead.
FEATURES = {
    "plan": ("edgekd cannot size it from its config", "use a model of a supported type"),
    "gguf": (
        "the GGUF export does not support it",
        "use a student of a supported architecture or drop 'gguf' from the profile's formats",
    ),
    "onnx": (
        "the ONNX export does not support it",
        "use a student of a supported architecture or drop 'onnx' from the profile's formats",
    ),
    "qat": (
        "qat_kd does not know llama.cpp's Q4_K_M types for it",
        "set qat_kd.enabled=false or use a student of a supported architecture",
    ),
}


def of(config) -> Architecture | None:
    """The entry for a model config: by its HF class when it names one, else by model_type."""
    if config.architectures:
        return next((a for a in ARCHITECTURES if a.hf_class == config.architectures[0]), None)
    return next((a for a in ARCHITECTURES if a.model_type == config.model_type), None)


def supported(feature: str) -> list[str]:
    """The model_types that support `feature` ('plan', 'gguf', 'onnx' or 'qat')."""
    return [a.model_type for a in ARCHITECTURES if a.supports(feature)]


def check(config, feature: str) -> Architecture:
    """The config's entry; EdgekdError in one line unless it supports `feature`."""
    arch = of(config)
    if arch is None or not arch.supports(feature):
        hf_class = (config.architectures or [arch.hf_class if arch else ""])[0]
        named = f" ({hf_class})" if hf_class else ""
        refusal, instead = FEATURES[feature]
        raise EdgekdError(
            f"model_type {config.model_type!r}{named}: {refusal} (supported are "
            f"{', '.join(supported(feature))}); {instead}"
        )
    return arch
