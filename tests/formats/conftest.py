"""A tiny model as each runtime runs it, and the checks every runtime's token steps share."""

import torch

from edgekd.testing import TOKEN_IDS as SEQ


def argmax_is_top(logprobs: torch.Tensor, token: int) -> bool:
    """float differences between a batched and a stepwise pass may flip near ties of a random
    model, so a stepped token must be a top token, not necessarily the same one."""
    return bool(logprobs[token] >= logprobs.max() - 1e-3)


def greedy_steps(runtime, prompt: list[int], steps: int) -> list[int]:
    """first() then `steps` next() calls, each fed the token before."""
    tokens = [runtime.first(prompt)]
    for _ in range(steps):
        tokens.append(runtime.next(tokens[-1]))
    return tokens


def assert_steps_follow_the_full_pass(runtime, full_logprobs_of) -> None:
    """The cached steps pick top tokens of one uncached pass, and first() starts over."""
    runtime.load()
    tokens = greedy_steps(runtime, SEQ, 4)
    assert greedy_steps(runtime, SEQ, 4) == tokens
    full = full_logprobs_of(SEQ + tokens[:-1])
    for i, token in enumerate(tokens):
        assert argmax_is_top(full[len(SEQ) - 1 + i], token)
