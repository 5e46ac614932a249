"""Full-size parity of the GPU backends against the float64 reference (``pytest -m gpu``; run by bench/gpu_check.py).

Skipped without CUDA. The shapes are the layer sizes of 7B-13B models, where rounding, split-K reductions and the
64-bit-offset and small-M dispatch paths differ from the small shapes of the CPU tests.
"""

from __future__ import annotations

import pytest
import torch
from reference import TOLERANCE, check_dora_layer, dora_inputs, gated_lora, relative_error

from coto_kernels.functional import lora_linear
from coto_kernels.kernels import KERNEL_BACKENDS, backend_available, load_backend, native_cuda_status

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="full-size parity needs a CUDA GPU")]

# (M, K, N, r, Conv1D layout, adapter dtype, biases)
SHAPES = {
    "attn-4096": (4096, 4096, 4096, 16, False, torch.bfloat16, False),
    "mlp-up-r64": (8192, 4096, 14336, 64, False, torch.bfloat16, True),
    "mlp-down-conv1d-fp32-adapters": (2048, 14336, 4096, 8, True, torch.float32, False),
    "small-M": (48, 4096, 4096, 16, False, torch.bfloat16, True),
}
GPU_BACKENDS = [name for name in ("triton", "native") if name in KERNEL_BACKENDS]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("gate,p", [(True, 0.0), (True, 0.1), (False, 0.0)], ids=["gate1-p0", "gate1-p0.1", "gate0"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_full_size_parity(shape: str, gate: bool, p: float, backend: str):
    if not backend_available(backend):
        pytest.skip(f"backend {backend!r} is not built here")
    if backend == "native" and native_cuda_status() is not None:  # the CPU ops alone cannot take CUDA tensors
        pytest.skip(f"native CUDA kernels unavailable: {native_cuda_status()}")
    m, k, n, r, kn, adapter_dtype, biases = SHAPES[shape]
    dtype, device, seed, scaling = torch.bfloat16, "cuda", 1234, 2.0
    g = torch.Generator(device=device).manual_seed(m + k + n + r)

    def rnd(*size, dt=dtype, scale=1.0):
        return (torch.randn(*size, generator=g, device=device) * scale).to(dt)

    x = rnd(m, k).requires_grad_()
    weight = rnd(k, n, scale=k**-0.5) if kn else rnd(n, k, scale=k**-0.5)
    bias = rnd(n).requires_grad_() if biases else None
    lora_a = rnd(r, k, dt=adapter_dtype, scale=k**-0.5).requires_grad_()
    lora_b = rnd(n, r, dt=adapter_dtype, scale=r**-0.5).requires_grad_()
    lora_bias = rnd(n, dt=adapter_dtype).requires_grad_() if biases else None
    dy = rnd(m, n)

    y = lora_linear(x, weight, bias, lora_a, lora_b, lora_bias, scaling=scaling, dropout_p=p, gate=gate,
                    weight_is_kn=kn, seed=seed, backend=backend)
    y.backward(dy)
    keep = load_backend(backend).dropout_keep_mask(seed, (m, k), p, device) if p > 0 else None
    ref = gated_lora(x, weight, bias, lora_a, lora_b, lora_bias, scaling=scaling, gate=gate, keep=keep,
                     dropout_p=p, weight_is_kn=kn, dy=dy)
    pairs = {"y": (y, ref["y"]), "dx": (x.grad, ref["dx"])}
    if biases:
        pairs["d_bias"] = (bias.grad, ref["d_bias"])
    if gate:
        pairs.update(d_lora_a=(lora_a.grad, ref["d_lora_a"]), d_lora_b=(lora_b.grad, ref["d_lora_b"]))
        if biases:
            pairs["d_lora_bias"] = (lora_bias.grad, ref["d_lora_bias"])
    else:
        assert lora_a.grad is None and lora_b.grad is None  # gated off: no adapter gradient at all
    errors = {name: relative_error(out, expected) for name, (out, expected) in pairs.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOLERANCE[dtype], f"{shape} {backend} gate={gate} p={p}: {errors}"


# (M, K, N, r, Conv1D layout, biases): DoRA through dora_linear(backend="triton")
DORA_SHAPES = {
    "attn-4096": (4096, 4096, 4096, 16, False, False),
    "mlp-up-conv1d-biases": (8192, 4096, 11008, 16, True, True),
    "small-M": (48, 4096, 4096, 16, False, True),  # dropout: the dora_torch route below cublas_below_m
}


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("shape", list(DORA_SHAPES))
def test_full_size_dora_parity(shape: str, p: float):
    """Output and every gradient (the magnitude's included) against PEFT's DoRA formula in float64; with dropout
    the GEMMs' two-accumulator path (DORA_DROPOUT) and the shared mask."""
    m, k, n, r, kn, biases = DORA_SHAPES[shape]
    t = dora_inputs(m, k, n, r, torch.bfloat16, device="cuda", kn=kn, bias=biases, lora_bias=biases, seed=m + n)
    check_dora_layer(t, torch.bfloat16, backend="triton", device="cuda", scaling=2.0, dropout_p=p, kn=kn, seed=1234)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_training_step_queues_without_a_host_sync(dora: bool):
    """After a warm-up (autotuning benchmarks, and so syncs, once per shape), a gated-on forward + backward of the
    Triton backend makes no synchronising CUDA call: the CPU keeps queueing ahead of the GPU. DoRA with a row
    the norm's precision guard flags and a zero magnitude, whose fix-ups run on the device."""
    from coto_kernels.functional_dora import dora_linear

    m, k, n, r = 1024, 512, 384, 16
    t = dora_inputs(m, k, n, r, torch.bfloat16, device="cuda", bias=False, seed=5)
    with torch.no_grad():
        t["lora_a"][0] = -t["weight"][0] * 0.5  # with scaling 2 and B[0] = e_0 * 0.8: row 0 flagged
        t["lora_b"][0] = 0.0
        t["lora_b"][0, 0] = 0.8
        t["magnitude"][3] = 0.0
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

    def step() -> None:
        for value in t.values():
            if value is not None:
                value.grad = None
        if dora:
            y = dora_linear(*t.values(), scaling=2.0, dropout_p=0.0, backend="triton")
        else:
            y = lora_linear(t["x"], t["weight"], None, t["lora_a"], t["lora_b"], scaling=2.0, dropout_p=0.1,
                            seed=7, backend="triton")
        y.backward(dy)

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert t["lora_a"].grad is not None and (not dora or t["magnitude"].grad is not None)
