"""GGUF: write a Hugging Face folder with gguf-py and quantize it with llama.cpp (the llama.cpp
runtime that runs the files is formats/llama_cpp.py).

The writer follows llama.cpp's own converter (convert_hf_to_gguf.py): the same metadata keys,
tensor names (gguf's TensorNameMap), q/k row order and tokenizer fields. It refuses what it
cannot write faithfully, and proves the tokenizer by tokenizing probe texts in llama.cpp itself.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from edgekd import architectures
from edgekd.architectures import Architecture
from edgekd.atomic import atomic_path
from edgekd.errors import EdgekdError
from edgekd.formats.llama_cpp import LlamaCpp

_DTYPES = {
    "F32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "F16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "BF16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
_QUANT_FTYPES = {
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
}

# llama.cpp names a BPE pre-tokenizer by the sha256 of the token ids of this text
# (convert_hf_to_gguf.py, get_vocab_base_pre); the hashes below are from its table.
_PRE_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_BY_HASH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5/2/2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM 1/2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
# tokenizer.json pre_tokenizer configs whose llama.cpp equivalent is exact. Checked before the
# hash: a tokenizer rebuilt from a GGUF by transformers keeps SmolLM's hash but drops its
# Digits step, and llama.cpp's 'gpt-2' (not 'smollm') is what tokenizes like it.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
_PRE_BY_CONFIG = {
    (("ByteLevel", True, False),): "gpt-2",
    (("Digits", True), ("ByteLevel", True, False)): "smollm",
    (("Split", _LLAMA3_REGEX), ("ByteLevel", False, False)): "llama-bpe",
    (("Split", _QWEN2_REGEX), ("ByteLevel", False, False)): "qwen2",
}

# Texts the exported tokenizer must split exactly as the Hugging Face one does.
_PROBE_TEXTS = (
    _PRE_CHECK_TEXT,
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Numbers: 7 42 1234567 3.14159 1,000,000 -0.5e-10 ½ ² ① ٣ ８",
    "   leading, trailing and   inner   runs of spaces   ",
    "tabs\tand\nnewlines\n\n\nand\r\nwindows line ends",
    "café naïve résumé — “quotes” ‘single’ … ñ ü ß ø",
    "中文文本，日本語のテキスト、한국어 텍스트",
    "Кириллица, ελληνικά, العربية, עברית, हिन्दी",
    "Emoji 🚀🦙 👍🏽 👨\u200d👩\u200d👧",
    "def f(x):\n    return x ** 2  # square\n\n\tprint(f(3))",
    "URL https://example.com/a?b=1&c=two#d and mail a.b@c.org",
    "!!!???...,,,;;;:::---===+++***",
    "CamelCaseWords snake_case_words SHOUTING",
)
_PROBE_CHAT = [
    {"role": "user", "content": "What is 12 plus 30?"},
    {"role": "assistant", "content": "12 plus 30 is 42."},
]


def _architecture(config) -> Architecture:
    return architectures.check(config, "gguf")


def _rope_type(config) -> str:
    scaling = getattr(config, "rope_scaling", None) or {}
    return scaling.get("rope_type", scaling.get("type")) or "default"


def _check_config(config, arch: Architecture) -> None:
    rope = _rope_type(config)
    allowed = {"default", "linear"} | (
        {"llama3"} if arch.gguf_arch == gguf.MODEL_ARCH.LLAMA else set()
    )
    if rope not in allowed:
        raise EdgekdError(
            f"config rope_scaling type {rope!r} ({arch.hf_class}) has no exact llama.cpp "
            f"equivalent in edgekd's GGUF writer (supported: {', '.join(sorted(allowed))})"
        )
    if getattr(config, "mlp_bias", False):
        raise EdgekdError(
            f"config mlp_bias=true ({arch.hf_class}) is not supported by llama.cpp's "
            f"{arch.hf_class}"
        )
    if getattr(config, "use_sliding_window", False):
        raise EdgekdError(
            f"config use_sliding_window=true ({arch.hf_class}) is not supported by llama.cpp's "
            "qwen2; set it to false"
        )


def _tokenizer_json(tokenizer) -> dict:
    if not getattr(tokenizer, "is_fast", False):
        raise EdgekdError(
            f"tokenizer {type(tokenizer).__name__} has no tokenizer.json (not a fast tokenizer); "
            "save the model folder with a tokenizer.json"
        )
    return json.loads(tokenizer.backend_tokenizer.to_str())


def _steps(node: dict | None, key: str) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [s for child in node[key] for s in _steps(child, key)]
    return [node]


def _pre_signature(pre: dict | None) -> tuple:
    sig = []
    for step in _steps(pre, "pretokenizers"):
        kind = step["type"]
        if kind == "ByteLevel":
            sig.append((kind, step.get("use_regex", True), step.get("add_prefix_space", False)))
        elif kind == "Digits":
            sig.append((kind, step.get("individual_digits", False)))
        elif kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            sig.append((kind, step["pattern"].get("Regex")))
        else:
            sig.append((kind, json.dumps(step, sort_keys=True)))
    return tuple(sig)


def _pre_type(tokenizer, tok_json: dict) -> str:
    """llama.cpp's name for this BPE pre-tokenizer: from its config, else llama.cpp's hash."""
    normalizers = _steps(tok_json.get("normalizer"), "normalizers")
    if all(n["type"] == "NFC" for n in normalizers):
        by_config = _PRE_BY_CONFIG.get(_pre_signature(tok_json.get("pre_tokenizer")))
        if by_config:
            return by_config
    # The table's hashes include the BOS some tokenizers add; pre-tokenization does not.
    for specials in (True, False):
        ids = tokenizer.encode(_PRE_CHECK_TEXT, add_special_tokens=specials)
        found = _PRE_BY_HASH.get(hashlib.sha256(str(ids).encode()).hexdigest())
        if found:
            return found
    kinds = [s["type"] for s in _steps(tok_json.get("pre_tokenizer"), "pretokenizers")]
    raise EdgekdError(
        f"tokenizer pre-tokenizer {kinds} (normalizer {[n['type'] for n in normalizers]}) "
        "matches none llama.cpp implements exactly (known: llama-bpe, qwen2, smollm, gpt-2, "
        "tekken, deepseek-r1-qwen); use the teacher's tokenizer unchanged"
    )


def _tokenizer_kind(tok_json: dict) -> None:
    model = tok_json["model"]["type"]
    pre = [s["type"] for s in _steps(tok_json.get("pre_tokenizer"), "pretokenizers")]
    if model == "BPE" and "ByteLevel" in pre:
        return
    # Llama 2 style: Metaspace, or a normalizer that writes '▁' before byte-fallback BPE.
    if "Metaspace" in pre or model == "Unigram" or tok_json["model"].get("byte_fallback"):
        raise EdgekdError(
            f"tokenizer.json is a SentencePiece-style {model} tokenizer (pre-tokenizer {pre}); "
            "edgekd writes byte-level BPE tokenizers only (Llama 3, Qwen2, SmolLM, Mistral Nemo)"
        )
    raise EdgekdError(
        f"tokenizer.json model {model!r} with pre-tokenizer {pre} cannot be written as GGUF; "
        "use a byte-level BPE tokenizer (Llama 3, Qwen2, SmolLM, Mistral Nemo)"
    )


def _added_specials(tokenizer) -> tuple[bool, bool]:
    """Whether tokenizer(text) adds BOS in front / EOS behind, measured rather than read."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    starts = [i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain]
    prefix = full[: starts[0]] if starts else full
    suffix = full[starts[0] + len(plain) :] if starts else []
    if prefix not in ([], [tokenizer.bos_token_id]) or suffix not in ([], [tokenizer.eos_token_id]):
        raise EdgekdError(
            f"tokenizer adds {prefix} before and {suffix} after the text; "
            "GGUF can only record adding the BOS and/or EOS token"
        )
    return bool(prefix), bool(suffix)


@dataclass(frozen=True)
class _Vocab:
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    add_bos: bool
    add_eos: bool


def _vocab(tokenizer, vocab_size: int) -> _Vocab:
    tok_json = _tokenizer_json(tokenizer)
    _tokenizer_kind(tok_json)
    pre = _pre_type(tokenizer, tok_json)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise EdgekdError(
            f"tokenizer has token id {max(by_id)} but config vocab_size is {vocab_size}; "
            "resize the model's embeddings to the tokenizer"
        )
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i not in added:
            types.append(gguf.TokenType.NORMAL)
        elif added[i].special:
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.USER_DEFINED)
    merges = []
    for merge in tok_json["model"]["merges"]:
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if len(pair) != 2:
            raise EdgekdError(f"tokenizer.json merge {merge!r} has a space inside a token")
        merges.append(" ".join(pair))
    add_bos, add_eos = _added_specials(tokenizer)
    return _Vocab(pre, tokens, types, merges, add_bos, add_eos)


def _add_metadata(w: gguf.GGUFWriter, config, tokenizer, vocab: _Vocab, name: str) -> None:
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    w.add_name(name)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(config.num_key_value_heads or n_head)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if _rope_type(config) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(config.rope_scaling["factor"])

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    for kind, token_id in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("unk", tokenizer.unk_token_id),
        ("pad", tokenizer.pad_token_id),
    ):
        if token_id is not None:
            getattr(w, f"add_{kind}_token_id")(token_id)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    load: Callable[[], torch.Tensor]


def _permute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # HF Llama rotates the two halves of each head; llama.cpp's llama rotates adjacent pairs.
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(w.shape)
    )


def _safetensors_files(model_dir: Path) -> dict[str, Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise EdgekdError(f"{model_dir} has no model.safetensors: save the model with safetensors")
    with safe_open(single, "pt") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def _tensor_plan(model_dir: Path, config, arch: Architecture, qtype) -> list[_Tensor]:
    gguf_arch = arch.gguf_arch
    names = gguf.get_tensor_name_map(gguf_arch, config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = config.num_key_value_heads or n_head
    permute = gguf_arch == gguf.MODEL_ARCH.LLAMA
    plan = []
    for hf_name, file in _safetensors_files(model_dir).items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise EdgekdError(
                f"{file}: tensor {hf_name!r} has no place in llama.cpp's {gguf_arch.name.lower()} "
                "architecture; export a plain checkpoint of the supported architecture"
            )
        with safe_open(file, "pt") as f:
            shape = tuple(f.get_slice(hf_name).get_shape())
        heads = n_head if ".q_proj." in hf_name else n_kv if ".k_proj." in hf_name else None

        def load(file=file, hf_name=hf_name, heads=heads) -> torch.Tensor:
            with safe_open(file, "pt") as f:
                t = f.get_tensor(hf_name).float()
            return _permute_rope_rows(t, heads) if permute and heads else t

        is_norm = len(shape) == 1 or name.endswith("_norm.weight")
        plan.append(_Tensor(name, shape, gguf.GGMLQuantizationType.F32 if is_norm else qtype, load))
    if not config.tie_word_embeddings and not any(t.name == "output.weight" for t in plan):
        raise EdgekdError(
            f"{model_dir}: config says tie_word_embeddings=false but there is no lm_head.weight"
        )
    if _rope_type(config) == "llama3":
        plan.append(_llama3_rope_factors(config))
    return plan


def _llama3_rope_factors(config) -> _Tensor:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # llama.cpp divides each rotary frequency by rope_freqs; taking the ratio of transformers'
    # own frequencies makes the two runtimes agree by construction.
    default, _ = ROPE_INIT_FUNCTIONS["default"](config, "cpu")
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    factors = (default / scaled).float()
    return _Tensor(
        "rope_freqs.weight", tuple(factors.shape), gguf.GGMLQuantizationType.F32, lambda: factors
    )


def _to_numpy(t: torch.Tensor, qtype, name: str) -> np.ndarray:
    data = t.numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.BF16:
        return gguf.quants.quantize(data, qtype)
    half = data.astype(np.float16)
    if not np.isfinite(half).all():
        if not np.isfinite(data).all():
            raise EdgekdError(f"tensor {name} holds NaN or inf: the model's weights are broken")
        raise EdgekdError(f"tensor {name} overflows float16: write the GGUF with dtype BF16 or F32")
    return half


def _write(
    path: Path, config, tokenizer, vocab: _Vocab, plan: list[_Tensor], file_type, name: str
) -> None:
    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[_architecture(config).gguf_arch])
    _add_metadata(w, config, tokenizer, vocab, name)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for t in plan:
        n = int(np.prod(t.shape))
        if t.qtype == gguf.GGMLQuantizationType.BF16:
            byte_shape = (*t.shape[:-1], t.shape[-1] * 2)
            w.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), n * 2, raw_dtype=t.qtype)
        else:
            dtype = np.dtype(np.float16 if t.qtype == gguf.GGMLQuantizationType.F16 else np.float32)
            w.add_tensor_info(t.name, t.shape, dtype, n * dtype.itemsize)
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    # One tensor in memory at a time, so a large student converts in little RAM.
    for t in plan:
        w.write_tensor_data(_to_numpy(t.load(), t.qtype, t.name))
    w.close()


def _probe_texts(tokenizer) -> list[str]:
    texts = list(_PROBE_TEXTS)
    if tokenizer.chat_template:
        from edgekd.chat_template import TemplateRefused
        from edgekd.data import render_chat

        # A template that rejects this conversation still exports, its text unprobed; one that
        # loops or builds without end, or reaches for Python internals, is refused.
        try:
            texts.append(render_chat(tokenizer, _PROBE_CHAT, add_generation_prompt=False))
        except TemplateRefused:
            raise
        except EdgekdError:
            pass
    return texts


def tokenizer_mismatches(gguf_path: Path, tokenizer, texts: list[str]) -> list[str]:
    """The texts that llama.cpp tokenizes differently from the Hugging Face tokenizer."""
    got = LlamaCpp(gguf_path, threads=1).tokenize(texts)
    return [t for t, ids in zip(texts, got, strict=True) if tokenizer(t)["input_ids"] != ids]


def _checked_vocab(config, tokenizer) -> _Vocab:
    _check_config(config, _architecture(config))
    vocab = _vocab(tokenizer, config.vocab_size)
    with tempfile.TemporaryDirectory(prefix="edgekd-vocab-") as tmp:
        path = Path(tmp) / "vocab.gguf"
        _write(path, config, tokenizer, vocab, [], gguf.LlamaFileType.ALL_F32, "vocab")
        bad = tokenizer_mismatches(path, tokenizer, _probe_texts(tokenizer))
    if bad:
        raise EdgekdError(
            f"tokenizer: llama.cpp (pre-tokenizer {vocab.pre!r}) splits {bad[0]!r} differently "
            f"from the Hugging Face tokenizer ({len(bad)} probe texts); the GGUF would drift"
        )
    return vocab


def check_exportable(config, tokenizer) -> None:
    """Raise EdgekdError unless this model and tokenizer can be written as a faithful GGUF.

    Checks the architecture and config, then writes the tokenizer alone to a temporary GGUF and
    has llama.cpp tokenize the probe texts: any difference from the Hugging Face tokenizer fails.
    """
    _checked_vocab(config, tokenizer)


def write_gguf(model_dir: Path, out_path: Path, *, dtype: str = "F16") -> Path:
    """Write a Hugging Face folder (safetensors, config.json, tokenizer.json) as one GGUF file.

    Weights are `dtype` (F32, F16 or BF16) except norms and other 1-D tensors (F32); tied
    embeddings are written once. The tokenizer is checked in llama.cpp before anything is written.
    """
    from transformers import AutoConfig, AutoTokenizer

    if dtype not in _DTYPES:
        raise EdgekdError(f"GGUF dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = _checked_vocab(config, tokenizer)
    qtype, file_type = _DTYPES[dtype]
    plan = _tensor_plan(model_dir, config, _architecture(config), qtype)
    with atomic_path(out_path) as tmp:
        _write(tmp, config, tokenizer, vocab, plan, file_type, model_dir.name)
    return out_path


def quantize_gguf(src: Path, dst: Path, quant: str, *, threads: int) -> Path:
    """Quantize a GGUF with llama.cpp's own quantizer (Q4_K_M, Q5_K_M or Q8_0)."""
    import llama_cpp

    if quant not in _QUANT_FTYPES:
        raise EdgekdError(f"GGUF quant {quant!r} is not one of {', '.join(_QUANT_FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _QUANT_FTYPES[quant])
    params.nthread = threads
    with atomic_path(Path(dst)) as tmp:
        rc = llama_cpp.llama_model_quantize(
            str(src).encode(), str(tmp).encode(), ctypes.byref(params)
        )
        if rc != 0:
            raise EdgekdError(f"llama.cpp failed to quantize {src} to {quant} (code {rc})")
    return Path(dst)
