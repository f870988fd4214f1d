"""`python -m tests.fsdp_on_cpu ARGS` runs `edgekd.cli ARGS` under accelerate's FSDP2 on CPU.

accelerate turns FSDP on only on accelerators (with `use_cpu` it falls back to DDP over gloo).
torch's FSDP2 itself shards over a CPU device mesh, so this sets accelerate's shared state to the
FSDP plugin of the launch config (`accelerate launch --config_file configs/accelerate/fsdp.yaml`)
before edgekd creates its Accelerator: the sharding, gathering and checkpointing are the real ones.
"""

import os

from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from edgekd.cli import main

if __name__ == "__main__":
    assert os.environ.get("ACCELERATE_USE_FSDP") == "true", "launch with an FSDP config"
    state = Accelerator(cpu=True).state
    # AcceleratorState copies PartialState's fields each time an Accelerator is made: set both.
    PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launch config's FSDP_* vars
    main()
