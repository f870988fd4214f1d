"""GGUF export against llama.cpp itself: tokenization, logits and quantization of tiny models."""

import json

import pytest
import torch
from gguf import GGUFReader
from llama_cpp import Llama
from transformers import (
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from edgekd.errors import EdgekdError
from edgekd.evaluate import quality
from edgekd.formats import gguf
from edgekd.formats.gguf import (
    check_exportable,
    quantize_gguf,
    tokenizer_mismatches,
    write_gguf,
)
from edgekd.formats.llama_cpp import LlamaCpp

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "hello 12345 and 3.14159, 1,000,000 or 1e-9",
    "x²+y³=z¹⁰ and ½ ① ٣٤٥ ８９",
    "   leading spaces and trailing   ",
    "tabs\tand\nnewlines\n\n\nand \r\n crlf",
    "a\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \nb",
    "        ",
    "café naïve résumé — “quotes” ‘single’ … ñ ß",
    "中文文本测试，日本語のテキスト、한국어 텍스트",
    "Кириллица, ελληνικά, العربية, עברית, हिन्दी",
    "Emoji 🚀🦙😶\u200d🌫️ ✅ 👍🏽 👨\u200d👩\u200d👧",
    "def f(x):\n    return x ** 2  # square\n\n\tprint(f(3))",
    "I've been 'told he's there, 'RE you sure? We'Ve a'lL",
    "text with <|endoftext|> inside and <|im_end|>",
    "URL https://example.com/path?q=1&b=two#frag",
    "!!!???...,,,;;;:::---===+++***",
    "",
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2? Answer  with\n\ta number."},
    {"role": "assistant", "content": "4"},
]
PROSE = " ".join(["The quick brown fox jumps over the lazy dog, 12345 times."] * 5)


def tiny_config(arch: str, tokenizer, *, hidden: int = 64, tied: bool = True, **extra):
    """Like conftest.tiny_llama_config, for any supported architecture.

    initializer_range 0.1 (not 0.02) makes the logits peaked enough that a wrong weight
    layout shows in KL and top1, instead of hiding in a near-uniform distribution.
    """
    config_cls, _ = ARCHS[arch]
    return config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.1,
        **extra,
    )


def save_tiny(path, arch: str, tokenizer, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = ARCHS[arch][1](tiny_config(arch, tokenizer, **kwargs)).eval()
    if arch == "qwen2":  # its q/k/v biases start at zero; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "tokenizer.model").unlink(missing_ok=True)
    return model


def torch_logprobs(model, seqs):
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([s])).logits[0], -1) for s in seqs]


def measure(model_lp, reference_lp, seqs):
    targets = [torch.tensor(s[1:]) for s in seqs]
    return quality([m[:-1] for m in model_lp], [r[:-1] for r in reference_lp], targets)


def parity(model_lp, reference_lp, seqs, margin: float = 1e-2) -> tuple[float, float]:
    """KL(reference || model), and top1 agreement where the reference's top two differ by more
    than `margin`: a random model over 49k tokens has near ties that float rounding may flip."""
    agree = decisive = 0
    for m, r in zip(model_lp, reference_lp, strict=True):
        top2 = r.topk(2, dim=-1).values
        keep = top2[:, 0] - top2[:, 1] > margin
        agree += int((m.argmax(-1) == r.argmax(-1))[keep].sum())
        decisive += int(keep.sum())
    assert decisive > 0.5 * sum(len(s) for s in seqs)  # the filter leaves most positions
    return measure(model_lp, reference_lp, seqs).kld, agree / decisive


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory, tokenizer):
    """The tiny tied Llama and its F16 GGUF, written once for the tests that only read them."""
    root = tmp_path_factory.mktemp("gguf")
    model = save_tiny(root / "m", "llama", tokenizer)
    return model, write_gguf(root / "m", root / "m.gguf")


def test_tokenization_matches_hf(llama_gguf, tokenizer):
    _, out = llama_gguf
    texts = [*TEXTS, tokenizer.apply_chat_template(CHAT, tokenize=False)]
    got = LlamaCpp(out, threads=1).tokenize(texts)
    assert got == [tokenizer(t)["input_ids"] for t in texts]
    assert len(got[-1]) > 20 and tokenizer.convert_tokens_to_ids("<|im_end|>") in got[-1]
    assert tokenizer_mismatches(out, tokenizer, texts) == []


def test_metadata(llama_gguf, tokenizer):
    """As llama.cpp itself reads them (gguf's reader takes seconds over a 49k vocabulary)."""
    _, out = llama_gguf
    meta = Llama(str(out), vocab_only=True, verbose=False).metadata
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == "2"
    assert meta["llama.embedding_length"] == "64"
    assert meta["llama.feed_forward_length"] == "128"
    assert meta["llama.attention.head_count"] == "4"
    assert meta["llama.attention.head_count_kv"] == "2"
    assert meta["llama.context_length"] == "512"
    assert meta["llama.vocab_size"] == str(len(tokenizer))
    assert meta["general.file_type"] == "1"  # mostly F16
    assert meta["tokenizer.ggml.model"] == "gpt2"
    # transformers' GGUF loader rebuilds SmolLM2's tokenizer without its Digits step: plain
    # byte-level, which llama.cpp calls gpt-2 (its 'smollm' would split ' ½' differently).
    digits = "Digits" in tokenizer.backend_tokenizer.to_str()
    assert meta["tokenizer.ggml.pre"] == ("smollm" if digits else "gpt-2")
    assert meta["tokenizer.ggml.bos_token_id"] == str(tokenizer.bos_token_id)
    assert meta["tokenizer.ggml.eos_token_id"] == str(tokenizer.eos_token_id)
    adds_bos = tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    assert meta["tokenizer.ggml.add_bos_token"] == str(adds_bos).lower()
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    assert not list(out.parent.glob(".*tmp*"))


def test_generate_matches_torch_greedy(llama_gguf, tokenizer):
    model, out = llama_gguf
    messages = [{"role": "user", "content": "Name three colours."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(prompt)
    for _ in range(8):  # plain argmax decoding, no generate() stopping rules
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    new = ids[len(prompt) :]
    stop = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    new = new[: next((i for i, t in enumerate(new) if t in stop), len(new))]
    expected = tokenizer.decode(new, skip_special_tokens=True)
    got = LlamaCpp(out, threads=2, n_ctx=128).chat([messages], max_tokens=8)[0]
    assert len(expected) > 5 and got == expected


def test_logits_match_torch(llama_gguf, tokenizer):
    model, out = llama_gguf
    seqs = [tokenizer(PROSE)["input_ids"], tokenizer.apply_chat_template(CHAT, tokenize=True)]
    kld, top1 = parity(LlamaCpp(out, threads=2).logprobs(seqs), torch_logprobs(model, seqs), seqs)
    assert kld < 1e-3
    assert top1 == 1.0


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "tied"), [("llama", False), ("qwen2", True), ("mistral", False)])
def test_other_layouts_match_torch(tmp_path, tokenizer, arch, tied):
    model = save_tiny(tmp_path / "m", arch, tokenizer, tied=tied)
    out = write_gguf(tmp_path / "m", tmp_path / "m.gguf")
    names = {t.name for t in GGUFReader(out).tensors}
    assert ("output.weight" in names) is not tied
    assert ("blk.0.attn_q.bias" in names) is (arch == "qwen2")
    seqs = [tokenizer(PROSE)["input_ids"], tokenizer.apply_chat_template(CHAT, tokenize=True)]
    kld, top1 = parity(LlamaCpp(out, threads=2).logprobs(seqs), torch_logprobs(model, seqs), seqs)
    assert kld < 1e-3
    assert top1 == 1.0


@pytest.mark.parametrize(
    "extra",
    [
        {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
        {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
        {"head_dim": 32},
    ],
    ids=["rope-linear", "rope-llama3", "head-dim"],
)
def test_llama_variants_match_torch(tmp_path, tokenizer, extra):
    """In F32, so that float16 rounding cannot flip a near tie."""
    model = save_tiny(tmp_path / "m", "llama", tokenizer, **extra)
    out = write_gguf(tmp_path / "m", tmp_path / "m.gguf", dtype="F32")
    seqs = [tokenizer(PROSE)["input_ids"]]
    kld, top1 = parity(LlamaCpp(out, threads=2).logprobs(seqs), torch_logprobs(model, seqs), seqs)
    assert kld < 1e-4
    assert top1 == 1.0


def test_bf16(tmp_path, tokenizer):
    model = save_tiny(tmp_path / "m", "qwen2", tokenizer)
    out = write_gguf(tmp_path / "m", tmp_path / "m.gguf", dtype="BF16")
    assert Llama(str(out), vocab_only=True, verbose=False).metadata["general.file_type"] == "32"
    seqs = [tokenizer(PROSE)["input_ids"]]
    kld, top1 = parity(LlamaCpp(out, threads=2).logprobs(seqs), torch_logprobs(model, seqs), seqs)
    assert kld < 1e-2  # bfloat16 keeps 8 bits of mantissa
    assert top1 > 0.9


def test_refuses_unknown_dtype(tmp_path):
    with pytest.raises(EdgekdError, match="F8"):
        write_gguf(tmp_path, tmp_path / "m.gguf", dtype="F8")


def test_parity_check_sees_a_wrong_layout(tmp_path, tokenizer, monkeypatch):
    """Without the q/k row permutation llama.cpp's rope is wrong: the measure must notice."""
    model = save_tiny(tmp_path / "m", "llama", tokenizer)
    monkeypatch.setattr(gguf, "_permute_rope_rows", lambda w, n_head: w)
    out = write_gguf(tmp_path / "m", tmp_path / "m.gguf")
    seqs = [tokenizer(PROSE)["input_ids"]]
    q = measure(LlamaCpp(out, threads=2).logprobs(seqs), torch_logprobs(model, seqs), seqs)
    assert q.kld > 1e-2


@pytest.mark.slow
def test_q4_k_m(tmp_path, tokenizer):
    """hidden 256: rows of 256 take real K-quants rather than llama.cpp's fallbacks."""
    model = save_tiny(tmp_path / "m", "llama", tokenizer, hidden=256)
    f16 = write_gguf(tmp_path / "m", tmp_path / "m-F16.gguf")
    q4 = quantize_gguf(f16, tmp_path / "m-Q4_K_M.gguf", "Q4_K_M", threads=2)
    types = {t.name: t.tensor_type.name for t in GGUFReader(q4).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_K"
    assert "Q6_K" in types.values()  # the _M mix: some tensors one step up
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert q4.stat().st_size < 0.45 * f16.stat().st_size
    seqs = [tokenizer(PROSE)["input_ids"]]
    ref = torch_logprobs(model, seqs)
    q = measure(LlamaCpp(q4, threads=2).logprobs(seqs), ref, seqs)
    other = save_tiny(tmp_path / "other", "llama", tokenizer, hidden=256, seed=1)
    unrelated = measure(torch_logprobs(other, seqs), ref, seqs)
    assert q.kld < 0.1 * unrelated.kld
    assert isinstance(LlamaCpp(q4, threads=2, n_ctx=128).chat([CHAT[:2]], max_tokens=4)[0], str)
    assert not list(tmp_path.glob(".*tmp*"))


def test_quantize_refuses_unknown_type(tmp_path):
    with pytest.raises(EdgekdError, match="Q3_X"):
        quantize_gguf(tmp_path / "a.gguf", tmp_path / "b.gguf", "Q3_X", threads=1)


def test_refuses_unsupported_architecture(tokenizer):
    config = GPT2Config(vocab_size=len(tokenizer), architectures=["GPT2LMHeadModel"])
    with pytest.raises(EdgekdError, match="GPT2LMHeadModel"):
        check_exportable(config, tokenizer)


def test_refuses_rope_without_llama_cpp_equivalent(tokenizer):
    config = tiny_config("llama", tokenizer, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(EdgekdError, match="dynamic"):
        check_exportable(config, tokenizer)


def _edited_tokenizer(tmp_path, tokenizer_dir, edit):
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    edit(data)
    out = tmp_path / "tok"
    out.mkdir()
    for f in tokenizer_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    (out / "tokenizer.json").write_text(json.dumps(data))
    return AutoTokenizer.from_pretrained(out)


def test_refuses_unknown_pre_tokenizer(tmp_path, tokenizer, tokenizer_dir):
    def edit(data):
        data["pre_tokenizer"] = {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": "\\s+|\\w+"},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": True,
                    "use_regex": False,
                },
            ],
        }

    tok = _edited_tokenizer(tmp_path, tokenizer_dir, edit)
    with pytest.raises(EdgekdError, match="pre-tokenizer"):
        check_exportable(tiny_config("llama", tok), tok)


def test_refuses_llama2_style_tokenizer(tmp_path, tokenizer, tokenizer_dir):
    """Llama 2's tokenizer.json: no pre-tokenizer, '▁' written by the normalizer, byte fallback."""

    def edit(data):
        data["pre_tokenizer"] = None
        data["normalizer"] = {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        }

    tok = _edited_tokenizer(tmp_path, tokenizer_dir, edit)
    with pytest.raises(EdgekdError, match="SentencePiece"):
        check_exportable(tiny_config("llama", tok), tok)


def test_refuses_sentencepiece_style_tokenizer(tmp_path, tokenizer, tokenizer_dir):
    def edit(data):
        data["pre_tokenizer"] = {
            "type": "Metaspace",
            "replacement": "▁",
            "prepend_scheme": "first",
            "split": False,
        }

    tok = _edited_tokenizer(tmp_path, tokenizer_dir, edit)
    with pytest.raises(EdgekdError, match="SentencePiece"):
        check_exportable(tiny_config("llama", tok), tok)


def test_refuses_tokenizer_that_would_drift(tmp_path, tokenizer, tokenizer_dir):
    """A normalizer llama.cpp does not run: the hash still says 'smollm', the probe texts differ."""

    def edit(data):
        data["normalizer"] = {"type": "Replace", "pattern": {"String": "é"}, "content": "e"}

    tok = _edited_tokenizer(tmp_path, tokenizer_dir, edit)
    with pytest.raises(EdgekdError, match="differently"):
        check_exportable(tiny_config("llama", tok), tok)


def test_accepts_supported(tokenizer):
    for arch in ARCHS:
        check_exportable(tiny_config(arch, tokenizer), tokenizer)
