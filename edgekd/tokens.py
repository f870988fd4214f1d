"""Pure functions on token-id sequences and a tokenizer's ids. It imports nothing, so the
runtimes (and the bench's child process, which measures its own memory) can use it without
loading torch."""


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading items a and b share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def special_ids(tokenizer) -> set[int]:
    """The tokenizer's special token ids. Turn markers such as ChatML's <|im_end|> are added
    special tokens, not always listed among all_special_ids."""
    return set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special
    }
