"""Pure functions on token-id sequences. It imports nothing, so the runtimes (and the bench's
child process, which measures its own memory) can use it without loading torch."""


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading items a and b share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
