"""The Triton backend behind the autograd Function and ``patch``: agrees with the PyTorch backend and with PEFT.

Runs under the Triton CPU interpreter when there is no GPU (``conftest.py`` sets ``TRITON_INTERPRET=1``);
the float64 reference and tolerances are ``reference.py``'s.
"""

from __future__ import annotations

import pytest
import torch
from helpers import check_patch_matches_peft
from reference import assert_matches, gated_lora

from coto_kernels.functional import lora_linear, triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=[0, 10**9], ids=["fused-gemm", "cublas-small-m"])
def cublas_below_m(request, monkeypatch):
    """The layer calls the backend with the default ``cublas_below_m``, which the environment variable sets."""
    from coto_kernels.kernels import lora_triton

    monkeypatch.setenv(lora_triton.CUBLAS_BELOW_M_ENV, str(request.param))
    return request.param


@pytest.fixture(autouse=True)
def tf32_on():
    """fp32 inputs reach the Triton kernels only with TF32 allowed (IEEE fp32 runs the torch backend); the CPU
    interpreter computes in fp32 either way."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def _operands(m, k, n, r, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    bias = torch.randn(n, generator=g).to(DEVICE, dtype).requires_grad_()
    lora_a = (torch.randn(r, k, generator=g) / k**0.5).to(DEVICE, dtype).requires_grad_()
    lora_b = torch.randn(n, r, generator=g).to(DEVICE, dtype).requires_grad_()
    return x, weight, bias, lora_a, lora_b


@pytest.mark.parametrize("gate", [True, False])
def test_backends_agree_on_the_same_inputs(gate, cublas_below_m):
    grads = {}
    outputs = {}
    dy = torch.randn(33, 19, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    for backend in ("torch", "triton"):
        x, weight, bias, lora_a, lora_b = _operands(33, 40, 19, 3)
        y = lora_linear(x, weight, bias, lora_a, lora_b, scaling=1.5, gate=gate, backend=backend)
        y.backward(dy)
        outputs[backend] = y.detach()
        grads[backend] = [t.grad for t in (x, bias, lora_a, lora_b)]
    assert_matches(outputs["triton"], outputs["torch"], torch.float32, "y")
    for name, got, want in zip(("dx", "d_bias", "d_lora_a", "d_lora_b"), grads["triton"], grads["torch"], strict=True):
        if want is None:
            assert got is None, name
        else:  # fp32, summed in another order
            assert_matches(got, want, torch.float32, name)


def test_triton_dropout_matches_float64_with_its_own_mask():
    from coto_kernels.kernels import lora_triton

    p, seed = 0.3, 99
    x, weight, bias, lora_a, lora_b = _operands(40, 36, 24, 4)
    y = lora_linear(x, weight, bias, lora_a, lora_b, scaling=2.0, dropout_p=p, seed=seed, backend="triton")
    keep = lora_triton.dropout_keep_mask(seed, (40, 36), p, DEVICE)
    dy = torch.ones(40, 24, device=DEVICE)
    ref = gated_lora(x, weight, bias, lora_a, lora_b, scaling=2.0, keep=keep, dropout_p=p, dy=dy)
    assert_matches(y, ref["y"], torch.float32, "y")
    y.backward(dy)
    for name, got in (("dx", x.grad), ("d_bias", bias.grad), ("d_lora_a", lora_a.grad), ("d_lora_b", lora_b.grad)):
        assert_matches(got, ref[name], torch.float32, name)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_patch_with_triton_backend_matches_peft(arch, cublas_below_m):
    check_patch_matches_peft(arch, "triton", DEVICE)
