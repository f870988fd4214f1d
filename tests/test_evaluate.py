import math

import torch
from transformers import AutoModelForCausalLM

from edgekd.data import TokenizedExample
from edgekd.evaluate import (
    HeldOut,
    evaluate_torch,
    load_reference,
    quality,
    save_reference,
    torch_logprobs,
)


def test_heldout_scores_only_labelled_next_tokens():
    ex = TokenizedExample(input_ids=[5, 6, 7, 8, 9], labels=[-100, -100, 7, 8, -100])
    h = HeldOut.from_examples([ex, TokenizedExample(input_ids=[1, 2], labels=[-100, -100])])
    assert len(h.sequences) == 1  # the second has nothing to score
    assert h.positions[0].tolist() == [1, 2]  # logits at 1 and 2 predict tokens 7 and 8
    assert h.targets[0].tolist() == [7, 8]
    assert h.num_tokens == 2


def test_quality_matches_direct_computation():
    torch.manual_seed(0)
    model = [torch.randn(6, 11).log_softmax(-1), torch.randn(3, 11).log_softmax(-1)]
    ref = [torch.randn(6, 11).log_softmax(-1), torch.randn(3, 11).log_softmax(-1)]
    tgt = [torch.randint(0, 11, (6,)), torch.randint(0, 11, (3,))]
    q = quality(model, ref, tgt)
    nll = kl = agree = 0.0
    for m, r, t in zip(model, ref, tgt, strict=True):
        for i in range(len(t)):
            nll -= m[i, t[i]].item()
            kl += sum(math.exp(r[i, v]) * (r[i, v] - m[i, v]) for v in range(11)).item()
            agree += int(m[i].argmax() == r[i].argmax())
    assert q.tokens == 9
    assert math.isclose(q.ppl, math.exp(nll / 9), rel_tol=1e-5)
    assert math.isclose(q.kld, kl / 9, rel_tol=1e-4)
    assert q.top1 == agree / 9
    same = quality(ref, ref, tgt)
    assert abs(same.kld) < 1e-6 and same.top1 == 1.0


def test_quality_compares_padded_vocabularies_on_the_shared_part():
    ref = torch.randn(4, 10).log_softmax(-1)
    padded = torch.cat([ref, torch.full((4, 6), -1e9)], -1)  # extra rows of an embedding
    q = quality([padded], [ref], [torch.tensor([0, 1, 2, 3])])
    assert q.kld < 1e-5 and q.top1 == 1.0


def test_torch_logprobs_match_unbatched_forward(tiny_teacher_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    examples = [
        TokenizedExample(input_ids=list(range(10, 10 + n)), labels=list(range(10, 10 + n)))
        for n in (5, 9, 3)
    ]
    h = HeldOut.from_examples(examples)
    lps = torch_logprobs(model, h, batch_size=2)  # padded batches
    for seq, pos, lp in zip(h.sequences, h.positions, lps, strict=True):
        with torch.no_grad():
            direct = model(torch.tensor([seq])).logits[0, pos].log_softmax(-1)
        assert torch.allclose(lp, direct, atol=1e-4)
    save_reference(tmp_path / "ref.safetensors", lps)
    ref = load_reference(tmp_path / "ref.safetensors")
    q = evaluate_torch(model, h, ref)
    assert q.kld < 1e-4 and q.top1 == 1.0  # fp16 reference of itself
