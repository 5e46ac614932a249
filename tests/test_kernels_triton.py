"""The Triton kernels' host functions against a float64 PyTorch reference (CPU interpreter when there is no GPU)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first triton.jit: the interpreter is chosen at decoration
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from reference import TOLERANCE, gated_lora, relative_error  # noqa: E402

from coto_kernels.kernels import lora_triton  # noqa: E402
from coto_kernels.kernels.interface import GradRequest, LoraOptions  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

# Tolerances and their rationale: tests/reference.py (max abs error / max abs reference value).
TOL = TOLERANCE


@pytest.fixture(autouse=True)
def tf32_on():
    """fp32 inputs reach the Triton kernels only with TF32 allowed (IEEE fp32 goes to the torch backend); the
    interpreter computes in fp32 either way, so the fp32 tolerance below still holds."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


_rel_err = relative_error


def _make(m, k, n, r, dtype, adapter_dtype, bias, lora_bias, weight_is_kn, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(DEVICE)

    x = rnd(m, k)
    w = rnd(k, n, scale=k**-0.5) if weight_is_kn else rnd(n, k, scale=k**-0.5)
    # Adapter scales make S B^T as large as X W^T, so a wrong LoRA term cannot hide under the tolerance.
    a = rnd(r, k, dt=adapter_dtype, scale=k**-0.5)
    b = rnd(n, r, dt=adapter_dtype, scale=r**-0.5)
    return dict(
        x=x, w=w, a=a, b=b, dy=rnd(m, n),
        bias=rnd(n) if bias else None, lora_bias=rnd(n, dt=adapter_dtype) if lora_bias else None,
    )


def _reference(t, weight_is_kn, scaling, gate, p, keep, *, b_override=None):
    """float64 forward and backward of the same inputs (tests/reference.py); keep is the kernels' mask or None."""
    b = t["b"] if b_override is None else b_override
    return gated_lora(t["x"], t["w"], t["bias"], t["a"], b, t["lora_bias"], scaling=scaling, gate=gate,
                      keep=keep, dropout_p=p, weight_is_kn=weight_is_kn, dy=t["dy"])


def _run(t, weight_is_kn, scaling, gate, p, seed, need=(True, True, True, True), cublas_below_m=0):
    options = LoraOptions(scaling=scaling, dropout_p=p, seed=seed, gate=gate, weight_is_kn=weight_is_kn)
    y, s = lora_triton.lora_forward(t["x"], t["w"], t["bias"], t["a"], t["b"], t["lora_bias"], options=options,
                                    cublas_below_m=cublas_below_m)
    grads = lora_triton.lora_backward(t["dy"], t["x"], t["w"], t["a"], t["b"], s, options=options,
                                      need=GradRequest(*need), cublas_below_m=cublas_below_m)
    return y, s, grads._asdict()


def _check(t, out, ref, dtype, adapter_dtype, gate):
    y, s, grads = out
    tol = TOL[dtype]
    assert y.dtype == dtype and grads["dx"].dtype == dtype
    assert _rel_err(y, ref["y"]) < tol, ("y", _rel_err(y, ref["y"]))
    assert _rel_err(grads["dx"], ref["dx"]) < tol, ("dx", _rel_err(grads["dx"], ref["dx"]))
    if t["bias"] is not None:
        assert _rel_err(grads["d_bias"], ref["d_bias"]) < tol
    if not gate:
        assert s is None and all(grads[k] is None for k in ("d_lora_a", "d_lora_b", "d_lora_bias"))
        return
    assert s.dtype == torch.float32 and s.shape == ref["s"].shape
    assert _rel_err(s, ref["s"]) < max(TOL[dtype], 1e-5)
    for name in ("d_lora_a", "d_lora_b", "d_lora_bias"):
        assert grads[name].dtype == adapter_dtype, name
        if ref[name] is None:  # no lora_bias: the reference has no d_lora_bias to compare with
            continue
        # The adapter grads are fp32-accumulated sums; their tolerance is the input dtype's (MMA operands).
        assert _rel_err(grads[name], ref[name]) < tol, (name, _rel_err(grads[name], ref[name]))


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CASES = [
    # id, (M, K, N, r), x dtype, adapter dtype, dropout p, bias, lora_bias, weight_is_kn, cuBLAS path for M
    pytest.param((37, 45, 29, 3), F32, F32, 0.0, True, True, False, False, id="fp32-odd-r3"),
    pytest.param((37, 45, 29, 1), F32, F32, 0.1, False, True, True, False, id="fp32-odd-r1-drop-conv1d"),
    pytest.param((70, 96, 40, 16), F16, F16, 0.2, True, False, False, False, id="fp16-drop"),
    pytest.param((66, 72, 130, 8), BF16, BF16, 0.1, True, True, False, False, id="bf16-drop"),
    pytest.param((37, 45, 29, 3), BF16, F32, 0.1, True, True, True, False, id="bf16-x-fp32-adapters-conv1d"),
    pytest.param((37, 45, 29, 3), BF16, BF16, 0.1, True, True, False, True, id="bf16-cublas-small-m"),
    # ranks 16 / 64 / 256 (the rank-adaptive tiles) on small M and K
    pytest.param((37, 45, 29, 16), F32, F32, 0.05, True, False, False, False, id="fp32-r16-drop"),
    pytest.param((33, 40, 21, 64), F16, F16, 0.5, False, True, False, False, id="fp16-r64-drop"),
    pytest.param((20, 24, 18, 256), BF16, BF16, 0.1, True, False, True, False, id="bf16-r256-drop-conv1d"),
]


# gate 0 is base-only cuBLAS, so one run per layout (the M = 37 cases) is enough.
GATED_CASES = [pytest.param(*c.values, True, id=f"{c.id}-gate1") for c in CASES] + [
    pytest.param(*c.values, False, id=f"{c.id}-gate0") for c in CASES if c.values[0][0] == 37
]


@pytest.mark.parametrize(("shape", "dtype", "adapter_dtype", "p", "bias", "lora_bias", "kn", "cublas", "gate"),
                         GATED_CASES)
def test_matches_reference(shape, dtype, adapter_dtype, p, bias, lora_bias, kn, cublas, gate):
    m, k, n, r = shape
    t = _make(m, k, n, r, dtype, adapter_dtype, bias, lora_bias, kn)
    seed, scaling = 1234, 1.7
    keep = lora_triton.dropout_keep_mask(seed, (m, k), p, DEVICE) if p > 0 else None
    out = _run(t, kn, scaling, gate, p, seed, cublas_below_m=10**9 if cublas else 0)
    _check(t, out, _reference(t, kn, scaling, gate, p, keep), dtype, adapter_dtype, gate)


def test_skinny_passes_read_16bit_x_as_pairs_only_where_words_line_up():
    x = torch.zeros(8, 64, dtype=BF16)
    assert lora_triton.pairs_in_words(x) and lora_triton.pairs_in_words(x.half())
    assert not lora_triton.pairs_in_words(x.float())  # 32-bit elements: no pairs
    assert not lora_triton.pairs_in_words(x[:, :63])  # odd K: the last pair is half outside X
    assert not lora_triton.pairs_in_words(x[:, 1:])  # odd storage offset: words would straddle pairs
    assert not lora_triton.pairs_in_words(x.t())  # column stride 64
    assert not lora_triton.pairs_in_words(torch.zeros(8, 65, dtype=BF16)[:, :64])  # odd row stride


def test_gate_off_launches_no_lora_kernel(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a LoRA kernel was launched with the gate off")

    for name in ("launch_x_pass", "launch_gemm", "launch_dy_reductions"):
        monkeypatch.setattr(lora_triton, name, boom)
    t = _make(20, 24, 16, 4, F32, F32, True, True, False)
    y, s, grads = _run(t, False, 2.0, False, 0.1, 7)
    ref = _reference(t, False, 2.0, False, 0.1, None)
    assert s is None and grads["d_lora_a"] is None and grads["d_lora_b"] is None and grads["d_lora_bias"] is None
    assert _rel_err(y, ref["y"]) < 1e-6 and _rel_err(grads["dx"], ref["dx"]) < 1e-6


def test_split_reductions_and_need_flags(monkeypatch):
    """Several programs per reduction (atomic paths) and partial ``need_*`` requests."""
    monkeypatch.setattr(lora_triton, "_target_programs", lambda device: 16)
    m, k, n, r = 130, 150, 140, 5
    t = _make(m, k, n, r, F32, F32, True, True, False, seed=3)
    seed, scaling, p = 99, 0.5, 0.25
    keep = lora_triton.dropout_keep_mask(seed, (m, k), p, DEVICE)
    ref = _reference(t, False, scaling, True, p, keep)
    y, s, grads = _run(t, False, scaling, True, p, seed)
    _check(t, (y, s, grads), ref, F32, F32, True)
    # Only the adapter grads (first layer: the input needs no grad), then only dx.
    _, _, only_lora = _run(t, False, scaling, True, p, seed, need=(False, True, False, False))
    assert only_lora["dx"] is None and only_lora["d_bias"] is None and only_lora["d_lora_bias"] is None
    assert _rel_err(only_lora["d_lora_a"], ref["d_lora_a"]) < 1e-5
    assert _rel_err(only_lora["d_lora_b"], ref["d_lora_b"]) < 1e-5
    _, _, only_dx = _run(t, False, scaling, True, p, seed, need=(True, False, False, False))
    assert only_dx["d_lora_a"] is None and only_dx["d_lora_b"] is None
    assert _rel_err(only_dx["dx"], ref["dx"]) < 1e-5


def test_tolerances_catch_wrong_math():
    """The bf16 tolerance is tight enough that a doubled scaling, a permuted B or a missing 1/(1-p) fails it."""
    m, k, n, r = 37, 45, 29, 3
    t = _make(m, k, n, r, BF16, BF16, True, True, False, seed=5)
    seed, scaling, p = 11, 1.3, 0.3
    keep = lora_triton.dropout_keep_mask(seed, (m, k), p, DEVICE)
    y, s, grads = _run(t, False, scaling, True, p, seed)
    tol = TOL[BF16]
    good = _reference(t, False, scaling, True, p, keep)
    assert _rel_err(y, good["y"]) < tol
    wrong_refs = {
        "scaling*2": _reference(t, False, 2 * scaling, True, p, keep),
        "B permuted": _reference(t, False, scaling, True, p, keep, b_override=t["b"].flip(0)),
        "no 1/(1-p)": _reference(t, False, scaling * (1 - p), True, p, keep),
        "other seed mask": _reference(t, False, scaling, True, p, lora_triton.dropout_keep_mask(12, (m, k), p, DEVICE)),
    }
    for what, bad in wrong_refs.items():
        for name, out in (("y", y), ("dx", grads["dx"]), ("d_lora_a", grads["d_lora_a"]),
                          ("d_lora_b", grads["d_lora_b"])):
            if what == "B permuted" and name == "d_lora_b":
                continue  # dB does not depend on B
            assert _rel_err(out, bad[name]) > 3 * tol, (what, name, _rel_err(out, bad[name]))


class _LaunchRecorder:
    """Stands in for a kernel object: records each ``kernel[grid](**kwargs)`` launch, then runs it (or not)."""

    def __init__(self, name, kernel, launches, run=True):
        self.name, self.kernel, self.launches, self.run = name, kernel, launches, run

    def __getitem__(self, grid):
        def launch(**kwargs):
            self.launches.append((self.name, grid, kwargs))
            if self.run:
                self.kernel[grid](**kwargs)
        return launch


KERNELS = ("_lora_x_pass_kernel", "_lora_ds_db_kernel", "_fused_gemm", "_fused_gemm_kernel")


def _record_launches(monkeypatch, run=True):
    launches = []
    for name in KERNELS:
        monkeypatch.setattr(lora_triton, name, _LaunchRecorder(name, getattr(lora_triton, name), launches, run))
    return launches


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def test_deterministic_mode_has_no_cross_program_atomics(monkeypatch, deterministic):
    """Several splits per reduction (forced): each split writes its own partial, torch sums them in order, dB and
    the bias sums come from torch; two runs agree bit for bit and match float64."""
    monkeypatch.setattr(lora_triton, "_target_programs", lambda device: 16)
    launches = _record_launches(monkeypatch)
    m, k, n, r = 130, 150, 140, 5
    t = _make(m, k, n, r, F32, F32, True, True, False, seed=4)
    seed, scaling, p = 5, 0.7, 0.2
    first = _run(t, False, scaling, True, p, seed)
    second = _run(t, False, scaling, True, p, seed)
    skinny = [(name, grid, kw) for name, grid, kw in launches if name.startswith("_lora")]
    passes = [(name, kw.get("FOR_DA")) for name, _, kw in skinny]
    assert sorted(passes, key=str) == sorted([("_lora_x_pass_kernel", False), ("_lora_ds_db_kernel", None),
                                              ("_lora_x_pass_kernel", True)] * 2, key=str)
    assert all(grid[1] > 1 for _, grid, _ in skinny), "the test must exercise split reductions"
    for name, _, kw in skinny:
        assert not kw["SPLIT_ATOMIC"] and kw["stride_split"] > 0, name
        if name == "_lora_ds_db_kernel":
            assert not kw["COMPUTE_DB"] and not kw["COMPUTE_COLSUM"]
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for name, grad in first[2].items():
        assert torch.equal(grad, second[2][name]), name
    keep = lora_triton.dropout_keep_mask(seed, (m, k), p, DEVICE)
    _check(t, first, _reference(t, False, scaling, True, p, keep), F32, F32, True)


def test_split_reductions_use_relaxed_atomics_otherwise(monkeypatch):
    monkeypatch.setattr(lora_triton, "_target_programs", lambda device: 16)
    launches = _record_launches(monkeypatch, run=False)
    t = _make(130, 150, 140, 5, F32, F32, True, False, False)
    _run(t, False, 1.0, True, 0.0, 0)
    flags = {(name, kw.get("FOR_DA")): (grid[1], kw["SPLIT_ATOMIC"], kw["stride_split"])
             for name, grid, kw in launches if name.startswith("_lora")}
    assert len(flags) == 3  # S, dS/dB, dA
    assert all(splits > 1 and atomic and stride == 0 for splits, atomic, stride in flags.values()), flags


def test_int64_offsets_chosen_for_lm_head_outputs(monkeypatch):
    """LoRA on a 128k-vocabulary lm_head at 16.8k tokens: Y has M*N > 2**31 elements (meta tensors, nothing
    allocated); the GEMM launch gets int64 offsets, the S pass over the small X keeps int32."""
    m, k, n, r = 16_800, 4096, 128_256, 16
    meta = dict(device="meta", dtype=torch.bfloat16)
    x, w, a, b = (torch.empty(shape, **meta) for shape in ((m, k), (n, k), (r, k), (n, r)))
    assert lora_triton.needs_int64_offsets(torch.empty((m, n), **meta))
    assert not lora_triton.needs_int64_offsets(torch.empty((16_000, n), **meta))  # 2.05e9 < 2**31
    assert lora_triton.needs_int64_offsets(torch.empty((2, 2**30 + 1), **meta).t())  # through strides
    assert not lora_triton.needs_int64_offsets(x, None, torch.empty((0, n), **meta))
    launches = _record_launches(monkeypatch, run=False)
    lora_triton.lora_forward(x, w, None, a, b, None, options=LoraOptions(scaling=1.0), cublas_below_m=0)
    int64 = {name: kw["INT64_OFFSETS"] for name, _, kw in launches}
    assert int64 == {"_lora_x_pass_kernel": False, "_fused_gemm": True}, int64


def test_int64_offset_kernels_match_reference(monkeypatch):
    monkeypatch.setattr(lora_triton, "needs_int64_offsets", lambda *tensors: True)
    m, k, n, r = 37, 45, 29, 3
    t = _make(m, k, n, r, BF16, BF16, True, True, False, seed=6)
    seed, scaling, p = 8, 1.1, 0.1
    keep = lora_triton.dropout_keep_mask(seed, (m, k), p, DEVICE)
    _check(t, _run(t, False, scaling, True, p, seed), _reference(t, False, scaling, True, p, keep), BF16, BF16, True)


@pytest.mark.parametrize("kn", [False, True], ids=["linear", "conv1d"])
def test_tma_persistent_gemm_matches_reference(monkeypatch, kn):
    """The Hopper main loop (tensor descriptors, persistent tile loop), forced on the interpreter: both B layouts
    (K- or N-contiguous, forward and dX), fewer programs than tiles, ragged M and N tiles."""
    monkeypatch.setattr(lora_triton, "_tma_eligible", lambda a, b, b_strides: True)
    monkeypatch.setattr(lora_triton, "_target_programs", lambda device: 2)
    launches = _record_launches(monkeypatch)
    m, k, n, r = 70, 72, 136, 8
    t = _make(m, k, n, r, BF16, BF16, True, True, kn, seed=7)
    seed, scaling, p = 21, 1.4, 0.1
    keep = lora_triton.dropout_keep_mask(seed, (m, k), p, DEVICE)
    _check(t, _run(t, kn, scaling, True, p, seed), _reference(t, kn, scaling, True, p, keep), BF16, BF16, True)
    gemms = [(grid, kw) for name, grid, kw in launches if name == "_fused_gemm"]
    assert len(gemms) == 2 and all(kw["USE_TMA"] for _, kw in gemms)
    assert {kw["B_K_CONTIGUOUS"] for _, kw in gemms} == {True, False}  # forward and dX read B both ways
    assert all(grid({"BLOCK_M": 64, "BLOCK_N": 64}) == (2,) for grid, _ in gemms)


def _torch_backend_result(t, scaling, p, seed):
    from coto_kernels.kernels import lora_torch

    options = LoraOptions(scaling=scaling, dropout_p=p, seed=seed)
    y, s = lora_torch.lora_forward(t["x"], t["w"], t["bias"], t["a"], t["b"], t["lora_bias"], options=options)
    return y, lora_torch.lora_backward(t["dy"], t["x"], t["w"], t["a"], t["b"], s, options=options,
                                       need=GradRequest(True, True, True, True))


def test_fp32_without_tf32_runs_the_torch_backend(monkeypatch):
    """An IEEE fp32 tl.dot is an FMA loop that spills: fp32 with TF32 off goes to the torch backend."""
    torch.backends.cuda.matmul.allow_tf32 = False  # the autouse fixture restores it
    launches = _record_launches(monkeypatch)
    t = _make(37, 45, 29, 3, F32, F32, True, True, False)
    y, _, grads = _run(t, False, 1.5, True, 0.1, 3)
    want_y, want = _torch_backend_result(t, 1.5, 0.1, 3)
    assert not launches
    assert torch.equal(y, want_y)
    for name, grad in grads.items():
        assert torch.equal(grad, getattr(want, name)), name


def test_rank_above_max_runs_the_torch_backend_with_one_warning(monkeypatch):
    monkeypatch.setattr(lora_triton, "MAX_RANK", 4)
    lora_triton._warn_rank_fallback_once.cache_clear()
    launches = _record_launches(monkeypatch)
    t = _make(20, 24, 16, 5, BF16, BF16, True, False, False)
    with pytest.warns(UserWarning, match="ranks up to 4"):
        y, _, grads = _run(t, False, 2.0, True, 0.1, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        _run(t, False, 2.0, True, 0.1, 3)
    want_y, want = _torch_backend_result(t, 2.0, 0.1, 3)
    assert not launches
    assert torch.equal(y, want_y) and torch.equal(grads["d_lora_a"], want.d_lora_a)


@pytest.mark.parametrize("value", ["abc", "-5", "1.5"])
def test_bad_cublas_below_m_environment_variable_is_named(monkeypatch, value):
    monkeypatch.setenv(lora_triton.CUBLAS_BELOW_M_ENV, value)
    t = _make(8, 16, 16, 2, F32, F32, False, False, False)
    options = LoraOptions(scaling=1.0)
    with pytest.raises(ValueError, match=f"COTO_TRITON_CUBLAS_BELOW_M={value!r}"):
        lora_triton.lora_forward(t["x"], t["w"], None, t["a"], t["b"], None, options=options)


def test_cublas_below_m_default_and_argument(monkeypatch):
    monkeypatch.delenv(lora_triton.CUBLAS_BELOW_M_ENV, raising=False)
    assert lora_triton.default_cublas_below_m() == 128
    monkeypatch.setenv(lora_triton.CUBLAS_BELOW_M_ENV, "64")
    assert lora_triton.default_cublas_below_m() == 64
    launches = _record_launches(monkeypatch, run=False)
    t = _make(40, 16, 16, 2, F32, F32, False, False, False)
    options = LoraOptions(scaling=1.0)
    lora_triton.lora_forward(t["x"], t["w"], None, t["a"], t["b"], None, options=options)  # 40 < 64: cuBLAS base
    lora_triton.lora_forward(t["x"], t["w"], None, t["a"], t["b"], None, options=options, cublas_below_m=0)
    assert [name for name, _, _ in launches if "gemm" in name] == ["_fused_gemm_kernel", "_fused_gemm"]
    with pytest.raises(ValueError, match="cublas_below_m"):
        lora_triton.lora_forward(t["x"], t["w"], None, t["a"], t["b"], None, options=options, cublas_below_m=-1)


@pytest.mark.parametrize("kernel", ["s", "da", "ds_db"])
def test_skinny_tiles_fit_every_rank(monkeypatch, kernel):
    """The GPU tile choice (not the interpreter's): pipelined operands within the shared-memory budget (under
    sm_80's 163 KiB) and at most 64 fp32 accumulator registers per thread (96 for dS + dB), for every padded
    rank up to 256."""
    monkeypatch.setattr(lora_triton, "INTERPRET", False)
    for r_block in (16, 32, 64, 128, 256):
        for x_bytes, side_bytes in ((2, 2), (2, 4), (4, 4)):
            if kernel == "da":
                side_bytes = 4  # dS is fp32
            cfg = lora_triton.skinny_config(kernel, r_block, x_bytes, side_bytes)
            side_rows = cfg.block_m if kernel == "da" else cfg.block
            smem = cfg.num_stages * (cfg.block_m * cfg.block * x_bytes + side_rows * r_block * side_bytes)
            if kernel == "ds_db":
                smem += cfg.block_m * r_block * x_bytes
            assert cfg.num_stages >= 2 and smem <= lora_triton.SKINNY_SMEM_BUDGET, (r_block, x_bytes, cfg)
            acc_rows = {"s": cfg.block_m, "da": cfg.block, "ds_db": cfg.block_m + cfg.block}[kernel]  # dS and dB
            assert acc_rows * r_block // (32 * cfg.num_warps) <= (96 if kernel == "ds_db" else 64), (r_block, cfg)
            if kernel != "ds_db":  # unaligned X (row stride 4100): at most 64x64 tiles (64x128 spilled with dropout)
                unaligned = lora_triton.skinny_config(kernel, r_block, x_bytes, side_bytes, x_aligned=False)
                assert unaligned.block_m == 64 and unaligned.block <= 64, (r_block, unaligned)
                if r_block <= 64:
                    assert unaligned.block == 64 < cfg.block, (r_block, unaligned, cfg)


def test_dora_dy_pass_over_unaligned_dy_keeps_64_rows(monkeypatch):
    """DoRA's dY pass spilled at 128 rows over an unaligned dY on sm_80 (kernels-check, N = 4100); aligned keeps 128."""
    monkeypatch.setattr(lora_triton, "INTERPRET", False)
    assert lora_triton.skinny_config("dora_ds_db", 16, 2, 2, x_aligned=False).block_m == 64
    assert lora_triton.skinny_config("dora_ds_db", 16, 2, 2).block_m == 128
    assert lora_triton.skinny_config("ds_db", 16, 2, 2, x_aligned=False).block_m == 128


def test_gemm_configs_pruned_to_what_launches():
    configs = lora_triton.gemm_configs(for_interpreter=False)
    sm80 = 163 * 1024
    args = dict(c_ptr=torch.empty(1, 1, dtype=BF16), CDT=None, M_BUCKET=16384, LORA_DROPOUT=False, USE_TMA=True,
                STORE_Z=False, K=4096, stride_am=4096, stride_ak=1, stride_bk=1, stride_bn=4096)
    assert lora_triton.prune_gemm_configs(configs, dict(args, R_BLOCK=16), smem_limit=227 * 1024) == configs
    at_256 = lora_triton.prune_gemm_configs(configs, dict(args, R_BLOCK=256), smem_limit=sm80)
    assert at_256 and all(lora_triton.gemm_smem_bytes(c, 2, 256) <= sm80 for c in at_256)
    assert len(at_256) < len(configs)
    small_m = lora_triton.prune_gemm_configs(configs, dict(args, R_BLOCK=16, M_BUCKET=128), smem_limit=sm80)
    assert small_m and all(c.kwargs["BLOCK_M"] <= 128 for c in small_m)
    dropout = lora_triton.prune_gemm_configs(configs, dict(args, R_BLOCK=16, LORA_DROPOUT=True), smem_limit=sm80)
    assert dropout and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps for c in dropout)
    pointer = lora_triton.prune_gemm_configs(configs, dict(args, R_BLOCK=16, USE_TMA=False), smem_limit=sm80)
    assert pointer and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps for c in pointer)
    assert len(pointer) < len(configs)
    # From R_BLOCK 128 the TMA path is held to 64 accumulator elements per thread too; at 256 every tile has 8 warps.
    at_128 = lora_triton.prune_gemm_configs(configs, dict(args, R_BLOCK=128), smem_limit=227 * 1024)
    assert at_128 and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps for c in at_128)
    assert all(c.num_warps == 8 for c in at_256)
    # Unaligned operands (K = 4100, row strides 4100): only tiles of <= 32 accumulator elements per thread and
    # BLOCK_K <= 32 remain, e.g. 64x64x32 on 4 warps.
    odd = dict(args, R_BLOCK=16, USE_TMA=False, K=4100, stride_am=4100, stride_bn=4100)
    unaligned = lora_triton.prune_gemm_configs(configs, odd, smem_limit=227 * 1024)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) for c in unaligned] == [
        (64, 64, 32, 4)]


@pytest.mark.parametrize("before_3_7", [False, True])
def test_dora_dx_keeps_its_256_row_tile_only_where_triton_fits_it(monkeypatch, before_3_7):
    """Triton 3.6 (the GPU image's) spilled DoRA's dX with A_COL_SCALE at 256x128 / 8 warps on sm_90; 3.9 did not."""
    monkeypatch.setattr(lora_triton, "_TRITON_BEFORE_3_7", before_3_7)
    configs = lora_triton.gemm_configs(for_interpreter=False)
    args = dict(c_ptr=torch.empty(1, 1, dtype=BF16), CDT=None, M_BUCKET=16384, LORA_DROPOUT=False, USE_TMA=True,
                STORE_Z=False, K=4096, stride_am=4096, stride_ak=1, stride_bk=1, stride_bn=4096, R_BLOCK=16)
    kept = lora_triton.prune_gemm_configs(configs, dict(args, A_COL_SCALE=True), smem_limit=227 * 1024)
    assert (any(c.kwargs["BLOCK_M"] == 256 for c in kept)) is not before_3_7
    assert len(kept) == len(configs) - before_3_7
    assert lora_triton.prune_gemm_configs(configs, args, smem_limit=227 * 1024) == configs  # LoRA's dX: all kept


def test_lowrank_only_tile_shrinks_with_rank(monkeypatch):
    """The cuBLAS path's low-rank-only tile: BLOCK_N x R_BLOCK (the L operand) stays <= 64 x 128 from R_BLOCK 128
    (a 64x128 tile spilled there with dropout on sm_80, and its shared memory was over the limit at 256)."""
    monkeypatch.setattr(lora_triton, "INTERPRET", False)
    tiles = {r_block: lora_triton.lowrank_only_tile(r_block) for r_block in (16, 64, 128, 256)}
    assert tiles[16] == tiles[64] == (64, 128, 4)
    assert all(bn * r_block <= 128 * 64 for r_block, (_, bn, _) in tiles.items() if r_block >= 128)


def test_dropout_mask():
    m, k = 256, 192
    for p in (0.1, 0.5):
        keep = lora_triton.dropout_keep_mask(42, (m, k), p, DEVICE)
        assert keep.dtype == torch.bool and keep.shape == (m, k)
        assert abs((1.0 - keep.float().mean().item()) - p) < 0.01, p
    a = lora_triton.dropout_keep_mask(42, (m, k), 0.5, DEVICE)
    assert torch.equal(a, lora_triton.dropout_keep_mask(42, (m, k), 0.5, DEVICE))
    assert not torch.equal(a, lora_triton.dropout_keep_mask(43, (m, k), 0.5, DEVICE))
    # Element (m, k) depends on (m, k) only, so a block of rows or columns matches the full mask.
    assert torch.equal(a[:10], lora_triton.dropout_keep_mask(42, (10, k), 0.5, DEVICE))
    assert torch.equal(a[:, :7], lora_triton.dropout_keep_mask(42, (m, 7), 0.5, DEVICE))
    assert lora_triton.dropout_keep_mask(42, (m, k), 0.0, DEVICE).all()
