"""What attention transfer costs: a training step of the embedded model with PyTorch's SDPA
attention (the default) against eager attention returning its attention maps, as the attention
loss needs them.

    python bench/attention_cost.py [--batch 4] [--seq 256] [--steps 5] [--layers 20]

Each arm runs in a fresh process (forward with the teacher-free attention-map loss against a
detached copy of its own maps, backward, AdamW): median seconds per step and the process's peak
RSS. --layers keeps the first N of the embedded model's 30 layers (20: the default student's size).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

from edgekd.benchmark import rss_bytes


def _arm(arm: str, batch: int, seq: int, steps: int, layers: int, queue) -> None:
    import torch

    from edgekd import models
    from edgekd.feature_kd import attention_loss

    model = models.load_model(models.resolve_source("embedded", role="teacher"))
    model = models.prune_layers(model, list(range(layers)))
    model.set_attn_implementation("sdpa" if arm == "sdpa" else "eager")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator())
    mask = torch.ones_like(ids)
    times = []
    for step in range(steps + 1):  # the first step warms up and is not timed
        start = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, output_attentions=arm == "eager + maps")
        loss = out.logits.float().logsumexp(-1).mean()
        if arm == "eager + maps":
            last = [out.attentions[-1]]
            loss = loss + attention_loss(last, [a.detach().roll(1, -1) for a in last], mask)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step:
            times.append(time.perf_counter() - start)
    rss = rss_bytes("VmHWM") / 2**20
    queue.put({"s_per_step": statistics.median(times), "peak_rss_mib": rss})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=20)
    args = ap.parse_args()
    spawn = mp.get_context("spawn")
    print(f"embedded model, first {args.layers} layers, batch {args.batch} x {args.seq} tokens, "
          f"{args.steps} timed steps (median), fresh process per arm")  # fmt: skip
    print(f"{'arm':14}{'s/step':>9}{'peak RSS MiB':>14}")
    rows = {}
    for arm in ("sdpa", "eager", "eager + maps"):
        queue = spawn.Queue()
        work = (arm, args.batch, args.seq, args.steps, args.layers, queue)
        proc = spawn.Process(target=_arm, args=work)
        proc.start()
        rows[arm] = queue.get()
        proc.join()
        r = rows[arm]
        print(f"{arm:14}{r['s_per_step']:>9.3f}{r['peak_rss_mib']:>14.0f}")
    base = rows["sdpa"]
    for arm in ("eager", "eager + maps"):
        r = rows[arm]
        print(f"{arm} / sdpa: time {r['s_per_step'] / base['s_per_step']:.2f}x, "
              f"peak RSS {r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
