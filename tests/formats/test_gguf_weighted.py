"""edgekd's imatrix-weighted GGUF against llama.cpp's llama-quantize given edgekd's imatrix file."""

import subprocess

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edgekd import calibration
from edgekd.errors import EdgekdError
from edgekd.formats import imatrix as imatrix_file
from edgekd.formats.gguf import quantize_gguf, write_gguf
from edgekd.formats.gguf_weighted import (
    KEY_CHUNKS,
    KEY_DATASET,
    KEY_ENTRIES,
    quantize_weighted,
)
from edgekd.formats.registry import open_runtime


def tiny_model(tmp_path, tokenizer, hidden: int):
    """A random Llama whose rows are Q4_K/Q6_K (hidden 256) or fall back to Q5_0 (288)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=768,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "tokenizer.model").unlink(missing_ok=True)
    return model, folder


def sequences(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("hidden", [256, 288], ids=["k-quants", "q5_0-fallback"])
def test_bit_exact_with_llama_quantize(tmp_path, tokenizer, llama_quantize_bin, hidden):
    model, folder = tiny_model(tmp_path, tokenizer, hidden)
    imatrix = calibration.collect(model, sequences(6, 100, 1000), 4, 128, "random ids")
    assert imatrix.chunk_count == 4
    imat_path = imatrix_file.write(imatrix, tmp_path / "imatrix.gguf")
    f16 = write_gguf(folder, tmp_path / "m-F16.gguf")
    plain = quantize_gguf(f16, tmp_path / "plain.gguf", "Q4_K_M", threads=2)
    ours = tmp_path / "ours.gguf"
    methods = quantize_weighted(f16, plain, ours, imatrix, imat_path.name)
    theirs = tmp_path / "theirs.gguf"
    subprocess.run(
        [llama_quantize_bin, "--imatrix", imat_path, f16, theirs, "Q4_K_M", "2"],
        check=True,
        capture_output=True,
    )

    ours_t = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    theirs_t = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    plain_t = {t.name: t for t in gguf.GGUFReader(plain).tensors}
    assert ours_t.keys() == theirs_t.keys()
    differ = [n for n, t in ours_t.items() if not np.array_equal(t.data, theirs_t[n].data)]
    assert differ == []
    # Every blk.* weight of a type with a weighted path was weighted, and that changed its
    # bytes; the rest (Q8_0 fallbacks, the embedding, the output) is llama.cpp's as it is.
    has_path = {"Q4_K", "Q6_K", "Q5_0"}
    weighted = sorted(
        n for n, t in ours_t.items() if n.startswith("blk.") and t.tensor_type.name in has_path
    )
    assert sorted(n for n, m in methods.items() if m == "imatrix") == weighted
    assert len(weighted) == (8 * 7 if hidden == 256 else 8 * 7 - 4)  # 4 attn_v in Q8_0
    assert all(not np.array_equal(ours_t[n].data, plain_t[n].data) for n in weighted)
    types = {ours_t[n].tensor_type.name for n in weighted}
    assert types == ({"Q4_K", "Q6_K"} if hidden == 256 else {"Q4_K", "Q5_0", "Q6_K"})

    meta = gguf.GGUFReader(ours).fields
    theirs_meta = gguf.GGUFReader(theirs).fields
    for key in (KEY_DATASET, KEY_ENTRIES, KEY_CHUNKS):
        assert meta[key].contents() == theirs_meta[key].contents(), key
    assert meta[KEY_ENTRIES].contents() == 56 and meta[KEY_CHUNKS].contents() == 4
    # llama.cpp loads and runs it.
    assert open_runtime(ours, threads=2).tokenize(["hello"])[0]


def test_imatrix_file_round_trip(tmp_path, tiny_teacher_dir):
    from edgekd import models

    model = models.load_model(models.resolve_source(str(tiny_teacher_dir), role="teacher"))
    imatrix = calibration.collect(model, sequences(3, 40, 100), 2, 50, "corpus.jsonl")
    assert imatrix.chunk_count == 2  # 100 of the 120 tokens
    assert set(imatrix.counts.values()) == {100}
    back = imatrix_file.read(imatrix_file.write(imatrix, tmp_path / "i.gguf"))
    assert back.datasets == ["corpus.jsonl"] and back.chunk_count == 2 and back.chunk_size == 50
    assert back.counts == imatrix.counts
    assert all(torch.equal(back.sums[n], imatrix.sums[n].float()) for n in imatrix.sums)


def test_too_little_calibration_data(tiny_teacher_dir):
    from edgekd import models

    model = models.load_model(models.resolve_source(str(tiny_teacher_dir), role="teacher"))
    with pytest.raises(EdgekdError, match="at least one chunk of 512 tokens"):
        calibration.collect(model, sequences(2, 10, 100), 4, 512, "x")


def test_not_an_imatrix(tmp_path):
    bad = tmp_path / "imatrix.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(EdgekdError, match="is not a GGUF imatrix file"):
        imatrix_file.read(bad)
