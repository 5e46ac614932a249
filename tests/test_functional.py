"""The gated LoRA autograd Function (PyTorch backend) against float64 PyTorch: forward and every gradient."""

from __future__ import annotations

import pytest
import torch
from reference import assert_matches, gated_lora

from coto_kernels.functional import lora_linear, resolve_backend
from coto_kernels.kernels import lora_torch


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


_GRAD_NAMES = dict(x="dx", bias="d_bias", lora_a="d_lora_a", lora_b="d_lora_b", lora_bias="d_lora_bias")


def check(t, y, dtype, dy, **options):
    """y and every input gradient of ``t`` against ``reference.gated_lora`` under ``options``."""
    ref = gated_lora(**t, dy=dy, **options)
    assert y.dtype == t["x"].dtype
    assert_matches(y, ref["y"], dtype, "y")
    y.backward(dy)
    for name, grad_name in _GRAD_NAMES.items():
        if t[name] is None or not t[name].requires_grad:
            continue
        grad = t[name].grad
        assert grad is not None and grad.dtype == t[name].dtype, name
        assert_matches(grad, ref[grad_name], dtype, name)


SHAPES = [(37, 45, 29, 3), (8, 16, 16, 1), (64, 33, 70, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,n,r", SHAPES)
@pytest.mark.parametrize("kn", [False, True], ids=["linear", "conv1d"])
def test_forward_and_grads_match_float64(dtype, m, k, n, r, kn):
    t = _inputs(m, k, n, r, dtype, kn=kn, lora_bias=True)
    y = lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["lora_bias"], scaling=1.7,
                    weight_is_kn=kn, backend="torch")
    check(t, y, dtype, torch.randn(m, n).to(dtype), scaling=1.7, weight_is_kn=kn)


def test_tolerance_catches_transposed_or_misscaled_terms():
    t = _inputs(37, 45, 29, 3, torch.bfloat16)
    y = lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], scaling=1.7, backend="torch")
    assert_matches(y, gated_lora(**t, scaling=1.7)["y"], torch.bfloat16)
    for wrong in (gated_lora(**t, scaling=2 * 1.7)["y"], gated_lora(**t, scaling=0.0)["y"]):
        with pytest.raises(AssertionError):
            assert_matches(y, wrong, torch.bfloat16)


def test_three_d_input_and_mixed_adapter_dtype():
    t = _inputs(5, 24, 20, 4, torch.bfloat16, adapter_dtype=torch.float32, lead=(3,))
    y = lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], scaling=0.5, backend="torch")
    assert y.shape == (3, 5, 20)
    check(t, y, torch.bfloat16, torch.randn(3, 5, 20).bfloat16(), scaling=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_uses_the_mask_regenerated_from_the_seed(dtype):
    p, seed = 0.3, 1234
    t = _inputs(40, 48, 24, 4, dtype)
    y = lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], scaling=2.0, dropout_p=p,
                    seed=seed, backend="torch")
    keep = lora_torch.dropout_keep_mask(seed, (40, 48), p, "cpu")
    assert abs(keep.float().mean().item() - (1 - p)) < 0.03
    check(t, y, dtype, torch.randn(40, 24).to(dtype), scaling=2.0, keep=keep, dropout_p=p)


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
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
