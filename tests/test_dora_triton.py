"""The Triton DoRA backend (``dora_triton``) against float64 PEFT DoRA math (CPU interpreter without a GPU):
every output and gradient, the magnitude's included, through the autograd Function and the kernel functions."""

from __future__ import annotations

import contextlib
import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first triton.jit: the interpreter is chosen at decoration
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from reference import (  # noqa: E402
    assert_matches,
    check_dora_layer,
    check_fresh_adapter_norm_is_exact,
    check_guard_fixes_cancelling_rows,
    dora_inputs,
    nearly_cancelling,
    peft_dora,
)

from coto_kernels.functional_dora import dora_linear  # noqa: E402
from coto_kernels.kernels import DORA_KERNEL_BACKENDS, dora_torch, load_dora_backend, lora_triton  # noqa: E402
from coto_kernels.kernels import dora_triton as kernels  # noqa: E402
from coto_kernels.kernels.interface import GradRequest, LoraOptions  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
F32, BF16 = torch.float32, torch.bfloat16

@pytest.fixture(autouse=True)
def tf32_on():
    """fp32 reaches the Triton kernels only with TF32 allowed (the interpreter computes in fp32 either way)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(autouse=True)
def fused_base_gemm(monkeypatch):
    """The small test batches would run the base GEMM on cuBLAS (M < 128): run the fused main loop instead
    (``test_cublas_base_path_and_saved_y_with_bias`` covers the cuBLAS path explicitly)."""
    monkeypatch.setenv(lora_triton.CUBLAS_BELOW_M_ENV, "0")


def _inputs(m, k, n, r, dtype, **options):
    return dora_inputs(m, k, n, r, dtype, device=DEVICE, **options)


def _dy(t, dtype, seed=3):
    m, n = t["x"].shape[0], t["lora_b"].shape[0]
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def _check_layer(t, dtype, *, scaling=1.7, dropout_p=0.0, kn=False, seed=3):
    """dora_linear(backend="triton"): y and every gradient against PEFT's formula in float64."""
    check_dora_layer(t, dtype, backend="triton", device=DEVICE, scaling=scaling, dropout_p=dropout_p, kn=kn,
                     seed=seed)


def test_triton_is_a_registered_dora_backend():
    assert "triton" in DORA_KERNEL_BACKENDS
    assert load_dora_backend("triton") is kernels


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("lora_bias", [True, False], ids=["lora_bias", "no_lora_bias"])
@pytest.mark.parametrize("kn", [False, True], ids=["linear", "conv1d"])
def test_layer_output_and_every_gradient_match_float64_peft(dtype, bias, lora_bias, kn):
    """Without a bias the magnitude gradient comes from the saved Y, with one from the Z the GEMM stores."""
    t = _inputs(37, 45, 70, 3, dtype, kn=kn, bias=bias, lora_bias=lora_bias)
    _check_layer(t, dtype, kn=kn)


def test_rank_16_with_several_tiles_and_bf16_base_with_fp32_adapters():
    t = _inputs(70, 80, 66, 16, BF16, lora_bias=True)
    for name in ("lora_a", "lora_b", "lora_bias"):
        t[name] = t[name].detach().float().requires_grad_()
    _check_layer(t, BF16, scaling=0.5)


def test_zero_magnitude_columns_get_their_gradient():
    """Y_j carries nothing of Z_j where m_j = 0: those columns of dm are recomputed, not divided by zero."""
    t = _inputs(37, 45, 29, 3, F32, bias=False)
    with torch.no_grad():
        t["magnitude"][[2, 11]] = 0.0
    _check_layer(t, F32)


def test_zero_magnitude_columns_over_several_row_k_and_rank_chunks():
    """``_silent_columns_dm_kernel`` over 3 row blocks, 4 K chunks (the last partial) and 2 rank chunks, with a
    lora_bias; bf16 activations with fp32 adapters."""
    t = _inputs(150, 200, 40, 20, BF16, bias=False, lora_bias=True)
    for name in ("lora_a", "lora_b", "lora_bias"):
        t[name] = t[name].detach().float().requires_grad_()
    with torch.no_grad():
        t["magnitude"][[0, 17, 39]] = 0.0
    _check_layer(t, BF16, scaling=0.7)


@contextlib.contextmanager
def _no_host_reads():
    """Fail on any read of a tensor's values by the host (on a GPU: a sync): ``nonzero``, ``item``, ``bool``."""
    def host_read(*args, **kwargs):
        raise AssertionError("the Triton DoRA path read a tensor's values on the host")

    with pytest.MonkeyPatch.context() as patch:
        for name in ("nonzero", "item", "__bool__", "tolist"):
            patch.setattr(torch.Tensor, name, host_read)
        yield


def test_row_norm_fixes_cancelling_rows_on_the_device(monkeypatch):
    """``_row_norm_kernel`` recomputes the guard's rows in fp64 (3 K chunks, 2 rank chunks)."""
    check_guard_fixes_cancelling_rows(kernels.dora_row_norm, monkeypatch, device=DEVICE, k=300, n=8, r=20)


def test_row_norm_of_a_fresh_adapter_is_the_weight_norm_bit_for_bit():
    check_fresh_adapter_norm_is_exact(kernels.dora_row_norm, _inputs(4, 77, 33, 8, F32, lora_bias=True))


@pytest.mark.parametrize("dtype", [BF16, torch.float16])
@pytest.mark.parametrize("kn", [False, True], ids=["linear", "conv1d"])
def test_row_norm_reads_a_16_bit_weight_once_and_keeps_fp32_adapters_digits(monkeypatch, dtype, kn):
    """W A'^T from one S pass over W's rows with A' split into a head and a tail in W's dtype: as accurate as the
    fp32 product (dropping the tail costs ~1e-4 relative here), never the chunked fp32 conversion of W."""
    def chunked(*args):
        raise AssertionError("a 16-bit weight went through the chunked fp32 conversion")

    monkeypatch.setattr(dora_torch, "times_transposed_fp32", chunked)
    t = _inputs(4, 300, 70, 16, dtype, kn=kn, lora_bias=True, seed=1)
    g = torch.Generator().manual_seed(2)
    a, b, lb = (torch.randn(*t[name].shape, generator=g).mul(0.3).to(DEVICE)
                for name in ("lora_a", "lora_b", "lora_bias"))
    w_nk = (t["weight"].t() if kn else t["weight"]).double()
    exact = torch.linalg.norm(w_nk + 1.7 * (b.double() @ a.double() + lb.double()[:, None]), dim=1)
    norm = kernels.dora_row_norm(t["weight"], a, b, lb, scaling=1.7, weight_is_kn=kn)
    assert ((norm.double() - exact).abs() / exact).max() < 1e-6


def test_unsplit_adapters_up_to_max_rank_take_the_one_pass_product(monkeypatch):
    """Adapters already in W's dtype go in once, so ranks up to ``MAX_RANK`` (not half of it) use the S pass;
    split fp32 adapters double the width and fall back above ``MAX_RANK / 2``."""
    taken = []
    monkeypatch.setattr(dora_torch, "times_transposed_fp32",
                        lambda w, a: taken.append(a.shape[0]) or (w.float() @ a.t()))
    g = torch.Generator().manual_seed(5)
    rank = lora_triton.MAX_RANK // 2 + 8
    w_nk = torch.randn(6, 40, generator=g).to(BF16).to(DEVICE)
    a = torch.randn(rank, 40, generator=g).to(BF16).float().to(DEVICE)  # exact in bf16: no tail needed
    got = kernels.weight_times_adapter_t(w_nk, a, split=False)
    assert taken == []
    assert_matches(got, w_nk.double() @ a.double().t(), F32, "W A^T of unsplit adapters")
    kernels.weight_times_adapter_t(w_nk, a, split=True)
    assert taken == [rank]


def test_forward_and_backward_read_nothing_on_the_host():
    """Guarded norm (cancelling rows), zero-magnitude columns, saved Y: the Triton DoRA step runs without reading a
    value on the host, so on a GPU it queues without a sync."""
    weight, lora_a, lora_b, scaling = nearly_cancelling(k=48, n=20, r=4, remainder=0.2, device=DEVICE)  # flagged, c ~ 5
    t = _inputs(33, 48, 20, 4, F32, bias=False)
    t.update(weight=weight, lora_a=lora_a.requires_grad_(), lora_b=lora_b.requires_grad_())
    with torch.no_grad():
        t["magnitude"][[3, 7]] = 0.0
    dy = _dy(t, F32)
    need = GradRequest(dx=True, dlora=True)
    with _no_host_reads():
        _, _, grads, _ = _direct(t, scaling=scaling, cublas_below_m=0, save_z=True, need=need, need_magnitude=True)
    ref = peft_dora(*t.values(), scaling=scaling, dy=dy)
    for name in ("dx", "d_lora_a", "d_lora_b", "d_magnitude"):
        assert_matches(getattr(grads, name), ref[name], F32, name)


def test_gate_off_is_the_base_layer_and_launches_no_kernel(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a DoRA kernel was launched with the gate off")

    for name in ("launch_x_pass", "launch_gemm", "launch_dy_reductions"):
        monkeypatch.setattr(lora_triton, name, boom)
    t = _inputs(20, 24, 16, 4, F32, lora_bias=True)
    y = dora_linear(*t.values(), scaling=2.0, gate=False, backend="triton")
    ref = t["x"].detach() @ t["weight"].t() + t["bias"].detach()
    assert_matches(y, ref.double(), F32, "y")
    y.sum().backward()
    assert all(t[name].grad is None for name in ("lora_a", "lora_b", "lora_bias", "magnitude"))


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("kn", [False, True], ids=["linear", "conv1d"])
def test_dropout_two_accumulator_kernels_match_float64_peft(monkeypatch, dtype, bias, kn):
    """Dropout > 0: PEFT's two-term formula from the GEMMs' two accumulators (DORA_DROPOUT), with the shared mask;
    fails if a launch falls back to the torch kernels (except fp32 on a GPU, which always runs them)."""
    def no_torch(*args, **kwargs):
        raise AssertionError("the Triton DoRA path ran the torch kernels")

    if dtype is not F32 or lora_triton.INTERPRET:
        monkeypatch.setattr(kernels.dora_torch, "dora_forward", no_torch)
        monkeypatch.setattr(kernels.dora_torch, "dora_backward", no_torch)
    t = _inputs(37, 45, 70, 3, dtype, kn=kn, bias=bias, lora_bias=True)
    _check_layer(t, dtype, dropout_p=0.3, kn=kn)


def test_dropout_with_rank_16_several_tiles_and_unaligned_k():
    """Several row, column and K tiles (the mask's row keys and K offsets per tile) at an odd K."""
    t = _inputs(130, 83, 66, 16, BF16, lora_bias=True, seed=5)
    _check_layer(t, BF16, scaling=0.5, dropout_p=0.1, seed=11)


def test_dropout_below_cublas_below_m_runs_the_torch_kernels(monkeypatch):
    """A handful of rows: two cuBLAS GEMMs each way (dora_torch), with the same mask and no warning."""
    monkeypatch.setenv(lora_triton.CUBLAS_BELOW_M_ENV, "1000")

    def no_gemm(*args, **kwargs):
        raise AssertionError("the fused GEMM ran below cublas_below_m with dropout")

    monkeypatch.setattr(lora_triton, "launch_gemm", no_gemm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Triton 3.6's interpreter (the GPU image's Triton, run on the CPU) calls int() on one-element arrays
        warnings.filterwarnings("ignore", "Conversion of an array with ndim > 0", DeprecationWarning)
        _check_layer(_inputs(37, 45, 29, 3, F32, lora_bias=True), F32, dropout_p=0.3)


def test_dropout_gemm_refuses_the_cublas_path():
    x = torch.randn(8, 16, device=DEVICE)
    w, a, b = torch.randn(12, 16, device=DEVICE), torch.randn(2, 16, device=DEVICE), torch.randn(12, 2, device=DEVICE)
    dropout = lora_triton.KernelDropout.of(LoraOptions(scaling=1.0, dropout_p=0.2, seed=1))
    with pytest.raises(ValueError, match="two-accumulator"):
        lora_triton.launch_gemm(a=x, b=w, b_strides=(w.stride(1), w.stride(0)), out_features=12, bias=None,
                                lowrank_s=x @ a.t(), lowrank_l=b, l_strides=(b.stride(1), b.stride(0)),
                                lora_scale=1.0, lora_bias=None, dropout=dropout, cublas_below_m=100,
                                cublas_base=lambda: x @ w.t(), col_scale=torch.ones(12, device=DEVICE),
                                dora_dropout=True)


def _direct(t, *, scaling, cublas_below_m, save_z, need, need_magnitude, y_as_saved=False):
    """dora_forward + dora_backward called directly (``y_as_saved``: keep Y even with a bias, as a caller may)."""
    d = {name: (v.detach() if v is not None else None) for name, v in t.items()}
    options = LoraOptions(scaling=scaling)
    norm = kernels.dora_row_norm(d["weight"], d["lora_a"], d["lora_b"], d["lora_bias"], scaling=scaling,
                                 weight_is_kn=False)
    y, s, z = kernels.dora_forward(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], d["lora_bias"],
                                   d["magnitude"], norm, options=options, save_z=save_z,
                                   cublas_below_m=cublas_below_m)
    dy = _dy(t, t["x"].dtype)
    grads = kernels.dora_backward(
        dy, d["x"], y if (z is None or y_as_saved) else None, d["weight"], d["bias"], d["lora_a"], d["lora_b"],
        d["lora_bias"], d["magnitude"], norm, s, None if y_as_saved else z, options=options, need=need,
        need_magnitude=need_magnitude, cublas_below_m=cublas_below_m)
    return y, z, grads, dy


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_cublas_base_path_and_saved_y_with_bias(dtype):
    """M below ``cublas_below_m``: the base GEMM on cuBLAS, the kernel adds the rest (bias after the scale);
    the magnitude gradient from a saved Y with a bias subtracts bias * colsum(dY) from the dY pass."""
    t = _inputs(37, 45, 29, 3, dtype, lora_bias=True)
    need = GradRequest(dx=True, dlora=True, dbias=True, dlora_bias=True)
    y, z, grads, dy = _direct(t, scaling=1.3, cublas_below_m=10**9, save_z=True, need=need, need_magnitude=True,
                              y_as_saved=True)
    ref = peft_dora(*t.values(), scaling=1.3, dy=dy)
    assert z is not None
    assert_matches(y, ref["y"], dtype, "y")
    for name in ("dx", "d_bias", "d_lora_a", "d_lora_b", "d_lora_bias", "d_magnitude"):
        assert_matches(getattr(grads, name), ref[name], dtype, name)


def test_stored_z_is_the_pre_scale_output():
    t = _inputs(37, 45, 29, 3, F32, lora_bias=True)
    need = GradRequest(dx=False, dlora=False)
    y, z, grads, _ = _direct(t, scaling=1.3, cublas_below_m=0, save_z=True, need=need, need_magnitude=False)
    norm = kernels.dora_row_norm(t["weight"], t["lora_a"], t["lora_b"], t["lora_bias"], scaling=1.3,
                                 weight_is_kn=False)
    d = {name: v.detach().double() for name, v in t.items() if v is not None}
    z_ref = d["x"] @ d["weight"].t() + 1.3 * (d["x"] @ d["lora_a"].t() @ d["lora_b"].t() + d["lora_bias"])
    assert_matches(z, z_ref, F32, "z")
    assert_matches(y, d["bias"] + (d["magnitude"] / norm.double()) * z_ref, F32, "y")
    assert all(g is None for g in grads)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_split_reductions_and_partial_requests(monkeypatch, deterministic):
    """Several programs per reduction (atomics) or the fixed-order torch path, and partial ``need`` flags."""
    monkeypatch.setattr(lora_triton, "_target_programs", lambda device: 16)
    t = _inputs(130, 150, 140, 5, F32, lora_bias=True, seed=3)
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        full = GradRequest(dx=True, dlora=True, dbias=True, dlora_bias=True)
        y, _, grads, dy = _direct(t, scaling=0.5, cublas_below_m=0, save_z=True, need=full, need_magnitude=True)
        partial = GradRequest(dx=False, dlora=False, dbias=True, dlora_bias=False)
        _, _, only, _ = _direct(t, scaling=0.5, cublas_below_m=0, save_z=True, need=partial, need_magnitude=True)
    finally:
        torch.use_deterministic_algorithms(saved)
    ref = peft_dora(*t.values(), scaling=0.5, dy=dy)
    assert_matches(y, ref["y"], F32, "y")
    for name in ("dx", "d_bias", "d_lora_a", "d_lora_b", "d_lora_bias", "d_magnitude"):
        assert_matches(getattr(grads, name), ref[name], F32, name)
    assert only.dx is None and only.d_lora_a is None and only.d_lora_b is None and only.d_lora_bias is None
    assert_matches(only.d_bias, ref["d_bias"], F32, "d_bias")
    assert_matches(only.d_magnitude, ref["d_magnitude"], F32, "d_magnitude")
