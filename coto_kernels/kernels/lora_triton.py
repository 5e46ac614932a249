"""Fused Triton backend of the gated LoRA linear layer: same contract as ``lora_torch``.

Notation: X [M, K], frozen W [N, K] (``nn.Linear``) or [K, N] (GPT-2 ``Conv1D``, read through its strides),
A [r, K], B [N, r], s = scaling, g = gate, p = dropout probability,
drop(X)[m, k] = X[m, k] * keep[m, k] / (1 - p) with ``keep[m, k] = tl.rand(seed, m * K + k) >= p``.

Forward (two launches)::

    S = drop(X) A^T                                   _lora_s_kernel: one skinny pass over X, fp32 [M, r]
    Y = X W^T + bias + g * s * (S B^T + lora_bias)    _fused_gemm_kernel: the low-rank term and both biases
                                                      go into the GEMM's fp32 accumulator; Y is written once

Backward (three launches)::

    dS = s * dY B,  dB = s * dY^T S,  colsum(dY)      _lora_ds_db_kernel: dY is read once for all three
    dX = dY W + g * drop'(dS A)                       _fused_gemm_kernel again, the masked dS A term seeds
                                                      the accumulator; dX is written once
    dA = dS^T drop(X)                                 _lora_da_kernel: one skinny pass over X
    d_bias = colsum(dY),  d_lora_bias = s * colsum(dY)

The dropout mask is regenerated from ``seed`` wherever drop(X) is needed (S pass, dX accumulator seed, dA pass);
no dropped copy of X and no mask is ever stored. Philox counters are int32, so the mask repeats only past 2**32
elements of X.

Dispatch (host side):

* ``gate=False``: only the base GEMMs run, on cuBLAS (``F.linear`` / ``torch.mm``); no LoRA kernel is launched.
* ``M < CUBLAS_BELOW_M`` (128 tokens, override with ``COTO_TRITON_CUBLAS_BELOW_M``): the base GEMM runs on
  cuBLAS, whose split-K/GEMV kernels win for a handful of rows where a 64-row MMA tile is mostly padding; the
  low-rank term is then added by the same GEMM kernel with its main loop compiled out (one extra read and
  write of the small Y / dX). The skinny S, dS/dB and dA kernels run in both cases.

Dtypes: X, W and the biases may be fp32, fp16 or bf16; the adapters may be another dtype (fp32 adapters over a
bf16 base, as PEFT's ``autocast_adapter_dtype`` does). Tiles are cast to X's dtype for the MMA and accumulated
in fp32; S and dS stay fp32 in memory; gradients are returned in each parameter's own dtype.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .interface import GradRequest, LoraGrads, LoraOptions

# Under the interpreter bf16 tensors are raw bits, so every loaded tile is upcast to fp32 before any arithmetic;
# on a GPU the MMA must stay in the input dtype. This flag picks the compute dtype handed to the kernels.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

#: Below this many rows the base GEMM goes to cuBLAS (see the module docstring).
CUBLAS_BELOW_M = int(os.environ.get("COTO_TRITON_CUBLAS_BELOW_M", "128"))

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# --------------------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _keep_mask(seed, offs_m, offs_k, K, dropout_p):
    """keep[m, k] = rand(seed, m * K + k) >= p for a [len(offs_m), len(offs_k)] tile; the one mask definition."""
    return tl.rand(seed, offs_m[:, None] * K + offs_k[None, :]) >= dropout_p


@triton.jit
def _load_kept_x(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk, dropout_p, seed,
                 LORA_DROPOUT: tl.constexpr, CDT: tl.constexpr):
    """keep * X for a [len(offs_m), len(offs_k)] tile, zero outside X; callers apply 1/(1-p) to their fp32 sums."""
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0).to(CDT)
    if LORA_DROPOUT:
        x = tl.where(_keep_mask(seed, offs_m, offs_k, K, dropout_p), x, 0.0).to(CDT)
    return x


@triton.jit
def _keep_mask_kernel(out_ptr, M, K, dropout_p, seed, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[m, k] = keep[m, k] as int8 (tests only)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep_mask(seed, offs_m, offs_k, K, dropout_p)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], keep.to(tl.int8), mask=mask)


# --------------------------------------------------------------------------------------------------------------
# Fused GEMM: C = A_op B_op (+ masked low-rank term) (+ biases) (+ C)
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _fused_gemm_kernel(
    a_ptr, b_ptr, c_ptr, s_ptr, l_ptr, bias_ptr, lbias_ptr,
    M, N, K, R, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_sm, stride_sr, stride_lr, stride_ln,
    lora_scale, lbias_scale, dropout_p, seed,
    HAS_MAIN: tl.constexpr, HAS_LORA: tl.constexpr, LORA_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LORA_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, CDT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr, R_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[M, N] = sum_k A[m, k] B[k, n] + keep'[m, n] * lora_scale * (S[M, R] L[R, N]) + bias + lbias_scale * lbias.

    Forward:  A = X, B = W^T (strides), S = S, L = B_lora^T, lora_scale = g*s, no mask, bias, lbias_scale = g*s.
    dX:       A = dY, B = W (strides), S = dS (already scaled by s), L = A_lora, lora_scale = 1, keep' = the
              dropout mask of X over the output [M, K] scaled by 1/(1-p).
    HAS_MAIN=False drops the K loop (low-rank term only) and ACCUMULATE adds the existing C: the cuBLAS path.
    Grid: one program per BLOCK_M x BLOCK_N output tile, grouped GROUP_M row-tiles at a time for L2 reuse.
    M_BUCKET is unused in the body: it is the autotuning key, so every token count in a bucket shares a config.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # The low-rank term seeds the accumulator before the main loop, so that (masked or not) it costs no second
    # BLOCK_M x BLOCK_N register tile next to the accumulator.
    if HAS_LORA:
        offs_r = tl.arange(0, R_BLOCK)
        s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                    mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)
        s = (s.to(tl.float32) * lora_scale).to(CDT)
        lt = tl.load(l_ptr + offs_r[:, None] * stride_lr + offs_n[None, :] * stride_ln,
                     mask=(offs_r[:, None] < R) & (offs_n[None, :] < N), other=0.0).to(CDT)
        acc = tl.dot(s, lt, acc, input_precision=DOT_PRECISION)
        if LORA_DROPOUT:
            keep = _keep_mask(seed, offs_m, offs_n, N, dropout_p)
            acc = tl.where(keep, acc * (1.0 / (1.0 - dropout_p)), 0.0)

    if HAS_MAIN:
        # Wrapped rows/columns read valid memory and are never stored, so only K needs a load mask.
        rm = offs_m % M
        rn = offs_n % N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + rn[None, :] * stride_bn
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_left = K - k * BLOCK_K
                a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            acc = tl.dot(a.to(CDT), b.to(CDT), acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

    n_mask = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA_BIAS:
        acc += lbias_scale * tl.load(lbias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = (offs_m[:, None] < M) & n_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def _gemm_configs() -> list[triton.Config]:
    if INTERPRET:  # autotuning needs a GPU; big blocks keep the interpreter's per-program overhead low
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=1)]

    def cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                             num_warps=warps, num_stages=stages)

    # Hopper-sized tiles first (wgmma 128-row tiles, ~144 KiB smem at 3 stages); a GPU with less shared memory
    # rejects them during tuning and the small 64x64x32 tile still fits anything.
    return [
        cfg(128, 256, 64, 8, 3),
        cfg(256, 128, 64, 8, 3),
        cfg(128, 128, 64, 8, 4),
        cfg(128, 128, 64, 4, 4),
        cfg(64, 128, 64, 4, 4),
        cfg(64, 64, 32, 4, 4),
    ]


_even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
_fused_gemm = triton.autotune(
    configs=_gemm_configs(),
    key=["M_BUCKET", "N", "K", "HAS_LORA", "LORA_DROPOUT", "HAS_MAIN", "R_BLOCK"],
)(_even_k(_fused_gemm_kernel))


# --------------------------------------------------------------------------------------------------------------
# Skinny kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _lora_s_kernel(
    x_ptr, a_ptr, s_ptr,
    M, K, R, k_blocks_per_split,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    dropout_p, seed,
    LORA_DROPOUT: tl.constexpr, S_ATOMIC: tl.constexpr, CDT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """S[M, R] = (1/(1-p)) * (keep * X)[M, K] @ A^T[K, R], accumulated in fp32.

    Grid (cdiv(M, BLOCK_M), splits): program (i, j) reduces row-block i over K-blocks
    [j * k_blocks_per_split, (j + 1) * k_blocks_per_split); with several splits (few row-blocks, small M) the
    partial sums meet in a zeroed S through fp32 atomics (S_ATOMIC).
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_BLOCK)
    m_mask = offs_m < M
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
    kb_start = pid_s * k_blocks_per_split
    kb_end = min(kb_start + k_blocks_per_split, tl.cdiv(K, BLOCK_K))
    for kb in range(kb_start, kb_end):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = _load_kept_x(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk, dropout_p, seed, LORA_DROPOUT, CDT)
        at = tl.load(a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                     mask=k_mask[:, None] & r_mask[None, :], other=0.0).to(CDT)
        acc = tl.dot(x, at, acc, input_precision=DOT_PRECISION)
    if LORA_DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    s_ptrs = s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr
    s_mask = m_mask[:, None] & r_mask[None, :]
    if S_ATOMIC:
        tl.atomic_add(s_ptrs, acc, mask=s_mask)
    else:
        tl.store(s_ptrs, acc, mask=s_mask)


@triton.jit
def _lora_ds_db_kernel(
    dy_ptr, b_ptr, s_ptr, ds_ptr, db_ptr, colsum_ptr,
    M, N, R, n_blocks_per_split,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr,
    stride_dsm, stride_dsr, stride_dbn, stride_dbr,
    scaling,
    COMPUTE_DS: tl.constexpr, COMPUTE_DB: tl.constexpr, COMPUTE_COLSUM: tl.constexpr, DS_ATOMIC: tl.constexpr,
    CDT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One read of each dY tile feeds three reductions:

        dS[M, R]  = s * dY[M, N] @ B[N, R]        (over N: in registers, or fp32 atomics across N-splits)
        dB[N, R] += dY^T[N, BLOCK_M] @ (s * S)    (over M: fp32 atomics, one per row-block and element)
        colsum[N] += sum_rows(dY)                 (over M: fp32 atomics; gives d_bias and d_lora_bias)

    Grid (cdiv(M, BLOCK_M), splits): program (i, j) owns row-block i and N-blocks
    [j * n_blocks_per_split, ...). Its walk over those N-blocks starts at an offset set by i, so concurrent
    row-blocks add into different rows of dB rather than queueing on the same addresses.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_BLOCK)
    m_mask = offs_m < M
    r_mask = offs_r < R
    if COMPUTE_DB:
        s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        s = (s.to(tl.float32) * scaling).to(CDT)
    ds = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
    nb_start = pid_s * n_blocks_per_split
    nb_count = min(n_blocks_per_split, tl.cdiv(N, BLOCK_N) - nb_start)
    for i in range(0, nb_count):
        nb = nb_start + (i + pid_m) % nb_count
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(CDT)
        if COMPUTE_DS:
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                        mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(CDT)
            ds = tl.dot(dy, b, ds, input_precision=DOT_PRECISION)
        if COMPUTE_DB:
            db = tl.dot(tl.trans(dy), s, input_precision=DOT_PRECISION)
            tl.atomic_add(db_ptr + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr, db,
                          mask=n_mask[:, None] & r_mask[None, :])
        if COMPUTE_COLSUM:
            tl.atomic_add(colsum_ptr + offs_n, tl.sum(dy.to(tl.float32), axis=0), mask=n_mask)
    if COMPUTE_DS:
        ds = ds * scaling
        ds_ptrs = ds_ptr + offs_m[:, None] * stride_dsm + offs_r[None, :] * stride_dsr
        ds_mask = m_mask[:, None] & r_mask[None, :]
        if DS_ATOMIC:
            tl.atomic_add(ds_ptrs, ds, mask=ds_mask)
        else:
            tl.store(ds_ptrs, ds, mask=ds_mask)


@triton.jit
def _lora_da_kernel(
    ds_ptr, x_ptr, da_ptr,
    M, K, R, m_blocks_per_split,
    stride_dsm, stride_dsr, stride_xm, stride_xk, stride_dar, stride_dak,
    dropout_p, seed,
    LORA_DROPOUT: tl.constexpr, DA_ATOMIC: tl.constexpr, CDT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dA^T[K, R] = (1/(1-p)) * (keep * X)^T[K, M] @ dS[M, R], stored transposed into dA [R, K] (fp32).

    Computed as dA^T so the MMA's long side is BLOCK_K rather than the rank. Grid (cdiv(K, BLOCK_K), splits):
    program (i, j) owns K-block i and reduces over row-blocks [j * m_blocks_per_split, ...); several splits
    (large M, few K-blocks) meet in a zeroed dA through fp32 atomics (DA_ATOMIC).
    """
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_BLOCK)
    k_mask = offs_k < K
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_K, R_BLOCK), dtype=tl.float32)
    mb_start = pid_s * m_blocks_per_split
    mb_end = min(mb_start + m_blocks_per_split, tl.cdiv(M, BLOCK_M))
    for mb in range(mb_start, mb_end):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        x = _load_kept_x(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk, dropout_p, seed, LORA_DROPOUT, CDT)
        ds = tl.load(ds_ptr + offs_m[:, None] * stride_dsm + offs_r[None, :] * stride_dsr,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(CDT)
        acc = tl.dot(tl.trans(x), ds, acc, input_precision=DOT_PRECISION)
    if LORA_DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    da_ptrs = da_ptr + offs_k[:, None] * stride_dak + offs_r[None, :] * stride_dar
    da_mask = k_mask[:, None] & r_mask[None, :]
    if DA_ATOMIC:
        tl.atomic_add(da_ptrs, acc, mask=da_mask)
    else:
        tl.store(da_ptrs, acc, mask=da_mask)


# --------------------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N or BLOCK_K, num_warps, num_stages) of the skinny kernels. They are memory-bound, so they are
# not autotuned (tuning would also replay their atomics); GPU sizes keep a 16-128 KiB tile stream per program.
if INTERPRET:
    _S_CFG = _DA_CFG = _DSDB_CFG = (64, 64, 4, 1)
else:
    _S_CFG = (64, 128, 4, 3)
    _DA_CFG = (64, 128, 4, 3)
    _DSDB_CFG = (256, 64, 8, 3)  # tall row-blocks: dB atomics scale with M / BLOCK_M


def _r_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _compute_dtype(dtype: torch.dtype) -> tl.dtype:
    if dtype not in _TL_DTYPE:
        raise TypeError(f"lora_triton supports float32, float16 and bfloat16 inputs, got {dtype}")
    return tl.float32 if INTERPRET else _TL_DTYPE[dtype]


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's TF32 switch so results match ``F.linear``; ignored for 16-bit inputs."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """About two waves of programs for the split-reduction kernels; 1 on the CPU interpreter (no splits)."""
    if device.type != "cuda":
        return 1
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _splits(blocks: int, split_blocks: int, device: torch.device) -> tuple[int, int]:
    """(number of splits, split_blocks per split) to reach the target program count given ``blocks`` programs."""
    want = max(1, min(split_blocks, triton.cdiv(_target_programs(device), max(blocks, 1))))
    per = triton.cdiv(split_blocks, want)
    return triton.cdiv(split_blocks, per), per


def _weight_strides(weight: Tensor, weight_is_kn: bool) -> tuple[int, int, int]:
    """(N, stride over n, stride over k) of the base weight, whichever way it is stored."""
    if weight_is_kn:
        return weight.shape[1], weight.stride(1), weight.stride(0)
    return weight.shape[0], weight.stride(0), weight.stride(1)


def _launch_gemm(
    a: Tensor | None, a_strides: tuple[int, int], b: Tensor | None, b_strides: tuple[int, int], c: Tensor,
    k: int, lora_s: Tensor, lora_l: Tensor, l_strides: tuple[int, int], lora_scale: float,
    bias: Tensor | None, lora_bias: Tensor | None, lbias_scale: float, dropout_p: float, seed: int,
    compute: torch.dtype,
) -> None:
    """C (+)= A_op B_op + low-rank term; ``a is None`` launches the low-rank-only variant that adds into C."""
    m, n = c.shape
    r = lora_s.shape[1]
    has_main = a is not None
    common = dict(
        M=m, N=n, K=k if has_main else 0, R=r, M_BUCKET=min(triton.next_power_of_2(m), 16384),
        stride_am=a_strides[0], stride_ak=a_strides[1], stride_bk=b_strides[0], stride_bn=b_strides[1],
        stride_cm=c.stride(0), stride_cn=c.stride(1), stride_sm=lora_s.stride(0), stride_sr=lora_s.stride(1),
        stride_lr=l_strides[0], stride_ln=l_strides[1],
        lora_scale=lora_scale, lbias_scale=lbias_scale, dropout_p=dropout_p, seed=seed,
        HAS_MAIN=has_main, HAS_LORA=True, LORA_DROPOUT=dropout_p > 0.0, HAS_BIAS=bias is not None,
        HAS_LORA_BIAS=lora_bias is not None, ACCUMULATE=not has_main, CDT=_compute_dtype(compute),
        DOT_PRECISION=_dot_precision(compute), R_BLOCK=_r_block(r),
    )
    ptrs = (a if has_main else c, b if has_main else c, c, lora_s, lora_l,
            bias if bias is not None else c, lora_bias if lora_bias is not None else c)
    if has_main:
        def grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        _fused_gemm[grid](*ptrs, **common)
    else:
        # Not autotuned: it adds into C, so tuning replays would add the term several times.
        bm, bn = (64, 64) if INTERPRET else (64, 128)
        _fused_gemm_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](
            *ptrs, **common, EVEN_K=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=16, GROUP_M=8, num_warps=4
        )


def _lora_s(x: Tensor, lora_a: Tensor, dropout_p: float, seed: int) -> Tensor:
    m, k = x.shape
    r = lora_a.shape[0]
    bm, bk, warps, stages = _S_CFG
    splits, per = _splits(triton.cdiv(m, bm), triton.cdiv(k, bk), x.device)
    s = (torch.zeros if splits > 1 else torch.empty)((m, r), device=x.device, dtype=torch.float32)
    _lora_s_kernel[(triton.cdiv(m, bm), splits)](
        x, lora_a, s, m, k, r, per,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), s.stride(0), s.stride(1),
        dropout_p, seed,
        LORA_DROPOUT=dropout_p > 0.0, S_ATOMIC=splits > 1, CDT=_compute_dtype(x.dtype),
        DOT_PRECISION=_dot_precision(x.dtype), R_BLOCK=_r_block(r), BLOCK_M=bm, BLOCK_K=bk,
        num_warps=warps, num_stages=stages,
    )
    return s


def dropout_keep_mask(seed: int, shape: tuple[int, int], dropout_p: float, device: torch.device | str) -> Tensor:
    """The exact keep-mask (bool ``shape``) the kernels regenerate for ``seed``: for tests, never used in training."""
    m, k = shape
    out = torch.empty((m, k), dtype=torch.int8, device=device)
    if m and k:
        _keep_mask_kernel[(triton.cdiv(m, 64), triton.cdiv(k, 64))](out, m, k, dropout_p, seed, BLOCK_M=64, BLOCK_K=64)
    return out.bool()


def lora_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, lora_bias: Tensor | None, *,
    options: LoraOptions,
) -> tuple[Tensor, Tensor | None]:
    """``(Y, S)`` for 2-D ``x`` [M, K]: Y [M, N] in x's dtype, S fp32 [M, r] or None (gate off).

    See the module docstring for the kernels and the dispatch.
    """
    scaling, gate, dropout_p, seed, weight_is_kn = (options.scaling, options.gate, options.dropout_p, options.seed,
                                                    options.weight_is_kn)
    m, k = x.shape
    n, stride_wn, stride_wk = _weight_strides(weight, weight_is_kn)
    if not gate:
        return torch.nn.functional.linear(x, weight.t() if weight_is_kn else weight, bias), None
    r = lora_a.shape[0]
    if m == 0:
        return x.new_empty((0, n)), x.new_empty((0, r), dtype=torch.float32)
    s = _lora_s(x, lora_a, dropout_p, seed)
    if m < CUBLAS_BELOW_M:
        y = torch.nn.functional.linear(x, weight.t() if weight_is_kn else weight, bias)
        _launch_gemm(None, (0, 0), None, (0, 0), y, k, s, lora_b, (lora_b.stride(1), lora_b.stride(0)), scaling,
                     None, lora_bias, scaling, 0.0, seed, x.dtype)
    else:
        y = torch.empty((m, n), device=x.device, dtype=x.dtype)
        _launch_gemm(x, (x.stride(0), x.stride(1)), weight, (stride_wk, stride_wn), y, k,
                     s, lora_b, (lora_b.stride(1), lora_b.stride(0)), scaling,
                     bias, lora_bias, scaling, 0.0, seed, x.dtype)
    return y, s


def lora_backward(
    dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, s: Tensor | None, *,
    options: LoraOptions, need: GradRequest,
) -> LoraGrads:
    """The gradients for 2-D ``dy`` [M, N]; ``s`` is the fp32 S returned by :func:`lora_forward`."""
    scaling, gate, dropout_p, seed, weight_is_kn = (options.scaling, options.gate, options.dropout_p, options.seed,
                                                    options.weight_is_kn)
    need_dx, need_dlora, need_dbias, need_dlora_bias = need.dx, need.dlora, need.dbias, need.dlora_bias
    m, k = x.shape
    n, stride_wn, stride_wk = _weight_strides(weight, weight_is_kn)
    w_nk = weight.t() if weight_is_kn else weight
    if not gate:
        dx = dy @ w_nk if need_dx else None
        d_bias = dy.sum(0) if need_dbias else None
        return LoraGrads(dx, None, None, d_bias, None)

    r = lora_a.shape[0]
    need_ds = need_dx or need_dlora
    need_colsum = need_dbias or need_dlora_bias
    if need_dlora and s is None:
        raise ValueError("lora_backward needs the S returned by lora_forward to compute the adapter gradients")
    device = dy.device
    f32 = dict(device=device, dtype=torch.float32)
    ds = db = colsum = None
    if m > 0 and (need_ds or need_colsum):
        bm, bn, warps, stages = _DSDB_CFG
        splits, per = _splits(triton.cdiv(m, bm), triton.cdiv(n, bn), device)
        ds = (torch.zeros if splits > 1 else torch.empty)((m, r), **f32) if need_ds else None
        db = torch.zeros((n, r), **f32) if need_dlora else None
        colsum = torch.zeros((n,), **f32) if need_colsum else None
        dummy = dy
        _lora_ds_db_kernel[(triton.cdiv(m, bm), splits)](
            dy, lora_b, s if need_dlora else dummy, ds if need_ds else dummy, db if need_dlora else dummy,
            colsum if need_colsum else dummy,
            m, n, r, per,
            dy.stride(0), dy.stride(1), lora_b.stride(0), lora_b.stride(1),
            s.stride(0) if need_dlora else 0, s.stride(1) if need_dlora else 0,
            ds.stride(0) if need_ds else 0, ds.stride(1) if need_ds else 0,
            db.stride(0) if need_dlora else 0, db.stride(1) if need_dlora else 0,
            scaling,
            COMPUTE_DS=need_ds, COMPUTE_DB=need_dlora, COMPUTE_COLSUM=need_colsum, DS_ATOMIC=splits > 1,
            CDT=_compute_dtype(x.dtype), DOT_PRECISION=_dot_precision(x.dtype), R_BLOCK=_r_block(r),
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
        )
    elif m == 0:
        ds = torch.zeros((0, r), **f32)
        db = torch.zeros((n, r), **f32)
        colsum = torch.zeros((n,), **f32)

    dx = None
    if need_dx:
        a_strides = (lora_a.stride(0), lora_a.stride(1))
        if m == 0:
            dx = x.new_empty((0, k))
        elif m < CUBLAS_BELOW_M:
            dx = dy @ w_nk
            _launch_gemm(None, (0, 0), None, (0, 0), dx, n, ds, lora_a, a_strides, 1.0,
                         None, None, 0.0, dropout_p, seed, x.dtype)
        else:
            dx = torch.empty((m, k), device=device, dtype=x.dtype)
            _launch_gemm(dy, (dy.stride(0), dy.stride(1)), weight, (stride_wn, stride_wk), dx, n,
                         ds, lora_a, a_strides, 1.0, None, None, 0.0, dropout_p, seed, x.dtype)

    d_lora_a = d_lora_b = None
    if need_dlora:
        da = torch.zeros((r, k), **f32)
        if m > 0:
            bm, bk, warps, stages = _DA_CFG
            splits, per = _splits(triton.cdiv(k, bk), triton.cdiv(m, bm), device)
            _lora_da_kernel[(triton.cdiv(k, bk), splits)](
                ds, x, da, m, k, r, per,
                ds.stride(0), ds.stride(1), x.stride(0), x.stride(1), da.stride(0), da.stride(1),
                dropout_p, seed,
                LORA_DROPOUT=dropout_p > 0.0, DA_ATOMIC=splits > 1, CDT=_compute_dtype(x.dtype),
                DOT_PRECISION=_dot_precision(x.dtype), R_BLOCK=_r_block(r), BLOCK_M=bm, BLOCK_K=bk,
                num_warps=warps, num_stages=stages,
            )
        d_lora_a = da.to(lora_a.dtype)
        d_lora_b = db.to(lora_b.dtype)
    d_bias = colsum.to(dy.dtype) if need_dbias else None
    d_lora_bias = (colsum * scaling).to(lora_b.dtype) if need_dlora_bias else None
    return LoraGrads(dx, d_lora_a, d_lora_b, d_bias, d_lora_bias)
