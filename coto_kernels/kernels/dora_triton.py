"""Fused Triton DoRA kernels (math: the DoRA part of ``coto_kernels.kernels.interface``; contract ``DoraBackend``).

The kernels are ``lora_triton``'s, with constexpr flags (no DoRA copies); c = m / n is the fp32 [N] column scale::

    forward   S = X A^T                      _lora_x_pass_kernel (unchanged)
              Y = bias + c * Z,  Z = X W^T + s (S B^T + lora_bias)
                                             _fused_gemm_kernel, HAS_COL_SCALE (+ STORE_Z): the scale and the bias
                                             in the epilogue, Z written only when the magnitude gradient needs it
    backward  dS, dB, colsum(G), colsum(dY), sum_rows(dY * Y or Z)
                                             _lora_ds_db_kernel, HAS_COL_SCALE + COMPUTE_DY_COLSUM + COMPUTE_DM:
                                             one read of dY (and of the saved Y or Z) for all five
              dX = G W + dS A                _fused_gemm_kernel, A_COL_SCALE: each dY tile is scaled by c along
                                             the GEMM's K as it is loaded
              dA = dS^T X                    _lora_x_pass_kernel, FOR_DA (unchanged)

**Dropout (PEFT's two-term formula).** Y = X W^T + bias + (c - 1) D W^T + c s (S B^T + lora_bias), D = drop(X):
the S and dA passes regenerate the mask as for LoRA, and the two base products of each GEMM come from one pass
over the A and B tiles into two fp32 accumulators (the GEMM's DORA_DROPOUT; its docstring has the algebra):

    forward   acc = X W^T + L, dropped = keep*X W^T + (1-p) L    Y = acc + (c - 1) Z + bias, Z = dropped/(1-p) (+ s lb)
    dX        acc = dY W, dropped = ((c - 1) dY) W + dS A         dX = acc + drop'(dropped)

so no dropped copy of X, no M x N G or (G - dY), and W and the activations are read once per GEMM (PEFT: two
base GEMMs each way, plus dropout's M x K output). The MMA work is still doubled: the two products are
different. The forward masks each 16-bit A tile a pair of elements per 32-bit word (``_kept_tile``): compiled for
sm_90 at 128x128x64 / 8 warps its K step issues 314 instructions per thread around 8 HGMMA (element by element:
461), ~630 issue cycles per SM against ~1000 cycles of tensor-core work at the H200's bf16 peak: room for the
mask under the asynchronous MMAs, not yet measured on a GPU. Z is saved for the magnitude gradient (it cannot
be recovered from Y). Token counts below ``cublas_below_m`` run ``dora_torch`` (two cuBLAS GEMMs each way): the
kernel's main loop is what fuses the pair, and a handful of rows gains nothing from it.

**dX: the scale on the A operand, not a host-built G.** G = c * dY made on the host is one more M x N read and
write of dY's dtype (M = 8192, N = 4096, bf16: 128 MiB of traffic, ~7% of the dX GEMM's time on an H200 at
its roofline) plus an M x N temporary; scaling each loaded dY tile costs no bytes, only BLOCK_M x BLOCK_K fp32
multiplies per K step next to a BLOCK_M x BLOCK_N x BLOCK_K MMA.

**What is saved for the magnitude gradient** is ``dora_torch``'s choice (its module docstring): Y without a base
bias, Z (written by the forward GEMM's epilogue, STORE_Z) with one; the dY pass reduces sum_rows(dY * saved) and
``dora_torch.magnitude_grad_from_dots`` finishes dm (/ n or / m, the m_j = 0 columns recomputed: below).

**Routed to ``dora_torch``** (same math and dropout mask): dropout with M < ``cublas_below_m`` (above), and what
``lora_triton`` itself routes to torch (rank above ``MAX_RANK``, IEEE fp32 with TF32 off). The row norm is
``dora_torch.dora_row_norm``'s guarded expansion in 7 launches (``dora_row_norm`` below): W A'^T by one S pass
over a 16-bit W (``weight_times_adapter_t``), the Gram and B'G by cuBLAS, the rest in ``_row_norm_kernel``.

**No host sync.** Two steps of the DoRA math depend on data: the rows of the norm that the precision guard flags
(recomputed exactly) and the magnitude-gradient columns with m_j = 0 (recomputed from X). ``dora_torch`` finds
them with ``nonzero()``, which on a GPU waits for every queued kernel, twice per layer and step, and leaves the
GPU idle while Python queues the next ones. Here both are decided inside kernels that run over all N rows or
columns (``_row_norm_kernel``, ``_silent_columns_dm_kernel``, whose programs return at once where m_j != 0):
nothing waits. The fixes themselves are rare paths (near-cancelling rows, zero magnitudes), written for clarity
over speed: fp64 and fp32 CUDA-core loops, one program per row or column.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.nn import functional as F

from . import dora_torch, lora_triton
from .dora_torch import column_scale, dropout_keep_mask, dropped_input
from .interface import DoraGrads, GradRequest, LoraOptions, weight_nk

__all__ = ["column_scale", "dora_backward", "dora_forward", "dora_row_norm", "dropout_keep_mask", "dropped_input"]

# Rank columns per step of the rare-path kernels' loops: their registers do not grow with r.
_RANK_CHUNK = 16


@triton.jit
def _row_norm_kernel(
    norm_ptr, w_sq_ptr, wa_ptr, bg_ptr, b_ptr, w_ptr, a_ptr, K, R, stride_wan, stride_bgn, stride_bn, stride_wn,
    stride_wk, stride_ar, stride_ak, scaling, guard, R_CHUNK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """n_j for one row j of ``dora_torch.dora_row_norm``'s guarded expansion, in one kernel:

        n_j^2 = ||W_j||^2 + 2 s (W A'^T)_j . B'_j + s^2 (B' G)_j . B'_j        (G = A' A'^T; inputs: WA, BG, B')

    and where n_j^2 < guard (||W_j||^2 + s^2 (B'G)_j . B'_j) (cancellation) the exact
    sum_k (W[j, k] + s sum_i B'[j, i] A'[i, k])^2 in fp64, as ``dora_torch.dora_row_norm`` does on the host.
    n_j = sqrt, correctly rounded (``sqrt_rn``: at B = 0 it returns ||W_j|| bit for bit, PEFT's no-op)."""
    row = tl.program_id(0).to(tl.int64)
    cross = tl.zeros([R_CHUNK], dtype=tl.float32)
    update = tl.zeros([R_CHUNK], dtype=tl.float32)
    for r0 in range(0, R, R_CHUNK):
        offs_r = r0 + tl.arange(0, R_CHUNK)
        r_mask = offs_r < R
        b = tl.load(b_ptr + row * stride_bn + offs_r, mask=r_mask, other=0.0)
        cross += tl.load(wa_ptr + row * stride_wan + offs_r, mask=r_mask, other=0.0) * b
        update += tl.load(bg_ptr + row * stride_bgn + offs_r, mask=r_mask, other=0.0) * b
    w_squared = tl.load(w_sq_ptr + row)
    update_squared = tl.sum(update, axis=0) * (scaling * scaling)
    norm_squared = w_squared + (2.0 * scaling) * tl.sum(cross, axis=0) + update_squared
    if norm_squared < guard * (w_squared + update_squared):
        total = tl.zeros([BLOCK_K], dtype=tl.float64)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            v = tl.load(w_ptr + row * stride_wn + offs_k * stride_wk, mask=k_mask, other=0.0).to(tl.float64)
            low_rank = tl.zeros([BLOCK_K], dtype=tl.float64)
            for r0 in range(0, R, R_CHUNK):
                offs_r = r0 + tl.arange(0, R_CHUNK)
                r_mask = offs_r < R
                b = tl.load(b_ptr + row * stride_bn + offs_r, mask=r_mask, other=0.0).to(tl.float64)
                a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                            mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float64)
                low_rank += tl.sum(b[:, None] * a, axis=0)
            v += scaling * low_rank
            total += v * v
        norm_squared = tl.sum(total, axis=0).to(tl.float32)
    tl.store(norm_ptr + row, tl.sqrt_rn(norm_squared))


@triton.jit
def _rows_dot(t_ptr, stride_tm, stride_tc, v_ptr, stride_v, offs_m, m_mask, C, BLOCK_M: tl.constexpr,
              CHUNK: tl.constexpr):
    """sum_c T[m, c] v[c] in fp32 for the rows ``offs_m`` ([BLOCK_M]), CHUNK columns at a time."""
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, C, CHUNK):
        offs_c = c0 + tl.arange(0, CHUNK)
        c_mask = offs_c < C
        t = tl.load(t_ptr + offs_m[:, None] * stride_tm + offs_c[None, :] * stride_tc,
                    mask=m_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs_c * stride_v, mask=c_mask, other=0.0).to(tl.float32)
        total += tl.sum(t * v[None, :], axis=1)
    return total


@triton.jit
def _silent_columns_dm_kernel(
    dm_ptr, magnitude_ptr, norm_ptr, dy_ptr, x_ptr, w_ptr, s_ptr, b_ptr, lbias_ptr, M, K, R,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr, stride_bn, stride_br,
    scaling, HAS_LORA_BIAS: tl.constexpr, R_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dm[j] = sum_m dY[m, j] Z[m, j] / n_j for each column j with m_j = 0, Z[m, j] = X[m, :] . W[j, :] +
    s (S[m, :] . B[j, :] + lora_bias[j]) in fp32 (``dora_torch.recompute_silent_columns_`` on the device); one
    program per column, the others return."""
    col = tl.program_id(0).to(tl.int64)
    if tl.load(magnitude_ptr + col) == 0:
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            m_mask = offs_m < M
            z = _rows_dot(x_ptr, stride_xm, stride_xk, w_ptr + col * stride_wn, stride_wk, offs_m, m_mask, K,
                          BLOCK_M, BLOCK_K)
            low_rank = _rows_dot(s_ptr, stride_sm, stride_sr, b_ptr + col * stride_bn, stride_br, offs_m, m_mask, R,
                                 BLOCK_M, R_CHUNK)
            if HAS_LORA_BIAS:
                low_rank += tl.load(lbias_ptr + col).to(tl.float32)
            z += scaling * low_rank
            dy = tl.load(dy_ptr + offs_m * stride_dym + col * stride_dyn, mask=m_mask, other=0.0).to(tl.float32)
            total += dy * z
        tl.store(dm_ptr + col, tl.sum(total, axis=0) / tl.load(norm_ptr + col))


def silent_columns_on_device_(d_magnitude: Tensor, *, dy: Tensor, x: Tensor, weight_rows: Tensor, lora_b: Tensor,
                              lora_bias: Tensor | None, magnitude: Tensor, norm: Tensor, s: Tensor,
                              scaling: float) -> None:
    """``dora_torch.recompute_silent_columns_`` without a host sync (``_silent_columns_dm_kernel``)."""
    (m, k), (n, r) = x.shape, lora_b.shape
    if n == 0:
        return
    _silent_columns_dm_kernel[(n,)](
        d_magnitude, magnitude.detach(), norm, dy, x, weight_rows, s, lora_b,
        lora_bias if lora_bias is not None else norm, m, k, r, dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
        weight_rows.stride(0), weight_rows.stride(1), s.stride(0), s.stride(1), lora_b.stride(0), lora_b.stride(1),
        float(scaling), HAS_LORA_BIAS=lora_bias is not None, R_CHUNK=_RANK_CHUNK, BLOCK_M=64, BLOCK_K=64,
        num_warps=4)


def weight_times_adapter_t(w_nk: Tensor, a: Tensor, *, split: bool = True) -> Tensor:
    """W A'^T in fp32 (N x r') for the row norm: a 16-bit W is read once, by the S pass (``launch_x_pass`` over
    W's rows). With ``split``, A' (fp32) goes in as a head and a tail in W's dtype (A' = hi + lo + O(2^-18 |A'|)
    for bf16), each product exact in the fp32 accumulator: ~18 bits of A' kept where one rounding keeps 8. Without
    it (adapters already in W's dtype, so A' is exact there) A' goes in once. ``dora_torch.times_transposed_fp32``
    converts W to fp32 a chunk of rows at a time: two launches per 2**20 elements of W and 5x its bytes of traffic;
    fp32 W, and ranks whose width (doubled when split) exceeds ``MAX_RANK``, take that path."""
    width = (2 if split else 1) * a.shape[0]
    if w_nk.dtype == torch.float32 or width > lora_triton.MAX_RANK or w_nk.shape[0] == 0:
        return dora_torch.times_transposed_fp32(w_nk, a)
    hi = a.to(w_nk.dtype)
    if not split:
        return lora_triton.launch_x_pass(w_nk, hi, lora_triton.NO_DROPOUT, for_da=False)
    lo = (a - hi.float()).to(w_nk.dtype)
    both = lora_triton.launch_x_pass(w_nk, torch.cat([hi, lo]), lora_triton.NO_DROPOUT, for_da=False)
    r = a.shape[0]
    return both.narrow(1, 0, r) + both.narrow(1, r, r)


def dora_row_norm(
    weight: Tensor, lora_a: Tensor, lora_b: Tensor, lora_bias: Tensor | None, *, scaling: float, weight_is_kn: bool,
) -> Tensor:
    """``dora_torch.dora_row_norm`` without a host sync, in 7 launches for 16-bit adapters (their fp32 copies and
    one cast, W A'^T by ``weight_times_adapter_t``, the Gram A'A'^T and B'G by cuBLAS, ``_row_norm_kernel`` for
    the expansion, the guard with its exact fp64 rows and the square root); torch's version takes 21 plus two
    per 2**20 elements of a 16-bit W, and a ``nonzero()``."""
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        a, b = dora_torch.augmented_factors(lora_a, lora_b, lora_bias)
        w_nk = weight_nk(weight.detach(), weight_is_kn)
        w_squared = dora_torch.weight_row_norms_squared(weight, weight_is_kn)
        exact_in_weight_dtype = all(t is None or t.dtype == weight.dtype for t in (lora_a, lora_bias))
        # the kernel reads rows of these with unit column stride (all three are fresh GEMM outputs or copies)
        wa = weight_times_adapter_t(w_nk, a, split=not exact_in_weight_dtype).contiguous()
        bg = b @ (a @ a.t())
        b = b.contiguous()
        norm = torch.empty_like(w_squared)
        n, k = w_nk.shape
        if n:
            _row_norm_kernel[(n,)](
                norm, w_squared, wa, bg, b, w_nk, a, k, a.shape[0], wa.stride(0), bg.stride(0), b.stride(0),
                w_nk.stride(0), w_nk.stride(1), a.stride(0), a.stride(1), float(scaling),
                float(dora_torch.CANCELLATION_GUARD), R_CHUNK=_RANK_CHUNK, BLOCK_K=128, num_warps=4)
        return norm


def _uses_torch_kernels(x: Tensor, options: LoraOptions, rank: int, cublas_below_m: int) -> bool:
    """Calls the Triton DoRA path does not take (module docstring)."""
    if x.shape[0] == 0 or lora_triton.uses_torch_backend(x, rank):
        return True
    return options.has_dropout and x.shape[0] < cublas_below_m


def dora_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, lora_bias: Tensor | None,
    magnitude: Tensor, norm: Tensor, *, options: LoraOptions, save_z: bool, cublas_below_m: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(Y, S, Z)`` for 2-D ``x``: the S pass and one fused GEMM (Z only with ``save_z`` and a base bias or dropout).

    ``cublas_below_m``: as in ``lora_triton.lora_forward`` (token counts below it run the base GEMM on cuBLAS).
    """
    cublas_below_m = lora_triton.resolve_cublas_below_m(cublas_below_m)
    if _uses_torch_kernels(x, options, lora_a.shape[0], cublas_below_m):
        return dora_torch.dora_forward(x, weight, bias, lora_a, lora_b, lora_bias, magnitude, norm,
                                       options=options, save_z=save_z)
    w_nk = weight_nk(weight, options.weight_is_kn)
    n = w_nk.shape[0]
    dropout = lora_triton.KernelDropout.of(options)
    s = lora_triton.launch_x_pass(x, lora_a, dropout, for_da=False)
    # with dropout Z cannot be recovered from Y (which also holds X W^T): kept whenever dm is needed
    keep_z = save_z and (bias is not None or dropout.enabled)
    z = torch.empty((x.shape[0], n), device=x.device, dtype=x.dtype) if keep_z else None
    y = lora_triton.launch_gemm(
        a=x, b=w_nk, b_strides=(w_nk.stride(1), w_nk.stride(0)), out_features=n, bias=bias,
        lowrank_s=s, lowrank_l=lora_b, l_strides=(lora_b.stride(1), lora_b.stride(0)), lora_scale=options.scaling,
        lora_bias=lora_bias, dropout=dropout, cublas_below_m=cublas_below_m,
        cublas_base=lambda: F.linear(x, w_nk), col_scale=column_scale(magnitude, norm), z_out=z,
        dora_dropout=dropout.enabled,
    )
    return y, s, z


def dora_backward(
    dy: Tensor, x: Tensor, y: Tensor | None, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
    lora_bias: Tensor | None, magnitude: Tensor, norm: Tensor, s: Tensor, z_saved: Tensor | None, *,
    options: LoraOptions, need: GradRequest, need_magnitude: bool, cublas_below_m: int | None = None,
) -> DoraGrads:
    """The gradients for 2-D ``dy``; None where not requested. ``s``: what ``dora_forward`` returned."""
    cublas_below_m = lora_triton.resolve_cublas_below_m(cublas_below_m)
    if _uses_torch_kernels(x, options, lora_a.shape[0], cublas_below_m):
        return dora_torch.dora_backward(
            dy, x, y, weight, bias, lora_a, lora_b, lora_bias, magnitude, norm, s.to(lora_a.dtype), z_saved,
            options=options, need=need, need_magnitude=need_magnitude)
    saved = z_saved if z_saved is not None else y
    if need_magnitude and saved is None:
        raise RuntimeError("DoRA backward: the magnitude gradient needs the saved output y or the saved Z")
    w_nk = weight_nk(weight, options.weight_is_kn)
    scale = column_scale(magnitude, norm)
    from_y_with_bias = need_magnitude and z_saved is None and bias is not None
    sums = lora_triton.launch_dy_reductions(
        dy, lora_b, s, options.scaling, need, x.dtype, col_scale=scale,
        need_dy_colsum=need.dbias or from_y_with_bias, saved=saved if need_magnitude else None)
    dropout = lora_triton.KernelDropout.of(options)
    d_magnitude = None
    if need_magnitude:
        d_magnitude = dora_torch.magnitude_grad_from_dots(
            sums.dots, sums.dy_colsum, from_z=z_saved is not None, dy=dy, x=x, weight_rows=w_nk, bias=bias,
            lora_b=lora_b, lora_bias=lora_bias, magnitude=magnitude, norm=norm, s=s.to(lora_a.dtype),
            scaling=options.scaling, silent_columns=silent_columns_on_device_)
    dx = None
    if need.dx:  # dropout: dX = dY W + drop'((c - 1) dY W + dS A), both products from one pass (DORA_DROPOUT)
        dx = lora_triton.launch_gemm(
            a=dy, b=w_nk, b_strides=(w_nk.stride(0), w_nk.stride(1)), out_features=w_nk.shape[1], bias=None,
            lowrank_s=sums.ds, lowrank_l=lora_a, l_strides=(lora_a.stride(0), lora_a.stride(1)), lora_scale=1.0,
            lora_bias=None, dropout=dropout, cublas_below_m=cublas_below_m,
            cublas_base=lambda: (dy * scale.to(dy.dtype)) @ w_nk, a_scale=scale - 1.0 if dropout.enabled else scale,
            dora_dropout=dropout.enabled,
        )
    d_lora_a = d_lora_b = None
    if need.dlora:
        d_lora_a = lora_triton.launch_x_pass(x, sums.ds, dropout, for_da=True).to(lora_a.dtype)
        d_lora_b = sums.db.to(lora_b.dtype)
    return DoraGrads(
        dx=dx,
        d_lora_a=d_lora_a,
        d_lora_b=d_lora_b,
        d_bias=sums.dy_colsum.to(dy.dtype) if need.dbias else None,
        d_lora_bias=(sums.colsum * options.scaling).to(lora_b.dtype) if need.dlora_bias else None,
        d_magnitude=d_magnitude,
    )
