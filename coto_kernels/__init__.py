"""coto_kernels: fused, gated LoRA layers and the CoTo progressive-activation schedule for PEFT models.

    controller = coto_kernels.patch(peft_model, total_steps=1000)
    trainer = Trainer(model=peft_model, ..., callbacks=[coto_kernels.CoToCallback(controller)])

    # or, for trainers that build the PEFT model themselves (TRL's SFTTrainer with peft_config=...):
    trainer = SFTTrainer(..., peft_config=lora_config, callbacks=[coto_kernels.CoToCallback(seed=0)])

See README.md for the plain-loop API, the kernels and the benchmark.
"""

from .callbacks import CoToCallback
from .config import GRANULARITIES, SCHEDULES, CoToConfig
from .controller import CoToController
from .functional import lora_linear, triton_available
from .gates import block_prefix, draw_gates, group_names
from .patching import patch, unpatch
from .schedule import activation_probability

__version__ = "0.1.0"

__all__ = [
    "GRANULARITIES",
    "SCHEDULES",
    "CoToCallback",
    "CoToConfig",
    "CoToController",
    "activation_probability",
    "block_prefix",
    "draw_gates",
    "group_names",
    "lora_linear",
    "patch",
    "triton_available",
    "unpatch",
    "__version__",
]
