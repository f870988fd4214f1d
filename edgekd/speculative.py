"""The student as a speculative-decoding draft model for its teacher, measured by running both.

Greedy speculative decoding: the student drafts `draft_len` tokens greedily, the teacher scores the
context and the draft in one forward pass, the longest prefix of the draft that matches the
teacher's own greedy tokens is accepted, and the teacher's token after it is appended. The output
is exactly the teacher's greedy text; how much of each draft survives decides the speed-up.
"""

from __future__ import annotations

import torch

from edgekd.evaluate import HeldOut
from edgekd.formats.hf_torch import HfTorch
from edgekd.tokens import common_prefix


def heldout_prompts(heldout: HeldOut, n: int) -> list[list[int]]:
    """The first n held-out sequences cut before their first scored token (the prompt of a chat
    row); a sequence scored from its start (plain text) keeps its first half."""
    prompts = []
    for seq, pos in zip(heldout.sequences[:n], heldout.positions[:n], strict=True):
        first = int(pos[0]) + 1  # logits index t predicts token t + 1
        prompts.append(seq[: first if first > 1 else max(1, len(seq) // 2)])
    return prompts


def _draft(model, context: list[int], k: int) -> list[int]:
    """k greedy tokens of `model` after context, with its KV cache."""
    runtime = HfTorch.from_model(model, tokenizer=None)
    tokens = [runtime.first(context)]
    for _ in range(k - 1):
        tokens.append(runtime.next(tokens[-1]))
    return tokens


@torch.no_grad()
def speculative_decode(
    draft_model, target_model, prompt: list[int], *, draft_len: int, max_new_tokens: int
) -> tuple[list[int], list[int]]:
    """Greedy speculative decoding of one prompt: the new tokens (the target's own greedy text,
    up to its end token or about max_new_tokens) and the accepted draft length of each pass."""
    device = next(target_model.parameters()).device
    eos = target_model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    context, accepted = list(prompt), []
    while len(context) - len(prompt) < max_new_tokens:
        draft = _draft(draft_model, context, draft_len)
        full = torch.tensor([context + draft], device=device)
        # Position len(context) - 1 + i predicts draft[i]; the last one follows the whole draft.
        verified = target_model(input_ids=full).logits[0, len(context) - 1 :].argmax(-1).tolist()
        n = common_prefix(draft, verified)
        accepted.append(n)
        new = [*draft[:n], verified[n]]
        ended = next((i for i, t in enumerate(new) if t in eos), None)
        context += new if ended is None else new[: ended + 1]
        if ended is not None:
            break
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
