"""Kernels of the gated LoRA linear layer: one module per backend, one contract (``interface``).

- ``lora_torch``: PyTorch ops; runs everywhere.
- ``lora_triton``: fused Triton kernels; needs Triton and CUDA tensors (or the CPU interpreter with
  ``TRITON_INTERPRET=1`` set before Triton is first imported).
- ``lora_native``: BLAS for the dense GEMMs plus compiled C++/CUDA ops from ``csrc/`` for the skinny,
  dropout-fused parts; needs the extension built by ``setup.py`` (``python -m coto_kernels.kernels`` says
  whether it is, and why not).

DoRA kernel modules (``dora_<name>``, contract ``interface.DoraBackend``): ``dora_torch`` (its GEMMs are cuBLAS /
MKL through PyTorch; the backends without a DoRA module of their own run it), ``dora_triton`` (lora_triton's
kernels with DoRA's column-scale flags) and ``dora_native`` (dora_torch with the native one-pass reduction for the
magnitude gradient). ``load_dora_backend(name)`` imports one.

``lora_group`` computes layers that read the same X (a block's q/k/v) as one group from BLAS products, for the
BLAS-based backends (``torch``, ``native``; with dropout through the native group ops).

``dropout_mask`` defines the dropout mask all of them regenerate. ``load_backend(name)`` imports a backend
module; ``backend_status()`` tells which are usable here and why one is not.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: Concrete backends (``auto``'s choice among them: ``coto_kernels.functional.resolve_backend``).
KERNEL_BACKENDS = ("torch", "triton", "native")

# name -> (module or None, why not). A plain dict rather than functools.cache: load_backend runs inside traced
# forwards, and Dynamo reads a dict without a graph break.
_IMPORTED: dict[str, tuple[ModuleType | None, str | None]] = {}


def _import(name: str) -> tuple[ModuleType | None, str | None]:
    if name not in _IMPORTED:
        try:
            _IMPORTED[name] = importlib.import_module(f"{__name__}.lora_{name}"), None
        except ImportError as error:  # the backend's toolchain (triton, the built extension) is missing
            _IMPORTED[name] = None, f"{type(error).__name__}: {error}"
    return _IMPORTED[name]


def backend_status() -> dict[str, str | None]:
    """For each concrete backend: None when it can be used here, else why not."""
    return {name: _import(name)[1] for name in KERNEL_BACKENDS}


def native_cuda_status() -> str | None:
    """None when the native backend's CUDA kernels are built and loaded, else why not."""
    module, why = _import("native")
    return why if module is None else module.CUDA_STATUS


def backend_available(name: str) -> bool:
    """Whether the concrete backend ``name`` can be imported here."""
    return name in KERNEL_BACKENDS and _import(name)[0] is not None


def load_backend(name: str) -> ModuleType:
    """The backend module ``name`` (see ``interface.LoraBackend``); RuntimeError saying why when unavailable."""
    if name not in KERNEL_BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {KERNEL_BACKENDS}")
    module, why = _import(name)
    if module is None:
        raise RuntimeError(f"coto_kernels backend {name!r} is not available here ({why}); use backend='torch'")
    return module


#: Backends with their own DoRA kernel module; the others use the first of these.
DORA_KERNEL_BACKENDS = ("torch", "triton", "native")
_DORA_IMPORTED: dict[str, ModuleType] = {}  # a dict, as _IMPORTED: Dynamo cannot trace import_module


def load_dora_backend(name: str) -> ModuleType:
    """The DoRA kernel module for backend ``name`` (``interface.DoraBackend``): ``dora_<name>`` when it exists,
    else ``dora_torch``; RuntimeError saying why when the backend itself is unavailable here."""
    if name not in KERNEL_BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {KERNEL_BACKENDS}")
    chosen = name if name in DORA_KERNEL_BACKENDS else DORA_KERNEL_BACKENDS[0]
    if chosen != "torch":
        load_backend(chosen)  # the LoRA kernels it is built on: a clear error when their toolchain is missing
    if chosen not in _DORA_IMPORTED:
        _DORA_IMPORTED[chosen] = importlib.import_module(f"{__name__}.dora_{chosen}")
    return _DORA_IMPORTED[chosen]
