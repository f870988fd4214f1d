"""The one table of supported architectures: the planner, the exporters and QAT agree with it."""

import pytest
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from edgekd import architectures, models
from edgekd.errors import EdgekdError
from edgekd.formats import gguf as gguf_format
from edgekd.plan import check_architecture
from edgekd.quant.gguf_k import q4_k_m_types

SMALL = {"vocab_size": 64, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2}
CONFIGS = {
    "llama": LlamaConfig(**SMALL, num_attention_heads=4),
    "mistral": MistralConfig(**SMALL, num_attention_heads=4),
    "qwen2": Qwen2Config(**SMALL, num_attention_heads=4),
    "qwen3": Qwen3Config(**SMALL, num_attention_heads=4, head_dim=64),
}


def test_every_entry_has_a_config_here():
    assert {a.model_type for a in architectures.ARCHITECTURES} == set(CONFIGS)


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_sizing_gguf_and_qat_follow_the_table(model_type):
    config = CONFIGS[model_type]
    entry = architectures.of(config)
    assert entry.model_type == model_type
    assert models.param_count(config) > 0  # every entry is sized
    if entry.supports("gguf"):
        assert gguf_format._architecture(config) is entry
    else:
        with pytest.raises(EdgekdError, match="GGUF export does not support it"):
            gguf_format._architecture(config)
    if entry.supports("qat"):
        assert q4_k_m_types(config)
    else:
        with pytest.raises(EdgekdError, match="qat_kd does not know"):
            q4_k_m_types(config)


def test_the_hf_class_decides_when_the_config_names_one():
    config = LlamaConfig(**SMALL, architectures=["MistralForCausalLM"])
    assert architectures.of(config).model_type == "mistral"
    config = LlamaConfig(**SMALL, architectures=["LlamaForSequenceClassification"])
    assert architectures.of(config) is None


def test_plan_refuses_a_stage_the_architecture_lacks_in_one_line():
    qwen3 = CONFIGS["qwen3"]
    check_architecture(qwen3, ["distill", "qlora", "export_onnx", "bench"])
    with pytest.raises(EdgekdError) as err:
        check_architecture(qwen3, ["distill", "export_gguf", "bench"])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("model_type 'qwen3' (Qwen3ForCausalLM): the GGUF export")
    assert "supported are llama, mistral, qwen2)" in message
    with pytest.raises(EdgekdError, match="qat_kd does not know .*set qat_kd.enabled=false"):
        check_architecture(qwen3, ["distill", "qat_kd", "export_gguf"])
