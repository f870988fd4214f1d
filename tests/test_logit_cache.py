import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from edgekd import logit_cache
from edgekd.data import TokenizedExample, collate
from edgekd.logit_cache import (
    LogitCache,
    compute,
    dense_logprobs,
    examples_fingerprint,
    save,
    top_k_entries,
    trained_positions,
)
from edgekd.losses import Divergence, kd_loss, shift_for_next_token


def test_top_k_and_rebuild_hand_computed():
    probs = torch.tensor([[0.5, 0.2, 0.2, 0.1]])
    ids, logprobs, rest = top_k_entries(probs.log(), 1)
    assert ids.dtype == torch.int32 and logprobs.dtype == torch.float16
    assert ids.tolist() == [[0]]
    assert rest.item() == pytest.approx(math.log(0.5), rel=1e-5)
    rebuilt = dense_logprobs(ids, logprobs, rest, 4, 1.0).exp()
    # The top entry as stored, the other 0.5 spread evenly over 3 tokens.
    assert torch.allclose(rebuilt, torch.tensor([[0.5, 1 / 6, 1 / 6, 1 / 6]]), atol=5e-4)  # fp16
    # With k = V the rest is empty and the rebuild is the distribution (to fp16 precision).
    ids, logprobs, rest = top_k_entries(probs.log(), 4)
    assert torch.allclose(dense_logprobs(ids, logprobs, rest, 4, 1.0).exp(), probs, atol=1e-3)


def test_rebuild_at_a_temperature_hand_computed():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1]])
    ids, logprobs, rest = top_k_entries(probs.log(), 2)
    logits = dense_logprobs(ids, logprobs, rest, 4, 2.0)
    # Top 2 tempered: sqrt(0.5), sqrt(0.3); tail as 0.2 / 0.3 tokens of 0.3: 0.2 * 0.3 ** -0.5.
    top = [math.sqrt(0.5), math.sqrt(0.3)]
    tail = 0.2 * 0.3**-0.5
    z = sum(top) + tail
    want = torch.tensor([[top[0] / z, top[1] / z, tail / z / 2, tail / z / 2]])
    assert torch.allclose((logits / 2.0).softmax(-1), want, atol=1e-3)
    # At the same T the true tempered distribution keeps the top 2 in the same ratio.
    q = (logits / 2.0).softmax(-1)[0]
    assert (q[0] / q[1]).item() == pytest.approx(math.sqrt(0.5 / 0.3), rel=1e-3)


def test_empty_slots_keep_the_tail_share_even_on_the_target():
    """A server giving fewer alternatives than top_k leaves empty slots; one may take the
    target's id (the lowest unused ids: a turn's end token is often among them), which must
    keep its share of the rest mass, not the fp16 floor."""
    tensors = logit_cache.from_entries([[[(5, -0.2)]]], [[0]], [[0]], top_k=4, vocab=10)
    assert 0 in tensors["ids"][0].tolist()  # an empty slot names the target
    dense = logit_cache.dense_reference(tensors)[0][0]
    rest = math.log(1 - math.exp(-0.2)) - math.log(9)
    assert dense[0].item() == pytest.approx(rest, abs=1e-3)
    assert dense.exp().sum().item() == pytest.approx(1.0, abs=1e-3)


def test_trained_positions_follow_the_shifted_labels():
    assert trained_positions([-100, -100, 5, 6, -100]) == [1, 2]
    assert trained_positions([1, 2, 3]) == [0, 1]


def test_cache_aligns_with_live_teacher_logits(tmp_path, tiny_teacher_dir):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    examples = [
        TokenizedExample([1, 5, 6, 7, 8], [-100, -100, 6, 7, 8]),
        TokenizedExample([1, 9, 10], [-100, 9, 10]),
        TokenizedExample([1, 11, 12, 13], [-100, -100, -100, 13]),
    ]
    vocab = teacher.config.vocab_size
    tensors = compute(teacher, examples, top_k=vocab, batch_size=2, pad_id=0)
    assert tensors["offsets"].tolist() == [0, 3, 5, 6]
    save(tmp_path / "c.safetensors", tensors)
    cache = LogitCache.load(tmp_path / "c.safetensors")
    assert cache.num_examples == 3 and cache.vocab == vocab

    idx = [2, 0]
    batch = collate([examples[i] for i in idx], pad_id=0)
    with torch.no_grad():
        live = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    live, labels = shift_for_next_token(live, batch["labels"])
    cached = cache.teacher_logits(idx, batch["input_ids"].shape[1], "cpu", 1.0)
    assert cached.shape == live.shape
    keep = labels != -100
    # fp16 keeps about 3 significant digits: log-probs near -11 round by up to 0.004.
    assert torch.allclose(cached[keep], live[keep].log_softmax(-1), atol=5e-3)
    # Every divergence takes the stand-in logits at the training temperature as it takes logits.
    cached = cache.teacher_logits(idx, batch["input_ids"].shape[1], "cpu", 2.0)
    student = torch.randn_like(live)
    kw = {"temperature": 2.0, "alpha": 1.0}
    for name in ("forward_kl", "reverse_kl", "jsd", "tv"):
        divergence = Divergence(name, skew_alpha=0.1, jsd_beta=0.5)
        a = kd_loss(student, live, labels, divergence=divergence, **kw).kd
        b = kd_loss(student, cached, labels, divergence=divergence, **kw).kd
        assert b.item() == pytest.approx(a.item(), rel=1e-3), name


def test_top_k_cache_is_small_and_close(tiny_teacher_dir):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    examples = [TokenizedExample(list(range(1, 30)), list(range(1, 30)))]
    tensors = compute(teacher, examples, top_k=8, batch_size=1, pad_id=0)
    cache = LogitCache(tensors)
    # 8 ids (4 B) + 8 log-probs (2 B) + rest (4 B) + position (4 B) per position.
    assert cache.nbytes() == 28 * (8 * 6 + 8) + 2 * 8 + 8
    rebuilt = cache.teacher_logits([0], 29, "cpu", 1.0)[0].exp()
    assert torch.allclose(rebuilt.sum(-1), torch.ones(28), atol=1e-3)


def test_examples_fingerprint_sees_labels():
    a = [TokenizedExample([1, 2], [1, 2])]
    b = [TokenizedExample([1, 2], [-100, 2])]
    assert examples_fingerprint(a) != examples_fingerprint(b)
    assert examples_fingerprint(a) == examples_fingerprint([TokenizedExample([1, 2], [1, 2])])


def _cache_tensors(n: int, k: int = 4, vocab: int = 16) -> dict:
    torch.manual_seed(0)
    logits = torch.randn(3 * n, vocab)
    ids, logprobs, rest = top_k_entries(logits, k)
    return {
        "ids": ids,
        "logprobs": logprobs,
        "log_rest": rest,
        "positions": torch.arange(3 * n, dtype=torch.int32) % 3,
        "offsets": torch.arange(0, 3 * n + 1, 3, dtype=torch.long),
        "vocab": torch.tensor([vocab]),
    }


def test_cache_folder_round_trip_in_shards(tmp_path, monkeypatch):
    from edgekd import logit_cache

    monkeypatch.setattr(logit_cache, "SHARD_EXAMPLES", 2)
    tensors = _cache_tensors(5)
    meta = {"corpus": "c" * 64, "tokenizer": "t" * 64, "top_k": 4, "teacher": "GGUF file x"}
    logit_cache.write_dir(tmp_path, tensors, meta)
    manifest = logit_cache.read_manifest(tmp_path)
    assert [s["examples"] for s in manifest["shards"]] == [[0, 2], [2, 4], [4, 5]]
    loaded = logit_cache.load_dir(tmp_path, corpus="c" * 64, tokenizer="t" * 64, top_k=4)
    for name, value in tensors.items():
        assert torch.equal(loaded.t[name], value), name


def test_cache_folder_refuses_another_corpus_tokenizer_or_a_cut_shard(tmp_path):
    from edgekd import logit_cache
    from edgekd.errors import EdgekdError
    from edgekd.verify import verify

    meta = {"corpus": "c" * 64, "tokenizer": "t" * 64, "top_k": 4, "teacher": "x"}
    logit_cache.write_dir(tmp_path, _cache_tensors(3), meta)
    good = {"corpus": "c" * 64, "tokenizer": "t" * 64, "top_k": 4}
    with pytest.raises(EdgekdError, match="made for another training corpus"):
        logit_cache.load_dir(tmp_path, **{**good, "corpus": "d" * 64})
    with pytest.raises(EdgekdError, match="made for another tokenizer"):
        logit_cache.load_dir(tmp_path, **{**good, "tokenizer": "u" * 64})
    assert verify(tmp_path) == (1, [])
    shard = tmp_path / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(EdgekdError, match="shard-00000.safetensors: .*truncated or replaced"):
        logit_cache.load_dir(tmp_path, **good)
    checked, findings = verify(tmp_path)
    assert checked == 1 and "truncated" in findings[0].problem
