"""The training loop's optimizer choice: fp32 AdamW or bitsandbytes' 8-bit AdamW, on a real step."""

import torch

from edgekd.config import TrainSettings
from edgekd.train import make_optimizer


def _step(optimizer_name: str):
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 256)
    settings = TrainSettings(optimizer=optimizer_name, lr=1e-2)
    optimizer = make_optimizer(list(layer.parameters()), settings)
    before = layer.weight.detach().clone()
    layer(torch.randn(4, 256)).pow(2).mean().backward()
    optimizer.step()
    return layer, optimizer, before


def test_adamw_8bit_keeps_one_byte_per_moment_and_moves_the_weights_like_adamw():
    layer, optimizer, before = _step("adamw_8bit")
    state = optimizer.state[layer.weight]
    moments = [v for v in state.values() if torch.is_tensor(v) and v.numel() == 256 * 256]
    assert len(moments) == 2 and all(m.dtype == torch.uint8 for m in moments)
    plain, plain_optimizer, _ = _step("adamw")
    assert all(
        v.dtype == torch.float32
        for v in plain_optimizer.state[plain.weight].values()
        if torch.is_tensor(v) and v.numel() > 1
    )
    # Both take AdamW's first step: ~lr in the direction of each gradient's sign.
    moved, plain_moved = layer.weight - before, plain.weight - before
    assert moved.abs().mean() > 0.5e-2
    agree = (moved.sign() == plain_moved.sign()).float().mean()
    assert agree > 0.95
