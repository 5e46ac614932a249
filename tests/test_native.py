"""The native backend (csrc/): each op against float64, masks bit for bit, the layer, PEFT parity, compile.

Skipped, with the reason the build recorded, when the extension is not built (``python -m coto_kernels.kernels``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import check_patch_matches_peft
from reference import TOLERANCE, assert_matches, gated_lora, relative_error

from coto_kernels.functional import lora_linear
from coto_kernels.kernels import backend_status, dropout_mask

_WHY_NOT = backend_status()["native"]
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=f"native backend not built: {_WHY_NOT}")
DEVICE = "cpu"


def _ops():
    from coto_kernels.kernels import lora_native  # noqa: F401  (loads the library)

    return torch.ops.coto_kernels_native


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return (torch.randn(*shape, generator=g) / shape[-1] ** 0.25).to(dtype)


def _keep(seed, shape, p):
    return dropout_mask.dropout_keep_mask(seed, shape, p, DEVICE)


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 2, 2**40 + 3, 2**63 - 1])
@pytest.mark.parametrize("p", [0.0, 0.05, 0.1, 0.5, 0.9])
def test_mask_is_bit_identical_to_the_torch_definition(seed, p):
    from coto_kernels.kernels import lora_native

    for shape in ((37, 53), (1, 1000), (130, 8)):
        assert torch.equal(lora_native.dropout_keep_mask(seed, shape, p, DEVICE), _keep(seed, shape, p)), shape


def test_masks_of_other_seeds_differ():
    from coto_kernels.kernels import lora_native

    a = lora_native.dropout_keep_mask(5, (64, 64), 0.5, DEVICE)
    b = lora_native.dropout_keep_mask(6, (64, 64), 0.5, DEVICE)
    assert 0.4 < (a != b).float().mean().item() < 0.6


OP_CASES = [  # M, K, N, r
    (37, 53, 29, 1),
    (130, 300, 70, 16),
    (9, 1000, 23, 5),
    (66, 97, 40, 64),
    (21, 41, 300, 256),
    (333, 130, 50, 8),  # several row blocks per thread (csrc/lora_ops.cpp: kBlockRows = 64)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("m,k,n,r", OP_CASES)
def test_ops_match_float64(m, k, n, r, p, dtype):
    ops = _ops()
    seed = 1000 + m
    x, lora_a, lora_b = _rand(m, k, dtype=dtype), _rand(r, k), _rand(n, r)
    dy = _rand(m, n, dtype=dtype, seed=1)
    keep = _keep(seed, (m, k), p).double()
    xd = x.double() * keep / (1 - p)

    s = ops.lora_down(x, lora_a, seed, p)
    assert s.dtype == torch.float32 and s.shape == (m, r)
    assert_matches(s, xd @ lora_a.double().t(), torch.float32, "S")  # fp32 accumulation of exact inputs

    ds, db, colsum = ops.lora_dy(dy, lora_b, s, 1.7, True, True)
    assert_matches(ds, 1.7 * dy.double() @ lora_b.double(), torch.float32, "dS")
    assert_matches(db, 1.7 * dy.double().t() @ s.double(), torch.float32, "dB")
    assert_matches(colsum, dy.double().sum(0), torch.float32, "colsum")

    dx = _rand(m, k, dtype=dtype, seed=2)
    dx_ref = dx.double() + (ds.double() @ lora_a.double()) * keep / (1 - p)
    da = ops.lora_dx_da(dx, x, ds, lora_a, seed, p, True)
    assert_matches(da, ds.double().t() @ xd, torch.float32, "dA")
    assert_matches(dx, dx_ref, dtype, "dX (in place)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n", [(37, 29), (300, 1000), (5, 129)])
def test_dora_dy_matches_float64(m, n, dtype):
    dy, saved = _rand(m, n + 3, dtype=dtype)[:, 3:], _rand(m, n, dtype=dtype, seed=4)  # dy: row stride n + 3
    scale = torch.rand(n, generator=torch.Generator().manual_seed(m)) + 0.5
    g, dots = _ops().dora_dy(dy, scale, saved)
    assert g.dtype == dtype and dots.dtype == torch.float32 and dots.shape == (n,)
    assert_matches(g, dy.double() * scale.double(), dtype, "G = c dY")
    assert_matches(dots, (dy.double() * saved.double()).sum(0), torch.float32, "sum_rows(dY * saved)")
    g_alone, no_dots = _ops().dora_dy(dy, scale, None)
    assert torch.equal(g_alone, g) and no_dots.numel() == 0


def test_ops_optional_outputs_and_strided_x():
    ops = _ops()
    x = _rand(40, 70)[:, 3:60]  # unit column stride, row stride 70
    lora_a, lora_b, dy = _rand(4, 57), _rand(12, 4), _rand(40, 12)
    keep = _keep(9, (40, 57), 0.2).double()
    s = ops.lora_down(x, lora_a, 9, 0.2)
    assert_matches(s, (x.double() * keep / 0.8) @ lora_a.double().t(), torch.float32, "S of a strided x")
    ds, db, colsum = ops.lora_dy(dy, lora_b, s, 1.0, False, False)
    assert db.numel() == 0 and colsum.numel() == 0
    assert ops.lora_dx_da(None, x, ds, lora_a, 9, 0.2, False).numel() == 0
    da = ops.lora_dx_da(None, x, ds, lora_a, 9, 0.2, True)
    assert_matches(da, ds.double().t() @ (x.double() * keep / 0.8), torch.float32, "dA without dX")


def test_bad_arguments_name_the_op():
    ops = _ops()
    with pytest.raises(RuntimeError, match="lora_down"):
        ops.lora_down(_rand(4, 8), _rand(2, 9), 0, 0.0)
    with pytest.raises(RuntimeError, match="dropout_p"):
        ops.lora_down(_rand(4, 8), _rand(2, 8), 0, 1.0)
    weight, lora_a, lora_b = _rand(6, 8), _rand(2, 8), _rand(6, 2)
    with pytest.raises(RuntimeError, match="dora_row_norm: shape mismatch"):
        ops.dora_row_norm(weight, torch.ones(6), lora_a, lora_b, None, 1.0, 0.25, True)  # [K, N] read as [N, K]
    with pytest.raises(RuntimeError, match="dora_row_norm: w_squared"):
        ops.dora_row_norm(weight, torch.ones(5), lora_a, lora_b, None, 1.0, 0.25, False)
    with pytest.raises(RuntimeError, match="dora_row_norm: lora_bias"):
        ops.dora_row_norm(weight, torch.ones(6), lora_a, lora_b, torch.ones(5), 1.0, 0.25, False)


def _layer_inputs(m, k, n, r, dtype, *, kn=False, lora_bias=False, adapter_dtype=None, lead=()):
    g = torch.Generator().manual_seed(m * k + r)
    adapter_dtype = adapter_dtype or dtype

    def rand(*shape, dt=dtype, grad=True):
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.25).to(dt).requires_grad_(grad)

    return dict(
        x=rand(*lead, m, k), weight=rand(k, n, grad=False) if kn else rand(n, k, grad=False), bias=rand(n),
        lora_a=rand(r, k, dt=adapter_dtype), lora_b=rand(n, r, dt=adapter_dtype),
        lora_bias=rand(n, dt=adapter_dtype) if lora_bias else None,
    )


_GRADS = dict(x="dx", bias="d_bias", lora_a="d_lora_a", lora_b="d_lora_b", lora_bias="d_lora_bias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("kn", [False, True], ids=["linear", "conv1d"])
def test_layer_forward_and_grads_match_float64(dtype, p, kn):
    m, k, n, r, seed = 45, 67, 31, 6, 4242
    t = _layer_inputs(m, k, n, r, dtype, kn=kn, lora_bias=True)
    y = lora_linear(**t, scaling=1.7, dropout_p=p, seed=seed, weight_is_kn=kn, backend="native")
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(3)).to(dtype)
    keep = _keep(seed, (m, k), p) if p > 0 else None
    ref = gated_lora(**t, scaling=1.7, keep=keep, dropout_p=p, weight_is_kn=kn, dy=dy)
    assert y.dtype == dtype
    assert_matches(y, ref["y"], dtype, "y")
    y.backward(dy)
    for name, grad_name in _GRADS.items():
        assert t[name].grad is not None and t[name].grad.dtype == t[name].dtype, name
        assert_matches(t[name].grad, ref[grad_name], dtype, name)


def test_layer_three_d_input_and_fp32_adapters_over_bf16():
    t = _layer_inputs(5, 24, 20, 4, torch.bfloat16, adapter_dtype=torch.float32, lead=(3,))
    y = lora_linear(**t, scaling=0.5, dropout_p=0.2, seed=8, backend="native")
    assert y.shape == (3, 5, 20) and y.dtype == torch.bfloat16
    dy = torch.randn(3, 5, 20).bfloat16()
    keep = _keep(8, (15, 24), 0.2).view(3, 5, 24)
    ref = gated_lora(**t, scaling=0.5, keep=keep, dropout_p=0.2, dy=dy)
    assert_matches(y, ref["y"], torch.bfloat16, "y")
    y.backward(dy)
    for name, grad_name in _GRADS.items():
        if t[name] is not None:
            assert_matches(t[name].grad, ref[grad_name], torch.bfloat16, name)


def test_layer_catches_a_wrong_mask():
    t = _layer_inputs(40, 48, 24, 4, torch.float32)
    y = lora_linear(**t, scaling=2.0, dropout_p=0.3, seed=1, backend="native")
    ref_other_seed = gated_lora(**t, scaling=2.0, keep=_keep(2, (40, 48), 0.3), dropout_p=0.3)["y"]
    assert relative_error(y, ref_other_seed) > 10 * TOLERANCE[torch.bfloat16]


def test_gate_off_runs_base_only():
    t = _layer_inputs(9, 12, 10, 2, torch.float32)
    y = lora_linear(**t, scaling=3.0, dropout_p=0.2, gate=False, backend="native")
    assert torch.equal(y, torch.nn.functional.linear(t["x"], t["weight"], t["bias"]))
    y.sum().backward()
    assert t["lora_a"].grad is None and t["lora_b"].grad is None
    torch.testing.assert_close(t["x"].grad, torch.ones(9, 10) @ t["weight"])


def test_autocast_matches_the_torch_backend():
    outs = {}
    for backend in ("torch", "native"):
        t = _layer_inputs(33, 40, 19, 3, torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = lora_linear(**t, scaling=1.5, dropout_p=0.1, seed=5, backend=backend)
        y.float().sum().backward()
        outs[backend] = [y] + [t[n].grad for n in ("x", "bias", "lora_a", "lora_b")]
    assert outs["native"][0].dtype == torch.bfloat16
    for got, want in zip(outs["native"], outs["torch"], strict=True):
        assert_matches(got, want, torch.bfloat16)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_patch_with_native_backend_matches_peft(arch):
    check_patch_matches_peft(arch, "native", "cpu")


def test_fake_kernels_agree_with_the_real_ones():
    ops = _ops()
    x, lora_a, lora_b, dy = _rand(12, 20), _rand(3, 20), _rand(7, 3), _rand(12, 7)
    s = ops.lora_down(x, lora_a, 4, 0.1)
    torch.library.opcheck(ops.keep_mask, (x, 4, 0.1))
    torch.library.opcheck(ops.lora_down, (x, lora_a, 4, 0.1))
    torch.library.opcheck(ops.lora_dy, (dy, lora_b, s, 1.5, True, True))
    torch.library.opcheck(ops.lora_dy, (dy, lora_b, s, 1.5, False, False))
    torch.library.opcheck(ops.lora_dx_da, (x.clone(), x, s, lora_a, 4, 0.1, True))
    torch.library.opcheck(ops.lora_dx_da, (None, x, s, lora_a, 4, 0.1, True))
    torch.library.opcheck(ops.dora_dy, (x, torch.rand(20), x.flip(0)))
    torch.library.opcheck(ops.dora_dy, (x, torch.rand(20), None))
    w_squared = x.square().sum(1)
    torch.library.opcheck(ops.dora_row_norm, (x, w_squared, lora_a, _rand(12, 3), None, 1.5, 0.25, False))
    torch.library.opcheck(ops.dora_row_norm, (x.t(), w_squared, lora_a, _rand(12, 3), _rand(12), 1.5, 0.25, True))


def test_torch_compile_traces_the_native_ops():
    t = _layer_inputs(16, 24, 12, 4, torch.float32)

    def step(x, bias, lora_a, lora_b):
        y = lora_linear(x, t["weight"], bias, lora_a, lora_b, scaling=1.5, dropout_p=0.1, seed=3, backend="native")
        return y.square().sum()

    leaves = [t[n] for n in ("x", "bias", "lora_a", "lora_b")]
    eager = torch.autograd.grad(step(*leaves), leaves)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for g, want in zip(got, eager, strict=True):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6)


def test_status_command_reports_every_backend():
    out = subprocess.run([sys.executable, "-m", "coto_kernels.kernels"], capture_output=True, text=True, check=True)
    assert "native  available" in out.stdout and "torch   available" in out.stdout


def test_env_switch_leaves_the_cuda_kernels_unloaded():
    """COTO_KERNELS_NATIVE_CUDA=0 (gpu_check's fallback when loading them would abort) says so in the status."""
    code = "from coto_kernels.kernels import lora_native; print(lora_native.CUDA_STATUS)"
    env = dict(os.environ, COTO_KERNELS_NATIVE_CUDA="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "disabled by COTO_KERNELS_NATIVE_CUDA=0"


def test_native_on_cuda_without_its_cuda_kernels_says_why():
    from coto_kernels.functional import resolve_backend
    from coto_kernels.kernels import native_cuda_status

    why = native_cuda_status()
    if why is None:
        pytest.skip("the native CUDA kernels are loaded here")
    with pytest.raises(ValueError, match="native CUDA kernels, unavailable here: " + re.escape(why)):
        resolve_backend("native", torch.device("cuda"))
    assert resolve_backend("native", torch.device("cpu")) == "native"
