"""`accelerate launch` entry for the FSDP2 test: tunesmith's own loop, sharded over CPU processes (gloo).

Accelerate turns FSDP on only for GPU back ends (state.py), so on CPU its state is set by hand here, the way an
FSDP launch sets it on GPUs. The plugin itself reads the launcher's environment, i.e. the shipped
configs/accelerate/fsdp.yaml. Test-only: nothing in tunesmith does this.
    accelerate launch --config_file FSDP_CPU.yaml tests/finetune/fsdp_cpu_entry.py CONFIG [key=value ...] [--resume]
"""

from __future__ import annotations

import os
import sys

from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import PartialState
from accelerate.utils import DistributedType

from tunesmith.finetune.config import load_config
from tunesmith.finetune.trainer import fit, setup

plugin = FullyShardedDataParallelPlugin()
acc = Accelerator(fsdp_plugin=plugin)
PartialState().distributed_type = acc.state.distributed_type = DistributedType.FSDP  # both: later reads copy it
acc.state.fsdp_plugin = plugin
assert acc.is_fsdp2, "expected FSDP2"
resume = "--resume" in sys.argv
cfg = load_config(sys.argv[1], [a for a in sys.argv[2:] if a != "--resume"])
s = setup(cfg, resume=resume, accelerator=acc)
fit(s, resume=resume)
os.write(1, f"fsdp: ok {type(s.loss_model).__name__}\n".encode())  # one write: the ranks' lines never interleave
