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


def peft_dora(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, lora_bias: Tensor | None,
    magnitude: Tensor, *, scaling: float, keep: Tensor | None = None, dropout_p: float = 0.0,
    weight_is_kn: bool = False, dy: Tensor | None = None,
) -> dict[str, Tensor | None]:
    """float64 DoRA written as PEFT 0.21 writes it (``DoraLinearVariant.forward`` / ``DoraLinearLayer.forward``).

    ``base = x W^T + b``; ``n = ||W + s (B A + lora_bias 1^T)||_row`` detached; ``c = m / n``; without dropout
    (``keep`` None) ``base_result = base - b``, with dropout ``x`` is dropped and ``base_result = drop(x) W^T``;
    ``y = base + (c - 1) * base_result + c * s * (B A x + lora_bias)``. Returns ``y`` and, with ``dy``, the
    gradients named as ``DoraGrads``.
    """
    inputs = dict(x=x, bias=bias, lora_a=lora_a, lora_b=lora_b, lora_bias=lora_bias, magnitude=magnitude)
    d = {name: _leaf(t) for name, t in inputs.items()}
    w = weight.detach().double()
    w_nk = w.t() if weight_is_kn else w
    lora_weight = d["lora_b"] @ d["lora_a"]
    if d["lora_bias"] is not None:
        lora_weight = lora_weight + d["lora_bias"][:, None]
    norm = torch.linalg.norm(w_nk + scaling * lora_weight.detach(), dim=1).detach()
    scale = d["magnitude"] / norm
    base = d["x"] @ w_nk.t()
    result = base if d["bias"] is None else base + d["bias"]
    if keep is None:
        x_lora, base_result = d["x"], (result if d["bias"] is None else result - d["bias"])
    else:
        x_lora = d["x"] * keep.double() / (1.0 - dropout_p)
        base_result = x_lora @ w_nk.t()
    lora_result = x_lora @ d["lora_a"].t() @ d["lora_b"].t()
    if d["lora_bias"] is not None:
        lora_result = lora_result + d["lora_bias"]
    y = result + (scale - 1) * base_result + scale * lora_result * scaling
    out: dict[str, Tensor | None] = dict(y=y.detach(), norm=norm)
    if dy is not None:
        y.backward(dy.double())
        for grad_name, name in (("dx", "x"), ("d_bias", "bias"), ("d_lora_a", "lora_a"), ("d_lora_b", "lora_b"),
                                ("d_lora_bias", "lora_bias"), ("d_magnitude", "magnitude")):
            out[grad_name] = None if d[name] is None else d[name].grad
    return out


#: operand name -> name of its gradient in ``peft_dora``'s output.
DORA_GRAD_NAMES = dict(x="dx", bias="d_bias", lora_a="d_lora_a", lora_b="d_lora_b", lora_bias="d_lora_bias",
                       magnitude="d_magnitude")


def dora_inputs(m: int, k: int, n: int, r: int, dtype: torch.dtype, *, device: str = "cpu", kn: bool = False,
                bias: bool = True, lora_bias: bool = False, seed: int = 0) -> dict:
    """Random DoRA layer inputs (x, weight, biases, factors, fp32 magnitude as PEFT keeps it), scaled ~1."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, grad=True):
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.25).to(dtype).to(device).requires_grad_(grad)

    return dict(
        x=rand(m, k),
        weight=rand(k, n, grad=False) if kn else rand(n, k, grad=False),
        bias=rand(n) if bias else None,
        lora_a=rand(r, k),
        lora_b=rand(n, r),
        lora_bias=rand(n) if lora_bias else None,
        magnitude=(torch.rand(n, generator=g) + 0.5).to(device).requires_grad_(),
    )


def check_dora_layer(t: dict, dtype: torch.dtype, *, backend: str, device: str = "cpu", scaling: float,
                     dropout_p: float = 0.0, kn: bool = False, seed: int = 3) -> None:
    """``dora_linear(backend=...)``: y and every gradient against PEFT's formula in float64 (same dropout mask)."""
    from coto_kernels.functional_dora import dora_linear
    from coto_kernels.kernels.dropout_mask import dropout_keep_mask

    m, n = t["x"].shape[0], t["lora_b"].shape[0]
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)
    y = dora_linear(*t.values(), scaling=scaling, dropout_p=dropout_p, weight_is_kn=kn, seed=seed, backend=backend)
    keep = dropout_keep_mask(seed, tuple(t["x"].shape), dropout_p, device) if dropout_p else None
    ref = peft_dora(*t.values(), scaling=scaling, keep=keep, dropout_p=dropout_p, weight_is_kn=kn, dy=dy)
    assert y.dtype == t["x"].dtype
    assert_matches(y, ref["y"], dtype, "y")
    y.backward(dy)
    for name, grad_name in DORA_GRAD_NAMES.items():
        if t[name] is None:
            continue
        assert t[name].grad is not None and t[name].grad.dtype == t[name].dtype, name
        assert_matches(t[name].grad, ref[grad_name], dtype, name)


def exact_row_norm(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """||W_j + s (B A)_j|| in float64, from the materialised N x K matrix (what PEFT's DoRA takes the norm of)."""
    return torch.linalg.norm(weight.double() + scaling * lora_b.double() @ lora_a.double(), dim=1)


def nearly_cancelling(k: int = 512, n: int = 6, r: int = 4, remainder: float = 1e-4, device: str = "cpu"
                      ) -> tuple[Tensor, Tensor, Tensor, float]:
    """(W, A, B, s) on ``device`` whose rows 0 and 1 of W + s B A cancel to ~``remainder`` of their parts' length
    (the DoRA norm's precision guard flags them below ~0.4); the other rows are ordinary."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(n, k, generator=g)
    lora_a = torch.randn(r, k, generator=g) / k**0.5
    lora_b = torch.randn(n, r, generator=g) * 0.1
    scaling = 2.0
    for row in (0, 1):  # put -W_j / s into the span of A, plus a tiny remainder
        lora_a[row] = -weight[row] / scaling
        lora_b[row] = 0.0
        lora_b[row, row] = 1.0 - remainder
    return weight.to(device), lora_a.to(device), lora_b.to(device), scaling


def check_guard_fixes_cancelling_rows(dora_row_norm, monkeypatch, *, device: str = "cpu", **shape) -> None:
    """A backend's ``dora_row_norm`` on ``nearly_cancelling(**shape)``: the cancelling rows as exact as fp64, where
    the bare fp32 expansion (guard 0) is wrong; the ordinary rows need no guard."""
    from coto_kernels.kernels import dora_torch

    weight, lora_a, lora_b, scaling = nearly_cancelling(**shape, device=device)
    exact = exact_row_norm(weight, lora_a, lora_b, scaling)
    guarded = dora_row_norm(weight, lora_a, lora_b, None, scaling=scaling, weight_is_kn=False)
    assert ((guarded.double() - exact).abs() / exact).max() < 1e-5
    monkeypatch.setattr(dora_torch, "CANCELLATION_GUARD", 0.0)
    bare = dora_row_norm(weight, lora_a, lora_b, None, scaling=scaling, weight_is_kn=False)
    assert not torch.isfinite(bare[:2]).all() or ((bare[:2].double() - exact[:2]).abs() / exact[:2]).max() > 1e-3
    assert ((bare[2:].double() - exact[2:]).abs() / exact[2:]).max() < 1e-5


def check_fresh_adapter_norm_is_exact(dora_row_norm, inputs: dict) -> None:
    """B = 0 and lora_bias = 0 (PEFT's initialisation): n = ||W_j|| bit for bit (the square root correctly rounded),
    so c = m / n = 1 and DoRA starts as PEFT's exact no-op."""
    norm = dora_row_norm(inputs["weight"], inputs["lora_a"], torch.zeros_like(inputs["lora_b"]),
                         torch.zeros_like(inputs["lora_bias"]), scaling=2.0, weight_is_kn=False)
    assert torch.equal(norm, torch.linalg.norm(inputs["weight"].detach(), dim=1))
