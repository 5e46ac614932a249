"""The one float64 reference of the gated LoRA linear layer and the one tolerance table every test checks against.

Math (the contract in ``coto_kernels.kernels.interface``)::

    y = x W^T + b + g * s * (B A drop(x) + lora_bias),    drop(x) = keep * x / (1 - p)

``W`` is [N, K] (``nn.Linear``) or [K, N] (GPT-2 ``Conv1D``, ``weight_is_kn=True``). The gradients come from
float64 autograd through that one expression, so they check the backends' hand-written backward formulas rather
than repeat them.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Max abs error / max abs reference value of a tensor (``relative_error``), by the dtype of the tensors under test.
# Measured worst cases (CPU, 2026-11-29): torch backend fp32 3.0e-7, fp16 7.5e-4, bf16 6.1e-3; Triton interpreter
# fp32 2.6e-7, fp16 3.4e-4, bf16 6.1e-3 (y, S and every gradient of tests/test_functional.py and
# tests/test_kernels_triton.py).
#
# - fp32: accumulation order only; 1e-5 leaves 30x margin over the measured 3e-7.
# - fp16: 2 ulps (2^-10 = 9.8e-4 per ulp): the output rounding plus the fp16 rounding of S / dS before their GEMM
#   (and of the base GEMM's output before the LoRA term is added to it).
# - bf16: 1.5 ulps (2^-7 = 7.8e-3 per ulp) = 1.2e-2: the same roundings at bf16 precision, and the Triton
#   interpreter truncates (does not round) fp32 -> bf16 stores. The strictest of the values the files used before
#   (1.2e-2 for the Triton kernels; 1.6e-2 in bench/gpu_check.py's full-size parity; an elementwise atol + rtol of
#   3e-2, i.e. up to 6e-2 of the scale, in test_functional.py). A full-size GPU run above it is a finding to look
#   at, not a reason to widen it silently: the rounding error of a GEMM is relative to its largest output, so it
#   does not grow with K.
# - Wrong math moves a tensor by far more: a doubled or zero scaling, a permuted B, a missing 1/(1-p) or another
#   seed's mask changes the outputs by 0.28-2 relative (checked against the bf16 tolerance in
#   ``test_tolerances_catch_wrong_math`` and ``test_tolerance_catches_transposed_or_misscaled_terms``).
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.2e-2,
}


def relative_error(out: Tensor, ref: Tensor) -> float:
    """max |out - ref| / max |ref| (the scale of a GEMM's error is its largest element, not each element)."""
    ref = ref.double()
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def assert_matches(out: Tensor, ref: Tensor, dtype: torch.dtype, what: str = "") -> None:
    """``out`` is within ``TOLERANCE[dtype]`` of ``ref`` in the sense of ``relative_error``."""
    assert out.shape == ref.shape, (what, tuple(out.shape), tuple(ref.shape))
    err = relative_error(out, ref)
    assert err < TOLERANCE[dtype], f"{what}: relative error {err:.3g} >= {TOLERANCE[dtype]:.3g} ({dtype})"


def _leaf(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().double().requires_grad_()


def gated_lora(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, lora_bias: Tensor | None = None,
    *, scaling: float, gate: bool = True, keep: Tensor | None = None, dropout_p: float = 0.0,
    weight_is_kn: bool = False, dy: Tensor | None = None,
) -> dict[str, Tensor | None]:
    """float64 ``y`` and ``s`` = drop(x) A^T, and with ``dy`` the gradients named as ``LoraGrads``.

    ``keep`` is the backend's dropout mask (None: no dropout). Leading dimensions of ``x`` are kept. Gradients
    of unused inputs (the adapter with the gate off, an absent bias) are None.
    """
    inputs = dict(x=x, bias=bias, lora_a=lora_a, lora_b=lora_b, lora_bias=lora_bias)
    d = {name: _leaf(t) for name, t in inputs.items()}
    w = weight.detach().double()
    w_nk = w.t() if weight_is_kn else w
    y = d["x"] @ w_nk.t()
    if d["bias"] is not None:
        y = y + d["bias"]
    s = None
    if gate:
        xd = d["x"] if keep is None else d["x"] * keep.double() / (1.0 - dropout_p)
        s = xd @ d["lora_a"].t()
        delta = s @ d["lora_b"].t()
        if d["lora_bias"] is not None:
            delta = delta + d["lora_bias"]
        y = y + scaling * delta
    out: dict[str, Tensor | None] = dict(y=y.detach(), s=None if s is None else s.detach())
    if dy is not None:
        y.backward(dy.double())
        for grad_name, name in (("dx", "x"), ("d_bias", "bias"), ("d_lora_a", "lora_a"), ("d_lora_b", "lora_b"),
                                ("d_lora_bias", "lora_bias")):
            out[grad_name] = None if d[name] is None else d[name].grad
    return out
