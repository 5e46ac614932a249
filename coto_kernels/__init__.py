"""coto_kernels: fused, gated LoRA layers and the CoTo progressive-activation schedule for PEFT models.

    controller = coto_kernels.patch(peft_model, total_steps=1000)
    trainer = Trainer(model=peft_model, ..., callbacks=[controller.callback()])

See README.md for the plain-loop API, the kernels and the benchmark.
"""

from .controller import CoToController
from .functional import lora_linear, triton_available
from .gates import block_prefix, draw_gates, group_names
from .patching import patch, unpatch
from .schedule import SCHEDULES, activation_probability

__version__ = "0.1.0"

__all__ = [
    "SCHEDULES",
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
