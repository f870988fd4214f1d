"""The student as a speculative-decoding draft model for its teacher, measured by running both.

Greedy speculative decoding: the student drafts `draft_len` tokens greedily, the teacher scores the
context and the draft in one forward pass, the longest prefix of the draft that matches the
teacher's own greedy tokens is accepted, and the teacher's token after it is appended. The output
is exactly the teacher's greedy text; how much of each draft survives decides the speed-up.
"""

from __future__ import annotations

import torch

from edgekd.evaluate import HeldOut
from edgekd.tokens import common_prefix


def heldout_prompts(heldout: HeldOut, n: int) -> list[list[int]]:
    """The first n held-out sequences cut before their first scored token (the prompt of a chat
    row); a sequence scored from its start (plain text) keeps its first half."""
    prompts = []
    for seq, pos in zip(heldout.sequences[:n], heldout.positions[:n], strict=True):
        first = int(pos[0]) + 1  # logits index t predicts token t + 1
        prompts.append(seq[: first if first > 1 else max(1, len(seq) // 2)])
    return prompts


class _Cached:
    """A causal LM over a growing token sequence, with a KV cache that keeps the prefix it has
    seen: each call feeds only what the cache lacks, and a rejected draft is cut off again."""

    def __init__(self, model):
        self.model, self.past, self.length = model, None, 0
        self.device = next(model.parameters()).device

    def logits(self, seq: list[int]) -> torch.Tensor:
        """The logits of positions self.length .. len(seq) - 1 of seq."""
        ids = torch.tensor([seq[self.length :]], device=self.device)
        out = self.model(input_ids=ids, past_key_values=self.past, use_cache=True)
        self.past, self.length = out.past_key_values, len(seq)
        return out.logits[0]

    def keep(self, n: int) -> None:
        """Forget every position from n on."""
        self.past.crop(n)
        self.length = n


@torch.no_grad()
def speculative_decode(
    draft_model, target_model, prompt: list[int], *, draft_len: int, max_new_tokens: int
) -> tuple[list[int], list[int]]:
    """Greedy speculative decoding of one prompt: the new tokens (the target's own greedy text,
    up to its end token or about max_new_tokens) and the accepted draft length of each pass."""
    eos = target_model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    drafter, target = _Cached(draft_model), _Cached(target_model)
    context, accepted = list(prompt), []
    while len(context) - len(prompt) < max_new_tokens:
        draft: list[int] = []
        for _ in range(draft_len):
            draft.append(int(drafter.logits(context + draft)[-1].argmax()))
        # The target's cache ends before context's last token, whose logits predict draft[0];
        # position len(context) - 1 + i predicts draft[i], the last one follows the whole draft.
        start = target.length
        verified = target.logits(context + draft)[len(context) - 1 - start :].argmax(-1).tolist()
        n = common_prefix(draft, verified)
        accepted.append(n)
        new = [*draft[:n], verified[n]]
        ended = next((i for i, t in enumerate(new) if t in eos), None)
        context += new if ended is None else new[: ended + 1]
        if ended is not None:
            break
        # Both caches keep context less its last token: the accepted draft was computed right,
        # the target's own token after it not yet fed (the drafter never fed its last draft).
        target.keep(len(context) - 1)
        drafter.keep(min(drafter.length, len(context) - 1))
    return context[len(prompt) :], accepted


def greedy_acceptance(
    draft_model, target_model, prompts: list[list[int]], *, draft_len: int, max_new_tokens: int
) -> dict:
    """How much of `draft_model`'s greedy drafts `target_model` accepts, over speculative decoding
    of each prompt.

    acceptance_rate: accepted draft tokens / drafted tokens; mean_accepted_length: accepted draft
    tokens per verification (0 to draft_len); tokens_per_target_forward: that plus the target's
    own token, the tokens each teacher pass yields."""
    if not prompts:
        raise ValueError("no prompts to draft from")
    accepted = []
    for prompt in prompts:
        accepted += speculative_decode(
            draft_model, target_model, prompt, draft_len=draft_len, max_new_tokens=max_new_tokens
        )[1]
    rounds, total = len(accepted), sum(accepted)
    return {
        "draft_len": draft_len,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "rounds": rounds,
        "drafted": rounds * draft_len,
        "accepted": total,
        "acceptance_rate": total / (rounds * draft_len),
        "mean_accepted_length": total / rounds,
        "tokens_per_target_forward": (total + rounds) / rounds,
    }
