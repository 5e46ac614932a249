"""The gated LoRA autograd Function (PyTorch backend) against float64 PyTorch: forward and every gradient."""

from __future__ import annotations

import pytest
import torch

from coto_kernels.functional import lora_linear, resolve_backend
from coto_kernels.kernels import backend_available, lora_torch

# Tolerances next to the dtype: relative to the output's scale, tight enough that a transposed or mis-scaled
# term (checked below) fails them.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _inputs(m, k, n, r, dtype, *, kn=False, bias=True, lora_bias=False, adapter_dtype=None, seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def rand(*shape, dt=dtype, grad=True):
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.25).to(dt).requires_grad_(grad)

    return dict(
        x=rand(*lead, m, k),
        weight=rand(k, n, grad=False) if kn else rand(n, k, grad=False),
        bias=rand(n) if bias else None,
        lora_a=rand(r, k, dt=adapter_dtype),
        lora_b=rand(n, r, dt=adapter_dtype),
        lora_bias=rand(n, dt=adapter_dtype) if lora_bias else None,
    )


def reference(t, *, scaling, keep=None, dropout_p=0.0, gate=True, kn=False):
    """float64 PyTorch reference of y = x W^T + b + g s (B A drop(x) + lora_bias); differentiable."""
    d = {k: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None) for k, v in t.items()}
    w = d["weight"].t() if kn else d["weight"]
    y = d["x"] @ w.t()
    if d["bias"] is not None:
        y = y + d["bias"]
    if gate:
        xd = d["x"] if keep is None else d["x"] * keep.double() / (1 - dropout_p)
        delta = xd @ d["lora_a"].t() @ d["lora_b"].t()
        if d["lora_bias"] is not None:
            delta = delta + d["lora_bias"]
        y = y + scaling * delta
    return y, d


def _grads(t):
    return {k: v.grad for k, v in t.items() if v is not None and v.requires_grad}


def check(t, y, ref_y, ref_inputs, dtype, dy):
    tol = TOLERANCE[dtype]
    scale = ref_y.abs().max().item()
    assert y.dtype == t["x"].dtype
    torch.testing.assert_close(y.double(), ref_y, atol=tol * scale, rtol=tol)
    ref_y.backward(dy.double())
    y.backward(dy)
    for name, grad in _grads(t).items():
        ref = ref_inputs[name].grad
        assert grad is not None and grad.dtype == t[name].dtype, name
        torch.testing.assert_close(grad.double(), ref, atol=tol * ref.abs().max().item(), rtol=tol, msg=name)


SHAPES = [(37, 45, 29, 3), (8, 16, 16, 1), (64, 33, 70, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,n,r", SHAPES)
@pytest.mark.parametrize("kn", [False, True], ids=["linear", "conv1d"])
def test_forward_and_grads_match_float64(dtype, m, k, n, r, kn):
    t = _inputs(m, k, n, r, dtype, kn=kn, lora_bias=True)
    y = lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["lora_bias"], scaling=1.7,
                    weight_is_kn=kn, backend="torch")
    ref_y, ref_inputs = reference(t, scaling=1.7, kn=kn)
    check(t, y, ref_y, ref_inputs, dtype, torch.randn(m, n).to(dtype))


def test_tolerance_catches_transposed_or_misscaled_terms():
    t = _inputs(37, 45, 29, 3, torch.bfloat16)
    y = lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], scaling=1.7, backend="torch")
    tol = TOLERANCE[torch.bfloat16]
    for wrong in (reference(t, scaling=2 * 1.7)[0], reference(t, scaling=0.0)[0]):
        with pytest.raises(AssertionError):
            torch.testing.assert_close(y.double(), wrong, atol=tol * wrong.abs().max().item(), rtol=tol)


def test_three_d_input_and_mixed_adapter_dtype():
    t = _inputs(5, 24, 20, 4, torch.bfloat16, adapter_dtype=torch.float32, lead=(3,))
    y = lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], scaling=0.5, backend="torch")
    assert y.shape == (3, 5, 20)
    ref_y, ref_inputs = reference(t, scaling=0.5)
    check(t, y, ref_y, ref_inputs, torch.bfloat16, torch.randn(3, 5, 20).bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_uses_the_mask_regenerated_from_the_seed(dtype):
    p, seed = 0.3, 1234
    t = _inputs(40, 48, 24, 4, dtype)
    y = lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], scaling=2.0, dropout_p=p,
                    seed=seed, backend="torch")
    keep = lora_torch.dropout_keep_mask(seed, (40, 48), p, "cpu")
    assert abs(keep.float().mean().item() - (1 - p)) < 0.03
    ref_y, ref_inputs = reference(t, scaling=2.0, keep=keep, dropout_p=p)
    check(t, y, ref_y, ref_inputs, dtype, torch.randn(40, 24).to(dtype))


def test_dropout_gradients_against_finite_differences():
    t = _inputs(6, 5, 4, 2, torch.float64, lora_bias=True)

    def f(x, bias, a, b, lora_bias):
        return lora_linear(x, t["weight"], bias, a, b, lora_bias, scaling=1.3, dropout_p=0.4, seed=77,
                           backend="torch")

    assert torch.autograd.gradcheck(f, (t["x"], t["bias"], t["lora_a"], t["lora_b"], t["lora_bias"]))


def test_gate_off_runs_base_only_and_gives_no_adapter_gradient():
    t = _inputs(9, 12, 10, 2, torch.float32)
    y = lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], scaling=3.0, dropout_p=0.2,
                    gate=False, backend="torch")
    assert torch.equal(y, torch.nn.functional.linear(t["x"], t["weight"], t["bias"]))
    y.sum().backward()
    assert t["lora_a"].grad is None and t["lora_b"].grad is None
    torch.testing.assert_close(t["x"].grad, torch.ones(9, 10) @ t["weight"])


def test_only_small_tensors_are_saved():
    t = _inputs(64, 32, 48, 4, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], scaling=1.0, dropout_p=0.1,
                    backend="torch")
    ptrs = {s.untyped_storage().data_ptr() for s in saved}
    params = {v.untyped_storage().data_ptr() for k, v in t.items() if v is not None}
    new = [s for s in saved if s.untyped_storage().data_ptr() not in params]
    assert len(ptrs) <= 5 and all(s.shape == (64, 4) for s in new)  # only S = drop(x) A^T is new


def test_bad_arguments():
    t = _inputs(4, 8, 6, 2, torch.float32)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(t["x"], t["weight"], None, t["lora_a"], t["lora_b"], scaling=1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        lora_linear(t["x"], t["weight"], None, t["lora_b"], t["lora_a"], scaling=1.0)
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", torch.device("cpu"))
    expected_on_cpu = "native" if backend_available("native") else "torch"
    assert resolve_backend("auto", torch.device("cpu")) == expected_on_cpu
