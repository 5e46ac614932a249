"""Fused Triton backend of the gated LoRA linear layer (math: ``coto_kernels.kernels.interface``).

Kernels, one launcher each::

    _lora_x_pass_kernel  S = drop(X) A^T             one skinny pass over X, fp32 [M, r]
    _fused_gemm_kernel   Y = X W^T + bias + g*s*(S B^T + lora_bias)  and  dX = dY W + g*drop'(dS A):
                         the low-rank term seeds the fp32 accumulator, the biases go into the epilogue, the
                         output is written once (no M x N intermediate)
    _lora_ds_db_kernel   dS = s dY B, dB = s dY^T S, colsum(dY)      one read of dY for all three
    _lora_x_pass_kernel  dA = dS^T drop(X)           the same kernel with FOR_DA: one skinny pass over X

DoRA (``dora_triton``) uses the same kernels through constexpr flags: the GEMM's HAS_COL_SCALE / STORE_Z
(per-column scale in the epilogue; the pre-scale output optionally stored), A_COL_SCALE (A scaled along K as it
is loaded: dX = (c * dY) W) and DORA_DROPOUT (dropout: a second accumulator takes drop(X) W^T, or ((c - 1) dY) W
for dX, from the same tiles), and the dY pass's HAS_COL_SCALE / COMPUTE_DY_COLSUM / COMPUTE_DM (dS, dB, colsum
of c * dY, plus colsum(dY) and sum_rows(dY * saved output) from the same tiles).

The dropout mask is ``coto_kernels.kernels.dropout_mask``'s hash of (seed, row, column pair), regenerated in the
S pass, the dX accumulator seed and the dA pass (never stored). The host derives the seed keys and the threshold
once per call. The skinny passes read 16-bit X with unit column stride as 32-bit words (``pairs_in_words``):
per tile, one key per row and one per column pair, then per word one xor and one multiply (the pair hash) and a
SWAR test of both halves that yields the AND-mask of the word (``_keep_words``), so the masked word is never
split for the select. Compiled for sm_90 (bf16, r 16, 64x128 tiles, 4 warps) the S loop runs 7.8 SASS
instructions per element of X with dropout and 2.3 without, the dA loop 7.5 and 3.2; sm_80: 7.0 and 8.0
(kernels-check reports every rank and fails above 8 at r 16). The previous mask, a per-element fmix32 of the
flat index, cost 17.0 / 15.5 there (a third of it the select and re-packing of bf16 pairs); Philox was ~59.
Elsewhere (the GEMM's dX seed, 32-bit or strided X) the same definition runs element by element.

Dispatch (host side):

* gate off: the base GEMMs only, on cuBLAS; no LoRA kernel is launched.
* ``M < cublas_below_m`` (default 128, ``COTO_TRITON_CUBLAS_BELOW_M``): the base GEMM runs on cuBLAS, whose
  split-K/GEMV kernels win for a handful of rows; the low-rank term is then added by the GEMM kernel with its
  main loop compiled out. The skinny kernels run in both cases.
* rank above ``MAX_RANK``, or fp32 inputs on a GPU (each warns once: IEEE fp32 dots and even TF32 fp32 tiles
  spill on sm_80/sm_90, see kernels-check): the ``lora_torch`` backend (cuBLAS GEMMs, the same dropout mask).
* Split reductions (S over K, dS over N, dA over M, when there are too few programs otherwise) meet through
  relaxed fp32 atomics; with ``torch.use_deterministic_algorithms(True)`` each split writes its own partial
  buffer that torch sums in a fixed order, and dB / the bias sums (cross-program atomics over M in the dS/dB
  kernel) are computed by torch GEMM/sum instead.
* Hopper (sm_90+), 16-bit operands with 16-byte aligned rows: the GEMM's main loop reads A and B through tensor
  descriptors (TMA; compiled for sm_90 every config shows HGMMA and UTMALDG, no stack) on a persistent grid of
  one program per SM; elsewhere the pointer main loop, one program per tile. Device-side descriptors need
  Triton's scratch allocator: a torch one is installed (``triton.set_allocator``, process-wide) at the first
  TMA launch.
* Offsets are int32 unless some tensor of the launch spans 2**31 elements (``needs_int64_offsets``), e.g. LoRA
  on a 128k-vocabulary ``lm_head``: then the kernel is compiled with int64 offsets.

Dtypes: X, W and the biases may be fp32 (TF32), fp16 or bf16; the adapters may be another dtype. Tiles are cast
to X's dtype for the MMA and accumulated in fp32; S and dS stay fp32 in memory; gradients come back in each
parameter's dtype. Tile sizes of the skinny kernels adapt to the rank so every r <= MAX_RANK fits the shared
memory of sm_80 and sm_90; the GEMM autotuner prunes configs that do not fit the device.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import lora_torch
from .dropout_mask import COLUMN_MULT, FMIX, GOLDEN, HALF_BITS, PAIR_MIX, keep_threshold, seed_keys
from .interface import GradRequest, LoraGrads, LoraOptions, weight_nk

# Under the interpreter bf16 tensors are raw bits, so every loaded tile is upcast to fp32 before any arithmetic;
# on a GPU the MMA must stay in the input dtype. This flag picks the compute dtype handed to the kernels.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

#: Environment variable giving the default of ``cublas_below_m`` (rows below which the base GEMM uses cuBLAS).
CUBLAS_BELOW_M_ENV = "COTO_TRITON_CUBLAS_BELOW_M"
DEFAULT_CUBLAS_BELOW_M = 128

#: Largest LoRA rank the kernels take; above it the layer runs the torch backend (one warning).
MAX_RANK = 256

#: Shared memory the skinny kernels' pipelined operand tiles may use: under sm_80's 163 KiB per-block limit
#: (sm_90: 227 KiB), with room for the layout-conversion scratch Triton adds.
SKINNY_SMEM_BUDGET = 144 * 1024

# fp32 inputs reach the kernels only under the interpreter with TF32 allowed (on a GPU: the torch backend).
_DOT_PRECISION = "tf32"
# Tensor descriptors (TMA loads on Hopper) in this Triton (3.4+, and the allocator they need).
_HAS_TENSOR_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")
_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_U32 = 0xFFFFFFFF
_GOLDEN_U32 = tl.constexpr(GOLDEN & _U32)
_COLUMN_MULT_U32 = tl.constexpr(COLUMN_MULT & _U32)
_FMIX0_U32 = tl.constexpr(FMIX[0] & _U32)
_FMIX1_U32 = tl.constexpr(FMIX[1] & _U32)
_PAIR_MIX_U32 = tl.constexpr(PAIR_MIX & _U32)
_HALF_MASK = tl.constexpr((1 << HALF_BITS) - 1)  # the bits of a half-word the threshold reads
_FLAG_BITS = tl.constexpr(0x80008000)  # bit 15 of each half-word
# Arguments that change with the batch or the seed: never specialized (no recompile per token count or seed).
_RUNTIME_ARGS = ["M", "blocks_per_split", "mask_key0", "mask_key1", "mask_threshold"]


# --------------------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _offsets(block, BLOCK: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    """block * BLOCK + [0, BLOCK), in int64 when the launch's tensors span 2**31 elements."""
    if INT64_OFFSETS:
        block = tl.cast(block, tl.int64)
    return block * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _mask_row_keys(offs_m, mask_key0):
    """row(m) of ``dropout_mask`` (uint32) for a vector of rows."""
    h = offs_m.to(tl.uint32) * _GOLDEN_U32 + mask_key0.to(tl.uint32, bitcast=True)
    return (h ^ (h >> 15)) * _FMIX0_U32


@triton.jit
def _mask_column_keys(offs_w, mask_key1):
    """col(w) of ``dropout_mask`` (uint32, MurmurHash3's fmix32) for a vector of column pairs."""
    h = offs_w.to(tl.uint32) * _COLUMN_MULT_U32 + mask_key1.to(tl.uint32, bitcast=True)
    h = (h ^ (h >> 16)) * _FMIX0_U32
    h = (h ^ (h >> 13)) * _FMIX1_U32
    return h ^ (h >> 16)


@triton.jit
def _pair_hash(row_keys, column_keys):
    """pair(m, w) for every (row, column pair) of a tile: [len(row_keys), len(column_keys)] uint32."""
    return (row_keys[:, None] ^ column_keys[None, :]) * _PAIR_MIX_U32


@triton.jit
def _keep_mask(offs_m, offs_k, mask_key0, mask_key1, mask_threshold):
    """keep[m, k] of ``dropout_mask`` for a [len(offs_m), len(offs_k)] tile, one element at a time."""
    return _keep_mask_of_rows(_mask_row_keys(offs_m, mask_key0), offs_k, mask_key1, mask_threshold)


@triton.jit
def _keep_mask_of_rows(row_keys, offs_k, mask_key1, mask_threshold):
    """``_keep_mask`` with the rows' keys already made (a loop over K reuses them at every step)."""
    h = _pair_hash(row_keys, _mask_column_keys(offs_k >> 1, mask_key1))
    half = (h >> ((offs_k & 1) * 16).to(tl.uint32)[None, :]) & _HALF_MASK
    return half.to(tl.int32) >= mask_threshold


@triton.jit
def _keep_words(offs_m, offs_w, mask_key0, mask_key1, mask_threshold):
    """The keep mask of a tile of packed 16-bit pairs as AND-masks: 0xFFFF in each kept half-word.

    SWAR: with bit 15 of each half forced to 1, (h | F) - (t | t << 16) keeps bit 15 of a half exactly when
    that half's low 15 bits are >= t (no borrow crosses halves: t <= 2**15); flags | (flags - (flags >> 15))
    widens each flag bit into its half. 8 integer instructions per pair after the per-row/column keys.
    """
    return _keep_words_of_rows(_mask_row_keys(offs_m, mask_key0), offs_w, mask_key1, mask_threshold)


@triton.jit
def _keep_words_of_rows(row_keys, offs_w, mask_key1, mask_threshold):
    """``_keep_words`` with the rows' keys already made (a loop over K reuses them at every step)."""
    h = _pair_hash(row_keys, _mask_column_keys(offs_w, mask_key1))
    pair_threshold = mask_threshold.to(tl.uint32, bitcast=True) * 0x10001
    flags = ((h | _FLAG_BITS) - pair_threshold) & _FLAG_BITS
    return flags | (flags - (flags >> 15))


@triton.jit
def _load_kept_x(x_ptr, offs_m, k_block, M, K, stride_xm, stride_xk,
                 mask_key0, mask_key1, mask_threshold, INT64_OFFSETS: tl.constexpr, BLOCK_K: tl.constexpr,
                 LORA_DROPOUT: tl.constexpr, PAIRED_X: tl.constexpr, CDT: tl.constexpr):
    """keep * X for a tile, zero outside X; callers apply 1/(1-p) to their fp32 sums.

    PAIRED_X (16-bit X, unit column stride, even K and row stride, 4-byte aligned): X is read as 32-bit words
    of two elements and masked word by word (``_keep_words``), then split back into elements.
    """
    if LORA_DROPOUT and PAIRED_X:
        offs_w = _offsets(k_block, BLOCK_K // 2, INT64_OFFSETS)
        words_ptr = x_ptr.to(tl.pointer_type(tl.uint32), bitcast=True)
        words = tl.load(words_ptr + offs_m[:, None] * (stride_xm // 2) + offs_w[None, :],
                        mask=(offs_m[:, None] < M) & (offs_w[None, :] < K // 2), other=0)
        words &= _keep_words(offs_m, offs_w, mask_key0, mask_key1, mask_threshold)
        low = words.to(tl.uint16).to(x_ptr.dtype.element_ty, bitcast=True)
        high = (words >> 16).to(tl.uint16).to(x_ptr.dtype.element_ty, bitcast=True)
        return tl.join(low, high).reshape(offs_m.shape[0], BLOCK_K).to(CDT)
    offs_k = _offsets(k_block, BLOCK_K, INT64_OFFSETS)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0).to(CDT)
    if LORA_DROPOUT:
        keep = _keep_mask(offs_m, offs_k, mask_key0, mask_key1, mask_threshold)
        x = tl.where(keep, x, 0.0).to(CDT)
    return x


@triton.jit
def _store_or_add(ptrs, value, mask, ATOMIC: tl.constexpr):
    """Epilogue of a split reduction: a plain store (one split, or a per-split partial buffer), or a relaxed fp32
    atomic add into a zeroed output shared by the splits (only the final sum is read, so no ordering needed)."""
    if ATOMIC:
        tl.atomic_add(ptrs, value, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, value, mask=mask)


@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def _keep_mask_kernel(out_ptr, M, K, mask_key0, mask_key1, mask_threshold,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[m, k] = keep[m, k] as int8 (tests only)."""
    offs_m = _offsets(tl.program_id(0), BLOCK_M, False)
    offs_k = _offsets(tl.program_id(1), BLOCK_K, False)
    keep = _keep_mask(offs_m, offs_k, mask_key0, mask_key1, mask_threshold)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], keep.to(tl.int8), mask=mask)


# --------------------------------------------------------------------------------------------------------------
# Fused GEMM: C = A_op B_op (+ masked low-rank term) (+ biases) (+ C)
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _tile_coordinates(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row-tile, column-tile) of output tile number ``tile``, GROUP_M row-tiles at a time for L2 reuse."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_in_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_pid_m = (tile // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + ((tile % num_pid_in_group) % group_size_m), (tile % num_pid_in_group) // group_size_m


@triton.jit
def _scaled_along_k(a, a_scale_ptr, offs_k, K, CDT: tl.constexpr):
    """A tile [BLOCK_M, BLOCK_K] times a_scale[k] along K (fp32 product, rounded once to the MMA dtype)."""
    scale = tl.load(a_scale_ptr + offs_k, mask=offs_k < K, other=0.0)
    return (a.to(tl.float32) * scale[None, :]).to(CDT)


@triton.jit
def _kept_tile(a, row_keys, k_start, mask_key1, mask_threshold):
    """keep * A for a loaded [BLOCK_M, BLOCK_K] tile starting at the (even) column ``k_start``. 16-bit A: as in
    ``_load_kept_x``, element pairs become 32-bit words masked word by word (``_keep_words``: one hash and one
    SWAR test per pair); else element by element. Compiled for sm_90 (bf16, 128x128x64 tile, 8 warps) the
    forward's K step is 314 SASS instructions per thread around 8 HGMMA, against 461 element by element (a
    per-element shift, compare and select, re-packing the bf16 pairs) and 79 without dropout."""
    rows: tl.constexpr = a.shape[0]
    cols: tl.constexpr = a.shape[1]
    if a.dtype.primitive_bitwidth == 16:
        low, high = tl.split(tl.reshape(a, (rows, cols // 2, 2)))
        words = low.to(tl.uint16, bitcast=True).to(tl.uint32)
        words |= high.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        offs_w = k_start // 2 + tl.arange(0, cols // 2)
        words &= _keep_words_of_rows(row_keys, offs_w, mask_key1, mask_threshold)
        low = words.to(tl.uint16).to(a.dtype, bitcast=True)
        high = (words >> 16).to(tl.uint16).to(a.dtype, bitcast=True)
        return tl.join(low, high).reshape(rows, cols)
    offs_k = k_start + tl.arange(0, cols)
    return tl.where(_keep_mask_of_rows(row_keys, offs_k, mask_key1, mask_threshold), a, 0.0)


@triton.jit
def _twin_dots(a, b, acc, dropped, row_keys, k_start, K, a_scale_ptr, mask_key1, mask_threshold,
               DROPPED_INPUT: tl.constexpr, CDT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One K step of DORA_DROPOUT: both accumulators from the same A and B tiles (one load, two MMAs).

    acc += A B, and dropped += (keep * A) B (DROPPED_INPUT, the forward: keep is X's dropout mask over [M, K])
    or dropped += (a_scale * A) B (the dX GEMM, whose mask falls on the output instead).
    """
    if DROPPED_INPUT:
        other = _kept_tile(a, row_keys, k_start, mask_key1, mask_threshold).to(CDT)
    else:
        other = _scaled_along_k(a, a_scale_ptr, k_start + tl.arange(0, a.shape[1]), K, CDT)
    b = b.to(CDT)
    acc = tl.dot(a.to(CDT), b, acc, input_precision=DOT_PRECISION)
    return acc, tl.dot(other, b, dropped, input_precision=DOT_PRECISION)


@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def _fused_gemm_kernel(
    a_ptr, b_ptr, c_ptr, s_ptr, l_ptr, bias_ptr, lbias_ptr, col_scale_ptr, a_scale_ptr, z_ptr,
    M, N, K, R, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_sm, stride_sr, stride_lr, stride_ln, stride_zm, stride_zn,
    lora_scale, lbias_scale, drop_scale, mask_key0, mask_key1, mask_threshold,
    HAS_MAIN: tl.constexpr, LORA_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LORA_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_COL_SCALE: tl.constexpr, STORE_Z: tl.constexpr,
    A_COL_SCALE: tl.constexpr, DORA_DROPOUT: tl.constexpr, CDT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INT64_OFFSETS: tl.constexpr, USE_TMA: tl.constexpr, B_K_CONTIGUOUS: tl.constexpr, EVEN_K: tl.constexpr,
    R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[M, N] = col_scale[n] * Z[m, n] + bias[n], where (a[k] = a_scale[k] with A_COL_SCALE, else 1)

        Z[m, n] = sum_k A[m, k] a[k] B[k, n] + keep'[m, n] lora_scale (S[M, R] L[R, N]) + lbias_scale lbias[n]
                  (+ the existing C with ACCUMULATE);  col_scale = 1 without HAS_COL_SCALE.

    Forward:  A = X, B = W^T (strides), S = S, L = B_lora^T, lora_scale = g*s, no mask, lbias_scale = g*s.
    dX:       A = dY, B = W (strides), S = dS (already scaled by s), L = A_lora, lora_scale = 1, keep' = the
              dropout mask of X over the output [M, K] times drop_scale = 1/(1-p).
    DoRA forward (no dropout): HAS_COL_SCALE with col_scale = c = m / n; STORE_Z also writes the pre-scale Z
              (what the magnitude gradient needs when Y - bias would cancel). The bias comes after the scale,
              lora_bias before it.
    DoRA dX (no dropout): A_COL_SCALE with a_scale = c: each A tile (dY) is scaled along K (= N) as it is loaded,
              so G W = (c * dY) W runs without an M x N G in memory.
    DORA_DROPOUT (LORA_DROPOUT's mask keys, p > 0; PEFT's two-term formula, D = drop(X) = keep * X / (1 - p)):
    a second fp32 accumulator ``dropped`` takes the dropped branch's product from the same A and B tiles
    (``_twin_dots``), so the two base products cost one pass over A and B instead of two GEMMs:
      forward (HAS_COL_SCALE): acc = L + X W^T, dropped = (1 - p) L + (keep * X) W^T with L = s S B^T, so
              Z = drop_scale * dropped + s lbias = D W^T + s (S B^T + lbias), and
              Y = acc + s lbias + (c - 1) * Z + bias = X W^T + (c - 1) D W^T + c s (S B^T + lbias) + bias;
              Z is what STORE_Z writes.
      dX (A_COL_SCALE with a_scale = c - 1): acc = dY W, dropped = dS A + ((c - 1) * dY) W, and
              dX = acc + keep'[m, k] * drop_scale * dropped = dY W + drop'((G - dY) W + dS A).
    HAS_MAIN=False drops the K loop (low-rank term only) and ACCUMULATE adds the existing C (the base GEMM,
    without bias when HAS_COL_SCALE): the cuBLAS path.
    Schedule: program i of the grid computes output tiles i, i + grid size, ... (grouped GROUP_M row-tiles at a
    time for L2 reuse): one tile each when the grid is the tile count, persistent when it is the SM count.
    Main loop: pointer loads (cp.async on sm_80/sm_90), or with USE_TMA tensor-descriptor loads (TMA on sm_90;
    A's K stride and B's contiguous stride are 1, B_K_CONTIGUOUS says which of B's strides that is).
    M_BUCKET is unused in the body: it is the autotuning key, so every token count in a bucket shares a config.
    """
    if USE_TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        if B_K_CONTIGUOUS:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1],
                                               block_shape=[BLOCK_N, BLOCK_K])
        else:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_bk, 1],
                                               block_shape=[BLOCK_K, BLOCK_N])
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        pid_m, pid_n = _tile_coordinates(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = _offsets(pid_m, BLOCK_M, INT64_OFFSETS)
        offs_n = _offsets(pid_n, BLOCK_N, INT64_OFFSETS)

        # The low-rank term seeds the accumulator before the main loop, so that (masked or not) it costs no
        # second BLOCK_M x BLOCK_N register tile next to the accumulator.
        offs_r = tl.arange(0, R_BLOCK)
        s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                    mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)
        s = (s.to(tl.float32) * lora_scale).to(CDT)
        lt = tl.load(l_ptr + offs_r[:, None] * stride_lr + offs_n[None, :] * stride_ln,
                     mask=(offs_r[:, None] < R) & (offs_n[None, :] < N), other=0.0).to(CDT)
        acc = tl.dot(s, lt, input_precision=DOT_PRECISION)
        if DORA_DROPOUT:
            row_keys = _mask_row_keys(offs_m, mask_key0)
            if HAS_COL_SCALE:  # forward: the low-rank term seeds both, the dropped one pre-divided by drop_scale
                dropped = acc * (1.0 / drop_scale)
            else:  # dX: the low-rank term belongs to the dropped branch only
                dropped = acc
                acc = tl.zeros_like(dropped)
        elif LORA_DROPOUT:
            keep = _keep_mask(offs_m, offs_n, mask_key0, mask_key1, mask_threshold)
            acc = tl.where(keep, acc * drop_scale, 0.0)

        if HAS_MAIN:
            if USE_TMA:  # out-of-bounds rows/columns/K read as zeros
                for k in range(0, tl.cdiv(K, BLOCK_K)):
                    a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
                    if A_COL_SCALE and not DORA_DROPOUT:
                        a = _scaled_along_k(a, a_scale_ptr, k * BLOCK_K + tl.arange(0, BLOCK_K), K, CDT)
                    if B_K_CONTIGUOUS:
                        b = b_desc.load([pid_n * BLOCK_N, k * BLOCK_K]).T
                    else:
                        b = b_desc.load([k * BLOCK_K, pid_n * BLOCK_N])
                    if DORA_DROPOUT:
                        acc, dropped = _twin_dots(a, b, acc, dropped, row_keys, k * BLOCK_K, K, a_scale_ptr,
                                                  mask_key1, mask_threshold, HAS_COL_SCALE, CDT, DOT_PRECISION)
                    else:
                        acc = tl.dot(a.to(CDT), b.to(CDT), acc, input_precision=DOT_PRECISION)
            else:
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
                    if DORA_DROPOUT:
                        acc, dropped = _twin_dots(a, b, acc, dropped, row_keys, k * BLOCK_K, K, a_scale_ptr,
                                                  mask_key1, mask_threshold, HAS_COL_SCALE, CDT, DOT_PRECISION)
                    else:
                        if A_COL_SCALE:
                            a = _scaled_along_k(a, a_scale_ptr, k * BLOCK_K + offs_k, K, CDT)
                        acc = tl.dot(a.to(CDT), b.to(CDT), acc, input_precision=DOT_PRECISION)
                    a_ptrs += BLOCK_K * stride_ak
                    b_ptrs += BLOCK_K * stride_bk

        n_mask = offs_n < N
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        c_mask = (offs_m[:, None] < M) & n_mask[None, :]
        if ACCUMULATE:
            acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
        if HAS_LORA_BIAS:
            lbias = lbias_scale * tl.load(lbias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            acc += lbias
        z = acc  # the pre-scale output
        if DORA_DROPOUT and HAS_COL_SCALE:
            z = dropped * drop_scale
            if HAS_LORA_BIAS:
                z += lbias
        if STORE_Z:
            tl.store(z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn,
                     z.to(z_ptr.dtype.element_ty), mask=c_mask)
        if HAS_COL_SCALE:
            col_scale = tl.load(col_scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
            if DORA_DROPOUT:
                acc += (col_scale - 1.0) * z
            else:
                acc *= col_scale
        elif DORA_DROPOUT:
            keep = _keep_mask_of_rows(row_keys, offs_n, mask_key1, mask_threshold)
            acc += tl.where(keep, dropped * drop_scale, 0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def gemm_configs(for_interpreter: bool = INTERPRET) -> list[triton.Config]:
    """The fused GEMM's autotuning configs (``_fused_gemm.configs``; ``prune_gemm_configs`` filters them)."""
    if for_interpreter:  # autotuning needs a GPU; big blocks keep the interpreter's per-program overhead low
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=1)]

    def cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                             num_warps=warps, num_stages=stages)

    # Hopper-sized tiles first (wgmma 128-row tiles); prune_gemm_configs drops what does not fit the device's
    # shared memory at this rank and dtype, and the 64x64x32 tile fits everything.
    return [
        cfg(128, 256, 64, 8, 3),
        cfg(256, 128, 64, 8, 3),
        cfg(128, 128, 64, 8, 4),
        cfg(128, 128, 64, 4, 4),
        cfg(64, 128, 64, 4, 4),
        cfg(64, 64, 32, 4, 4),
    ]


def gemm_smem_bytes(config: triton.Config, elem_bytes: int, r_block: int) -> int:
    """Estimated shared memory of the fused GEMM: pipelined A/B tiles plus the low-rank prologue's operands."""
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return (bm * bk + bk * bn) * elem_bytes * config.num_stages + (bm + bn) * r_block * elem_bytes


def prune_gemm_configs(configs: list[triton.Config], named_args: dict, smem_limit: int | None = None,
                       **kwargs) -> list[triton.Config]:
    """The autotuner's ``early_config_prune``: drop configs over the shared-memory limit (of ``smem_limit``, or of
    the output's device), tiles taller than the token bucket and tiles that spill (``gemm_tile_spills``); at
    R_BLOCK >= 256 every config runs with 8 warps (``gemm_config_for_rank``). The smallest config is always kept."""
    args = {**named_args, **kwargs}
    c = args["c_ptr"]
    if smem_limit is None:
        if not isinstance(c, Tensor) or c.device.type != "cuda":
            return configs
        smem_limit = _smem_limit(c.device)
    elem = c.element_size() if args.get("CDT") != tl.float32 else 4
    r_block, m_bucket = args["R_BLOCK"], args["M_BUCKET"]
    configs = [gemm_config_for_rank(cfg, r_block) for cfg in configs]

    def launchable(cfg: triton.Config) -> bool:
        return (gemm_smem_bytes(cfg, elem, r_block) <= smem_limit and cfg.kwargs["BLOCK_M"] <= max(64, m_bucket)
                and not gemm_tile_spills(cfg, args))

    # Only a compile shows what spills: the limits of gemm_tile_spills are what bench/kernels_check.py (ptxas -v
    # of every launch the host code can make) measured on sm_80 and sm_90; docs/kernels_check.md lists them all.
    # The helpers are defined with the host-side dispatch below (they run at launch, not at import).
    kept = [cfg for cfg in configs if launchable(cfg)]
    return kept or [min(configs, key=lambda cfg: gemm_smem_bytes(cfg, elem, r_block))]


_even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
_fused_gemm = triton.autotune(
    configs=gemm_configs(),
    key=["M_BUCKET", "N", "K", "LORA_DROPOUT", "HAS_MAIN", "R_BLOCK", "USE_TMA", "A_COL_SCALE", "HAS_COL_SCALE",
         "STORE_Z", "DORA_DROPOUT"],
    prune_configs_by={"early_config_prune": prune_gemm_configs},
)(_even_k(_fused_gemm_kernel))


# --------------------------------------------------------------------------------------------------------------
# Skinny kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def _lora_x_pass_kernel(
    x_ptr, side_ptr, out_ptr,
    M, K, R, blocks_per_split,
    stride_xm, stride_xk, stride_side0, stride_side1, stride_split, stride_out0, stride_out1,
    drop_scale, mask_key0, mask_key1, mask_threshold,
    FOR_DA: tl.constexpr, LORA_DROPOUT: tl.constexpr, PAIRED_X: tl.constexpr, SPLIT_ATOMIC: tl.constexpr,
    INT64_OFFSETS: tl.constexpr, CDT: tl.constexpr, DOT_PRECISION: tl.constexpr, R_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The two skinny passes over X, accumulated in fp32 (FOR_DA picks the axis of X a program owns)::

        S   [M, R] = (1/(1-p)) (keep * X) A^T     program i owns row-block i and reduces over K-blocks;
                                                  side = A read as A^T [K, R]
        dA^T[K, R] = (1/(1-p)) (keep * X)^T dS    program i owns K-block i and reduces over row-blocks;
                                                  side = dS [M, R]; dA^T so the MMA's long side is BLOCK_K

    ``side`` is read as [reduced axis, R] (strides side0, side1), the output tile is [owned axis, R] (strides
    out0, out1). Grid (owned blocks, splits): split j reduces blocks [j * blocks_per_split, ...) into its
    output, ``stride_split`` apart (0 with SPLIT_ATOMIC, where the splits add into one zeroed output).
    """
    OWNED: tl.constexpr = BLOCK_K if FOR_DA else BLOCK_M
    REDUCED: tl.constexpr = BLOCK_M if FOR_DA else BLOCK_K
    owned_len = K if FOR_DA else M
    reduced_len = M if FOR_DA else K
    pid_s = tl.program_id(1)
    offs_own = _offsets(tl.program_id(0), OWNED, INT64_OFFSETS)
    offs_r = tl.arange(0, R_BLOCK)
    acc = tl.zeros((OWNED, R_BLOCK), dtype=tl.float32)
    start = pid_s * blocks_per_split
    end = min(start + blocks_per_split, tl.cdiv(reduced_len, REDUCED))
    for block in range(start, end):
        offs_red = _offsets(block, REDUCED, INT64_OFFSETS)
        side = tl.load(side_ptr + offs_red[:, None] * stride_side0 + offs_r[None, :] * stride_side1,
                       mask=(offs_red[:, None] < reduced_len) & (offs_r[None, :] < R), other=0.0).to(CDT)
        if FOR_DA:
            x = _load_kept_x(x_ptr, offs_red, tl.program_id(0), M, K, stride_xm, stride_xk, mask_key0, mask_key1,
                             mask_threshold, INT64_OFFSETS, BLOCK_K, LORA_DROPOUT, PAIRED_X, CDT)
            acc = tl.dot(tl.trans(x), side, acc, input_precision=DOT_PRECISION)
        else:
            x = _load_kept_x(x_ptr, offs_own, block, M, K, stride_xm, stride_xk, mask_key0, mask_key1,
                             mask_threshold, INT64_OFFSETS, BLOCK_K, LORA_DROPOUT, PAIRED_X, CDT)
            acc = tl.dot(x, side, acc, input_precision=DOT_PRECISION)
    if LORA_DROPOUT:
        acc = acc * drop_scale
    out_ptrs = out_ptr + pid_s * stride_split + offs_own[:, None] * stride_out0 + offs_r[None, :] * stride_out1
    _store_or_add(out_ptrs, acc, (offs_own[:, None] < owned_len) & (offs_r[None, :] < R), SPLIT_ATOMIC)


@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def _lora_ds_db_kernel(
    dy_ptr, b_ptr, s_ptr, ds_ptr, db_ptr, colsum_ptr, col_scale_ptr, dy_colsum_ptr, saved_ptr, dots_ptr,
    M, N, R, blocks_per_split,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr,
    stride_split, stride_ds0, stride_ds1, stride_dbn, stride_dbr, stride_savedm, stride_savedn,
    scaling,
    COMPUTE_DS: tl.constexpr, COMPUTE_DB: tl.constexpr, COMPUTE_COLSUM: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr, COMPUTE_DY_COLSUM: tl.constexpr, COMPUTE_DM: tl.constexpr,
    SPLIT_ATOMIC: tl.constexpr, INT64_OFFSETS: tl.constexpr, CDT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One read of each dY tile feeds three reductions:

        dS[M, R]  = s * dY[M, N] @ B[N, R]        (over N: in registers; N-splits as in the S kernel)
        dB[N, R] += dY^T[N, BLOCK_M] @ (s * S)    (over M: relaxed fp32 atomics, one per row-block and element)
        colsum[N] += sum_rows(dY)                 (over M: relaxed fp32 atomics; gives d_bias and d_lora_bias)

    DoRA (HAS_COL_SCALE): each dY tile is scaled by col_scale = c as it is read, so the three above take
    G = c * dY (colsum(G) gives d_lora_bias); from the same unscaled tile COMPUTE_DY_COLSUM adds sum_rows(dY)
    (d_bias) into dy_colsum and COMPUTE_DM adds sum_rows(dY * saved) (saved = Y or Z: the magnitude gradient's
    numerator) into dots, both relaxed fp32 atomics over M like colsum.

    Grid (cdiv(M, BLOCK_M), splits): program (i, j) owns row-block i and N-blocks
    [j * blocks_per_split, ...). Its walk over those N-blocks starts at an offset set by i, so concurrent
    row-blocks add into different rows of dB rather than queueing on the same addresses. (In deterministic mode
    the host leaves dB and colsum to torch: COMPUTE_DB = COMPUTE_COLSUM = False.)
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = _offsets(pid_m, BLOCK_M, INT64_OFFSETS)
    offs_r = tl.arange(0, R_BLOCK)
    m_mask = offs_m < M
    r_mask = offs_r < R
    if COMPUTE_DB:
        s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        s = (s.to(tl.float32) * scaling).to(CDT)
    ds = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
    nb_start = pid_s * blocks_per_split
    nb_count = min(blocks_per_split, tl.cdiv(N, BLOCK_N) - nb_start)
    for i in range(0, nb_count):
        offs_n = _offsets(nb_start + (i + pid_m) % nb_count, BLOCK_N, INT64_OFFSETS)
        n_mask = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        if COMPUTE_DY_COLSUM:
            _store_or_add(dy_colsum_ptr + offs_n, tl.sum(dy.to(tl.float32), axis=0), n_mask, True)
        if COMPUTE_DM:
            saved = tl.load(saved_ptr + offs_m[:, None] * stride_savedm + offs_n[None, :] * stride_savedn,
                            mask=m_mask[:, None] & n_mask[None, :], other=0.0)
            _store_or_add(dots_ptr + offs_n, tl.sum(dy.to(tl.float32) * saved.to(tl.float32), axis=0), n_mask, True)
        if HAS_COL_SCALE:
            dy = dy.to(tl.float32) * tl.load(col_scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        dy = dy.to(CDT)
        if COMPUTE_DS:
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                        mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(CDT)
            ds = tl.dot(dy, b, ds, input_precision=DOT_PRECISION)
        if COMPUTE_DB:
            db = tl.dot(tl.trans(dy), s, input_precision=DOT_PRECISION)
            _store_or_add(db_ptr + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr, db,
                          n_mask[:, None] & r_mask[None, :], True)
        if COMPUTE_COLSUM:
            _store_or_add(colsum_ptr + offs_n, tl.sum(dy.to(tl.float32), axis=0), n_mask, True)
    if COMPUTE_DS:
        ds_ptrs = ds_ptr + pid_s * stride_split + offs_m[:, None] * stride_ds0 + offs_r[None, :] * stride_ds1
        _store_or_add(ds_ptrs, ds * scaling, m_mask[:, None] & r_mask[None, :], SPLIT_ATOMIC)


# --------------------------------------------------------------------------------------------------------------
# Host side: dispatch decisions
# --------------------------------------------------------------------------------------------------------------
def divisible_by_16(*values: int) -> bool:
    """Whether every integer is a multiple of 16: what Triton specialises on, and what lets a tile's loads along
    a stride (or masked at a bound K) use 16-byte vectors instead of one load per element."""
    return all(v % 16 == 0 for v in values)


def gemm_operands_aligned(args: dict) -> bool:
    """The fused GEMM's A and B rows start 16-element aligned and K is a multiple of 16 (unit strides aside)."""
    strides = (args[name] for name in ("stride_am", "stride_ak", "stride_bk", "stride_bn"))
    return divisible_by_16(args["K"], *(s for s in strides if s != 1))


def gemm_config_for_rank(cfg: triton.Config, r_block: int) -> triton.Config:
    """At R_BLOCK >= 256 the low-rank prologue's operands (S [BLOCK_M, R], L [R, BLOCK_N]) need as many registers
    as the accumulator: with 4 warps even the 64x64x32 TMA tile spilled on sm_90 (16 B), so every tile gets 8."""
    if r_block < 256 or cfg.num_warps >= 8:
        return cfg
    return triton.Config(dict(cfg.kwargs), num_warps=8, num_stages=cfg.num_stages)


# Triton 3.6 (the lent GPU machine's image) allocates registers less tightly than 3.9 (CI's) in one place below;
# defined here, after every kernel, so that the kernels' source lines (part of their compile-cache keys) stay put.
_TRITON_BEFORE_3_7 = tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 7)


def gemm_tile_spills(cfg: triton.Config, args: dict) -> bool:
    """Whether the fused GEMM's tile spills registers for these arguments (measured with ptxas -v, sm_80/sm_90).

    * 128 fp32 accumulator elements per thread spill with the dX dropout prologue, DoRA's STORE_Z epilogue, the
      pointer main loop of sm_80 (dX 128x128/4 warps, A_COL_SCALE 128x256/8) and, from R_BLOCK 128, next to the
      low-rank prologue on the TMA path (144 B at 128x128/4 warps); 64 do not.
    * DORA_DROPOUT holds two accumulators: 64 elements of each per thread fit on the TMA path (sm_90: 246-254
      registers, no spill) except in a forward with biases, whose epilogue adds the per-column lora_bias, scale
      and bias vectors (spill stores: 128x128/8 warps 24 B, 64x128/4 warps 16 B); the pointer main loop spilled
      at 64 (sm_80: 128x128/8 warps 512 B forward, 72 B dX; 64x128/4 warps dX 32 B). Those keep 32 (64x64).
    * Unaligned operands (``gemm_operands_aligned``: e.g. K = 4100) load element by element with masks: every
      tile with 64 accumulator elements per thread or BLOCK_K 64 spilled (400-9800 B on sm_80 and sm_90), so
      only 64x64x32-sized tiles (32 per thread) remain.
    * Triton before 3.7 (``make kernels-check-gpu-triton``, 3.6.0): DoRA's dX with the scale in its K loop
      (A_COL_SCALE) at 256x128 / 8 warps spilled 12 B on sm_90 (255 registers; 3.9.0: 248, no spill).
    """
    per_thread = cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] // (32 * cfg.num_warps)
    if _TRITON_BEFORE_3_7 and args.get("A_COL_SCALE") and cfg.kwargs["BLOCK_M"] == 256:
        return True
    if not gemm_operands_aligned(args):
        return per_thread > 32 or cfg.kwargs["BLOCK_K"] > 32
    if args.get("DORA_DROPOUT"):
        biased_forward = args["HAS_COL_SCALE"] and (args["HAS_BIAS"] or args["HAS_LORA_BIAS"])
        return per_thread > (64 if args["USE_TMA"] and not biased_forward else 32)
    roomy = args["USE_TMA"] and not args["LORA_DROPOUT"] and not args["STORE_Z"] and args["R_BLOCK"] < 128
    return per_thread > (128 if roomy else 64)


def lowrank_only_tile(r_block: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the low-rank-only launch (HAS_MAIN=False, the cuBLAS path): BLOCK_N shrinks
    as the rank grows so that S [64, R], L [R, BLOCK_N] and the accumulator stay in registers; at R_BLOCK 128 a
    64x128 tile spilled with dropout on sm_80 (164 B)."""
    if INTERPRET:
        return 64, 64, 4
    return 64, min(128, 8192 // r_block), 4


def default_cublas_below_m() -> int:
    """``cublas_below_m`` when the caller passes None: ``COTO_TRITON_CUBLAS_BELOW_M`` (a row count >= 0) or 128."""
    raw = os.environ.get(CUBLAS_BELOW_M_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_CUBLAS_BELOW_M
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{CUBLAS_BELOW_M_ENV}={raw!r} is not an integer: set it to a row count >= 0 "
                         f"(default {DEFAULT_CUBLAS_BELOW_M}) or unset it") from None
    if value < 0:
        raise ValueError(f"{CUBLAS_BELOW_M_ENV}={raw!r} is negative: set it to a row count >= 0 "
                         f"(default {DEFAULT_CUBLAS_BELOW_M}) or unset it")
    return value


def resolve_cublas_below_m(cublas_below_m: int | None) -> int:
    if cublas_below_m is None:
        return default_cublas_below_m()
    if cublas_below_m < 0:
        raise ValueError(f"cublas_below_m must be >= 0, got {cublas_below_m}")
    return cublas_below_m


def needs_int64_offsets(*tensors: Tensor | None) -> bool:
    """Whether some element offset of these tensors reaches 2**31, so a kernel over them needs int64 offsets.

    Reads only shapes and strides (works on ``meta`` tensors). Example: LoRA on a 128k-vocabulary ``lm_head``
    with 16.7k tokens has a Y of M * N > 2**31 elements.
    """
    def max_offset(t: Tensor) -> int:
        return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True) if size > 0)

    return any(t is not None and t.numel() > 0 and max_offset(t) >= 2**31 for t in tensors)


@functools.cache
def _warn_rank_fallback_once() -> None:
    warnings.warn(f"coto_kernels: the Triton LoRA kernels take ranks up to {MAX_RANK}; layers of larger rank use "
                  "the torch backend (same math and dropout mask)", stacklevel=4)


@functools.cache
def _warn_fp32_fallback_once() -> None:
    warnings.warn("coto_kernels: fp32 activations use the torch backend on a GPU (cuBLAS GEMMs, same math and "
                  "dropout mask): the Triton fp32 tiles spill; train in bf16/fp16 for the fused kernels", stacklevel=4)


def uses_torch_backend(x: Tensor, rank: int) -> bool:
    """Calls the Triton kernels do not take (see the module docstring): too large a rank, or fp32 inputs.

    The interpreter computes every dtype in fp32 (``_compute_dtype``), so there fp32 inputs with TF32 allowed run
    the same kernel code as 16-bit ones and keep exercising it; IEEE fp32 takes the torch backend everywhere.
    """
    if rank > MAX_RANK:
        _warn_rank_fallback_once()
        return True
    if x.dtype != torch.float32:
        return False
    if INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return False
    if not INTERPRET:
        _warn_fp32_fallback_once()
    return True


def _r_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _compute_dtype(dtype: torch.dtype) -> tl.dtype:
    if dtype not in _TL_DTYPE:
        raise TypeError(f"lora_triton supports float32, float16 and bfloat16 inputs, got {dtype}")
    return tl.float32 if INTERPRET else _TL_DTYPE[dtype]


def _smem_limit(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_smem_limit(index)


@functools.cache
def _device_smem_limit(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    if limit is None:
        limit = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return limit


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


def _tma_eligible(a: Tensor, b: Tensor, b_strides: tuple[int, int]) -> bool:
    """Whether the GEMM's A and B can be read through tensor descriptors (TMA): a Hopper-or-newer GPU, a Triton
    with ``tl.make_tensor_descriptor``, 16-bit operands, unit stride along one dimension, 16-byte aligned rows."""
    if a.device.type != "cuda" or not _HAS_TENSOR_DESCRIPTORS or a.element_size() != 2:
        return False
    if torch.cuda.get_device_capability(a.device)[0] < 9:
        return False

    def rows_aligned(t: Tensor, stride: int) -> bool:
        return t.data_ptr() % 16 == 0 and stride * t.element_size() % 16 == 0

    return a.stride(1) == 1 and rows_aligned(a, a.stride(0)) and 1 in b_strides and rows_aligned(b, max(b_strides))


def _persistent_programs(device: torch.device) -> int:
    """Programs of the persistent GEMM: one per SM (the split-reduction target off a GPU, for tests)."""
    if device.type != "cuda":
        return _target_programs(device)
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _install_descriptor_allocator(device_type: str) -> None:
    """Device-side tensor descriptors need Triton's global scratch allocator (128 bytes per program): installed,
    process-wide, at the first TMA launch; a torch allocation on the current device."""
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device_type))


@dataclass(frozen=True)
class SkinnyConfig:
    """Tile of a skinny kernel: BLOCK_M rows by BLOCK (K for the S/dA passes, N for dS/dB), warps, stages."""

    block_m: int
    block: int
    num_warps: int
    num_stages: int


def skinny_config(kernel: str, r_block: int, x_bytes: int, side_bytes: int, x_aligned: bool = True) -> SkinnyConfig:
    """The tile of ``kernel`` ("s", "da", "ds_db", or "dora_ds_db": the dY pass with DoRA's flags) at ``r_block``.

    ``x_bytes``: element size of the streamed tile (X or dY); ``side_bytes``: of the rank-wide operand streamed
    with it (A, dS (fp32) or B). The fp32 accumulator (BLOCK x r_block) is held to 64 registers per thread by
    more warps / shorter tiles at large ranks, and the pipelined operand tiles stay within SKINNY_SMEM_BUDGET
    (fewer stages, then shorter tiles): every r <= MAX_RANK fits sm_80 and sm_90. ``x_aligned`` False (a row
    stride not a multiple of 16 elements, e.g. K = 4100): X loads element by element, and the S pass with
    dropout spilled at 64x128 (96 B stack on sm_90), so the S/dA tiles are 64x64.
    """
    if INTERPRET:
        return SkinnyConfig(64, 64, 4, 1)
    if kernel in ("ds_db", "dora_ds_db"):
        # Tall row-blocks while the rank is small: dB atomics scale with M / BLOCK_M.
        # Both accumulators (dS: block_m x r, dB: block x r) stay within 96 fp32 registers per thread: at r = 128
        # a 128-row tile spilled on sm_80 (255 registers + 32 B stack), 64 rows did not; at r = 256, 64 rows
        # spilled on sm_80 (8 B), so 32. 256 rows spilled at r = 16 on sm_80 (plain pass with split atomics:
        # 40 B) and on sm_90 (DoRA's pass, which also holds the fp32 dY and saved-output tiles: 48 B stack);
        # DoRA's pass over an unaligned dY (masked element loads, e.g. N = 4100) spilled at 128 rows on sm_80
        # (40 B), so 64.
        block_m = min(64 if kernel == "dora_ds_db" and not x_aligned else 128, max(32, 8192 // r_block))
        block = min(64, 8192 // r_block)
        resident = block_m * r_block * x_bytes  # s * S, the dB MMA's operand, loaded once
    else:
        block_m, block = 64, 128 if r_block <= 64 and x_aligned else 64
        resident = 0
    accumulator_rows = block if kernel == "da" else block_m
    num_warps = 8 if kernel in ("ds_db", "dora_ds_db") or accumulator_rows * r_block > 64 * 64 else 4

    def stage_bytes(blk: int) -> int:
        side_rows = block_m if kernel == "da" else blk
        return block_m * blk * x_bytes + side_rows * r_block * side_bytes

    for stages in (3, 2):
        if resident + stages * stage_bytes(block) <= SKINNY_SMEM_BUDGET:
            return SkinnyConfig(block_m, block, num_warps, stages)
    while block > 16 and resident + 2 * stage_bytes(block) > SKINNY_SMEM_BUDGET:
        block //= 2
    return SkinnyConfig(block_m, block, num_warps, 2)


@dataclass(frozen=True)
class KernelDropout:
    """The dropout of one call as kernel arguments: the mask's seed keys and threshold, hoisted to the host."""

    enabled: bool
    scale: float
    key0: int
    key1: int
    threshold: int

    @staticmethod
    def of(options: LoraOptions) -> KernelDropout:
        key0, key1 = seed_keys(options.seed)
        scale = 1.0 / (1.0 - options.dropout_p) if options.has_dropout else 1.0
        return KernelDropout(options.has_dropout, scale, key0, key1, keep_threshold(options.dropout_p))

    def kernel_args(self) -> dict:
        """The kernels' dropout arguments (the same names in every kernel)."""
        return dict(drop_scale=self.scale, mask_key0=self.key0, mask_key1=self.key1,
                    mask_threshold=self.threshold, LORA_DROPOUT=self.enabled)


NO_DROPOUT = KernelDropout(enabled=False, scale=1.0, key0=0, key1=0, threshold=0)


@dataclass
class _SplitOutput:
    """Where the splits of a split reduction write: one buffer (single split, or zeroed with atomics) or, in
    deterministic mode, one partial buffer per split that ``result`` sums in a fixed order."""

    buffer: Tensor
    stride_split: int
    atomic: bool

    @staticmethod
    def of(shape: tuple[int, ...], splits: int, device: torch.device) -> _SplitOutput:
        f32 = dict(device=device, dtype=torch.float32)
        if splits == 1:
            return _SplitOutput(torch.empty(shape, **f32), 0, False)
        if torch.are_deterministic_algorithms_enabled():
            buffer = torch.empty((splits, *shape), **f32)
            return _SplitOutput(buffer, buffer.stride(0), False)
        return _SplitOutput(torch.zeros(shape, **f32), 0, True)

    def result(self) -> Tensor:
        return self.buffer.sum(0) if self.stride_split else self.buffer

    def out_strides(self) -> tuple[int, int]:
        return self.buffer.stride(-2), self.buffer.stride(-1)


# --------------------------------------------------------------------------------------------------------------
# Host side: one launcher per kernel
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _SkinnyPlan:
    """How a skinny kernel is launched: its tile, its grid (parallel blocks, splits) and its split output."""

    cfg: SkinnyConfig
    grid: tuple[int, int]
    blocks_per_split: int
    out: _SplitOutput | None

    @staticmethod
    def of(kernel: str, r: int, streamed: Tensor, side: Tensor, out_shape: tuple[int, int] | None) -> _SkinnyPlan:
        """Programs own row-blocks of ``streamed`` and reduce over its column-blocks (dA: the other way round)."""
        aligned = divisible_by_16(*(stride for stride in streamed.stride() if stride != 1))
        cfg = skinny_config(kernel, _r_block(r), streamed.element_size(), side.element_size(), aligned)
        row_blocks, col_blocks = triton.cdiv(streamed.shape[0], cfg.block_m), triton.cdiv(streamed.shape[1], cfg.block)
        parallel, reduced = (col_blocks, row_blocks) if kernel == "da" else (row_blocks, col_blocks)
        splits, per = _splits(parallel, reduced, streamed.device)
        out = _SplitOutput.of(out_shape, splits, streamed.device) if out_shape is not None else None
        return _SkinnyPlan(cfg, (parallel, splits), per, out)

    def tile_args(self, dtype: torch.dtype, r: int, streamed_block: str) -> dict:
        """The compile-time arguments: compute dtype, padded rank, tile sizes, warps, stages."""
        cfg = self.cfg
        return dict(CDT=_compute_dtype(dtype), DOT_PRECISION=_DOT_PRECISION, R_BLOCK=_r_block(r),
                    BLOCK_M=cfg.block_m, **{streamed_block: cfg.block}, num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages)

    def result(self) -> Tensor | None:
        return self.out.result() if self.out is not None else None


def pairs_in_words(x: Tensor) -> bool:
    """Whether the skinny passes may read 2-D ``x`` as 32-bit words of two elements (``_load_kept_x``)."""
    # 4-byte alignment from the storage offset: torch's allocators align every storage to >= 256 bytes
    return (x.element_size() == 2 and x.stride(1) == 1 and x.shape[1] % 2 == 0 and x.stride(0) % 2 == 0
            and x.storage_offset() % 2 == 0)


def launch_x_pass(x: Tensor, side: Tensor, dropout: KernelDropout, *, for_da: bool) -> Tensor:
    """S = drop(X) A^T (fp32 [M, r]; side = A) or dA = dS^T drop(X) (fp32 [r, K]; side = dS)."""
    m, k = x.shape
    r = side.shape[1] if for_da else side.shape[0]
    plan = _SkinnyPlan.of("da" if for_da else "s", r, x, side, (r, k) if for_da else (m, r))
    out0, out1 = plan.out.out_strides()
    side0, side1 = (side.stride(0), side.stride(1)) if for_da else (side.stride(1), side.stride(0))
    _lora_x_pass_kernel[plan.grid](
        x_ptr=x, side_ptr=side, out_ptr=plan.out.buffer, M=m, K=k, R=r, blocks_per_split=plan.blocks_per_split,
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_side0=side0, stride_side1=side1,
        stride_split=plan.out.stride_split, stride_out0=out1 if for_da else out0, stride_out1=out0 if for_da else out1,
        **dropout.kernel_args(), PAIRED_X=dropout.enabled and pairs_in_words(x), FOR_DA=for_da,
        SPLIT_ATOMIC=plan.out.atomic,
        INT64_OFFSETS=needs_int64_offsets(x, side, plan.out.buffer), **plan.tile_args(x.dtype, r, "BLOCK_K"),
    )
    return plan.result()


class DyReductions(NamedTuple):
    """The reductions of one read of dY (fp32; None where not requested)."""

    ds: Tensor | None
    """dS = s G B [M, r]."""
    db: Tensor | None
    """dB = s G^T S [N, r]."""
    colsum: Tensor | None
    """sum_rows(G) [N]."""
    dy_colsum: Tensor | None
    """sum_rows(dY) [N] (DoRA only: for LoRA, G = dY and ``colsum`` is it)."""
    dots: Tensor | None
    """sum_rows(dY * saved) [N] (DoRA's magnitude gradient numerator)."""


def launch_dy_reductions(dy: Tensor, lora_b: Tensor, s: Tensor | None, scaling: float, need: GradRequest,
                         compute_dtype: torch.dtype, *, col_scale: Tensor | None = None,
                         need_dy_colsum: bool = False, saved: Tensor | None = None) -> DyReductions:
    """One pass over dY (``_lora_ds_db_kernel``): dS, dB and colsum of G = col_scale * dY (G = dY without
    ``col_scale``), plus sum_rows(dY) with ``need_dy_colsum`` and sum_rows(dY * saved) when ``saved`` is given."""
    m, n = dy.shape
    r = lora_b.shape[1]
    need_ds = need.dx or need.dlora
    need_colsum = need.dlora_bias or (need.dbias and col_scale is None)
    need_dy_colsum = need_dy_colsum and col_scale is not None
    deterministic = torch.are_deterministic_algorithms_enabled()
    db = colsum = dy_colsum = dots = None
    if deterministic:  # the reductions over M across programs: fixed-order torch ops instead of atomics
        g = dy if col_scale is None else dy * col_scale.to(dy.dtype)
        if need.dlora:
            dt = torch.promote_types(dy.dtype, lora_b.dtype)
            db = (g.to(dt).t() @ (s * scaling).to(dt)).float()
        if need_colsum:
            colsum = g.sum(0, dtype=torch.float32)
        if need_dy_colsum:
            dy_colsum = dy.sum(0, dtype=torch.float32)
        if saved is not None:
            dots = (dy * saved).sum(0, dtype=torch.float32)
        if not need_ds:
            return DyReductions(None, db, colsum, dy_colsum, dots)
    dora = col_scale is not None or saved is not None
    plan = _SkinnyPlan.of("dora_ds_db" if dora else "ds_db", r, dy, lora_b, (m, r) if need_ds else None)
    compute_db, compute_colsum = need.dlora and not deterministic, need_colsum and not deterministic
    compute_dy_colsum, compute_dm = need_dy_colsum and not deterministic, saved is not None and not deterministic
    f32 = dict(device=dy.device, dtype=torch.float32)
    if compute_db:
        db = torch.zeros((n, r), **f32)
    if compute_colsum:
        colsum = torch.zeros((n,), **f32)
    if compute_dy_colsum:
        dy_colsum = torch.zeros((n,), **f32)
    if compute_dm:
        dots = torch.zeros((n,), **f32)
    unused = dy  # pointer arguments of outputs a constexpr flag switches off
    _lora_ds_db_kernel[plan.grid](
        dy_ptr=dy, b_ptr=lora_b, s_ptr=s if compute_db else unused,
        ds_ptr=plan.out.buffer if need_ds else unused, db_ptr=db if compute_db else unused,
        colsum_ptr=colsum if compute_colsum else unused, col_scale_ptr=col_scale if col_scale is not None else unused,
        dy_colsum_ptr=dy_colsum if compute_dy_colsum else unused, saved_ptr=saved if compute_dm else unused,
        dots_ptr=dots if compute_dm else unused, M=m, N=n, R=r, blocks_per_split=plan.blocks_per_split,
        stride_dym=dy.stride(0), stride_dyn=dy.stride(1), stride_bn=lora_b.stride(0), stride_br=lora_b.stride(1),
        stride_sm=s.stride(0) if compute_db else 0, stride_sr=s.stride(1) if compute_db else 0,
        stride_split=plan.out.stride_split if need_ds else 0,
        stride_ds0=plan.out.out_strides()[0] if need_ds else 0, stride_ds1=plan.out.out_strides()[1] if need_ds else 0,
        SPLIT_ATOMIC=need_ds and plan.out.atomic,
        stride_dbn=db.stride(0) if compute_db else 0, stride_dbr=db.stride(1) if compute_db else 0,
        stride_savedm=saved.stride(0) if compute_dm else 0, stride_savedn=saved.stride(1) if compute_dm else 0,
        scaling=scaling, COMPUTE_DS=need_ds, COMPUTE_DB=compute_db, COMPUTE_COLSUM=compute_colsum,
        HAS_COL_SCALE=col_scale is not None, COMPUTE_DY_COLSUM=compute_dy_colsum, COMPUTE_DM=compute_dm,
        INT64_OFFSETS=needs_int64_offsets(dy, lora_b, s, plan.out.buffer if need_ds else None, db, saved),
        **plan.tile_args(compute_dtype, r, "BLOCK_N"),
    )
    return DyReductions(plan.result(), db, colsum, dy_colsum, dots)


def launch_gemm(*, a: Tensor, b: Tensor, b_strides: tuple[int, int], out_features: int, bias: Tensor | None,
                 lowrank_s: Tensor, lowrank_l: Tensor, l_strides: tuple[int, int], lora_scale: float,
                 lora_bias: Tensor | None, dropout: KernelDropout, cublas_below_m: int,
                 cublas_base: Callable[[], Tensor], col_scale: Tensor | None = None,
                 a_scale: Tensor | None = None, z_out: Tensor | None = None, dora_dropout: bool = False) -> Tensor:
    """C = col_scale * Z + bias, Z = (A * a_scale) B_op + masked low-rank term (lora_scale S L) + lora_scale
    lora_bias, C [M, out_features]; Z is also written to ``z_out`` when given (``_fused_gemm_kernel``).
    ``dora_dropout``: DoRA's two-accumulator forward (with ``col_scale``) or dX (with ``a_scale`` = c - 1) under
    ``dropout`` (the kernel's DORA_DROPOUT); its main loop always runs in the kernel (``M >= cublas_below_m``).

    For ``M < cublas_below_m`` the base GEMM comes from ``cublas_base()`` (A B_op on cuBLAS, + bias unless
    ``col_scale`` is given: then the bias must follow the scale in the epilogue) and the kernel, its main loop
    compiled out, adds the rest to it (not autotuned: tuning replays would add it several times). With
    ``a_scale``, ``cublas_base`` must already include it."""
    m, k = a.shape
    n = out_features
    r = lowrank_s.shape[1]
    on_cublas = m < cublas_below_m
    if dora_dropout and (on_cublas or not dropout.enabled):
        raise ValueError("the two-accumulator DoRA GEMM needs dropout and its own main loop (M >= cublas_below_m)")
    c = cublas_base() if on_cublas else torch.empty((m, n), device=a.device, dtype=a.dtype)
    bias_in_kernel = bias is not None and (not on_cublas or col_scale is not None)
    args = dict(
        a_ptr=a, b_ptr=b, c_ptr=c, s_ptr=lowrank_s, l_ptr=lowrank_l,
        bias_ptr=bias if bias_in_kernel else c, lbias_ptr=lora_bias if lora_bias is not None else c,
        col_scale_ptr=col_scale if col_scale is not None else c, a_scale_ptr=a_scale if a_scale is not None else c,
        z_ptr=z_out if z_out is not None else c,
        M=m, N=n, K=k, R=r, M_BUCKET=min(triton.next_power_of_2(m), 16384),
        stride_am=a.stride(0), stride_ak=a.stride(1), stride_bk=b_strides[0], stride_bn=b_strides[1],
        stride_cm=c.stride(0), stride_cn=c.stride(1), stride_sm=lowrank_s.stride(0), stride_sr=lowrank_s.stride(1),
        stride_lr=l_strides[0], stride_ln=l_strides[1],
        stride_zm=z_out.stride(0) if z_out is not None else 0, stride_zn=z_out.stride(1) if z_out is not None else 0,
        lora_scale=lora_scale, lbias_scale=lora_scale, **dropout.kernel_args(),
        HAS_MAIN=not on_cublas, HAS_BIAS=bias_in_kernel, HAS_LORA_BIAS=lora_bias is not None,
        ACCUMULATE=on_cublas, HAS_COL_SCALE=col_scale is not None, STORE_Z=z_out is not None,
        A_COL_SCALE=a_scale is not None and not on_cublas, DORA_DROPOUT=dora_dropout, CDT=_compute_dtype(a.dtype),
        DOT_PRECISION=_DOT_PRECISION,
        INT64_OFFSETS=needs_int64_offsets(a, b, c, lowrank_s, lowrank_l, z_out), R_BLOCK=_r_block(r),
        USE_TMA=False, B_K_CONTIGUOUS=b_strides[0] == 1,
    )
    if on_cublas:
        # One tile per program and no K loop: nothing to pipeline, and num_stages > 1 only multiplied the
        # prologue's shared memory (R_BLOCK 256: 290-368 KiB with 3 stages, over sm_80's and sm_90's limit).
        bm, bn, warps = lowrank_only_tile(_r_block(r))
        _fused_gemm_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](
            **args, EVEN_K=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=16, GROUP_M=8, num_warps=warps, num_stages=1)
        return c
    # Hopper: TMA main loop, persistent grid (one program per SM walks the tiles); elsewhere one program per tile.
    use_tma = _tma_eligible(a, b, b_strides)
    max_programs = _persistent_programs(a.device) if use_tma else None
    if use_tma:
        _install_descriptor_allocator(a.device.type)

    def grid(meta: dict) -> tuple[int]:
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        return (tiles if max_programs is None else min(tiles, max_programs),)

    _fused_gemm[grid](**{**args, "USE_TMA": use_tma})
    return c


# --------------------------------------------------------------------------------------------------------------
# Backend API (interface.LoraBackend)
# --------------------------------------------------------------------------------------------------------------
def dropout_keep_mask(seed: int, shape: tuple[int, int], dropout_p: float, device: torch.device | str) -> Tensor:
    """The keep mask (bool ``shape``) the kernels regenerate for ``seed``, computed by a Triton kernel (tests)."""
    m, k = shape
    out = torch.empty((m, k), dtype=torch.int8, device=device)
    if m and k:
        dropout = KernelDropout.of(LoraOptions(scaling=1.0, dropout_p=dropout_p, seed=seed))
        _keep_mask_kernel[(triton.cdiv(m, 64), triton.cdiv(k, 64))](
            out_ptr=out, M=m, K=k, mask_key0=dropout.key0, mask_key1=dropout.key1,
            mask_threshold=dropout.threshold, BLOCK_M=64, BLOCK_K=64)
    return out.bool()


def lora_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, lora_bias: Tensor | None, *,
    options: LoraOptions, cublas_below_m: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``(Y, S)`` for 2-D ``x`` [M, K]: Y [M, N] in x's dtype, S fp32 [M, r] or None (gate off).

    ``cublas_below_m``: token counts below it run the base GEMM on cuBLAS (None: ``default_cublas_below_m()``).
    """
    w_nk = weight_nk(weight, options.weight_is_kn)
    if not options.gate:
        return torch.nn.functional.linear(x, w_nk, bias), None
    if uses_torch_backend(x, lora_a.shape[0]):
        return lora_torch.lora_forward(x, weight, bias, lora_a, lora_b, lora_bias, options=options)
    cublas_below_m = resolve_cublas_below_m(cublas_below_m)
    m = x.shape[0]
    if m == 0:
        return x.new_empty((0, w_nk.shape[0])), x.new_empty((0, lora_a.shape[0]), dtype=torch.float32)
    s = launch_x_pass(x, lora_a, KernelDropout.of(options), for_da=False)
    y = launch_gemm(
        a=x, b=w_nk, b_strides=(w_nk.stride(1), w_nk.stride(0)), out_features=w_nk.shape[0], bias=bias,
        lowrank_s=s, lowrank_l=lora_b, l_strides=(lora_b.stride(1), lora_b.stride(0)), lora_scale=options.scaling,
        lora_bias=lora_bias, dropout=NO_DROPOUT,  # Y's low-rank term is not masked (S already is)
        cublas_below_m=cublas_below_m, cublas_base=lambda: torch.nn.functional.linear(x, w_nk, bias),
    )
    return y, s


def lora_backward(
    dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, s: Tensor | None, *,
    options: LoraOptions, need: GradRequest, cublas_below_m: int | None = None,
) -> LoraGrads:
    """The gradients for 2-D ``dy`` [M, N]; ``s`` is the S returned by :func:`lora_forward`."""
    w_nk = weight_nk(weight, options.weight_is_kn)
    if not options.gate:
        return LoraGrads(dy @ w_nk if need.dx else None, None, None, dy.sum(0) if need.dbias else None, None)
    r = lora_a.shape[0]
    if uses_torch_backend(x, r):
        s = s.to(lora_a.dtype) if s is not None else None  # a Triton forward's fp32 S, should TF32 have changed
        return lora_torch.lora_backward(dy, x, weight, lora_a, lora_b, s, options=options, need=need)
    if need.dlora and s is None:
        raise ValueError("lora_backward needs the S returned by lora_forward to compute the adapter gradients")
    cublas_below_m = resolve_cublas_below_m(cublas_below_m)
    m, k = x.shape
    n = w_nk.shape[0]
    if m == 0:
        ds, db, colsum = torch.zeros((0, r), device=dy.device), torch.zeros((n, r), device=dy.device), \
            torch.zeros((n,), device=dy.device)
    else:
        ds, db, colsum, _, _ = launch_dy_reductions(dy, lora_b, s, options.scaling, need, x.dtype)
    dropout = KernelDropout.of(options)
    dx = da = None
    if need.dx:
        dx = x.new_empty((0, k)) if m == 0 else launch_gemm(
            a=dy, b=w_nk, b_strides=(w_nk.stride(0), w_nk.stride(1)), out_features=k, bias=None,
            lowrank_s=ds, lowrank_l=lora_a, l_strides=(lora_a.stride(0), lora_a.stride(1)), lora_scale=1.0,
            lora_bias=None, dropout=dropout, cublas_below_m=cublas_below_m, cublas_base=lambda: dy @ w_nk,
        )
    if need.dlora:
        da = torch.zeros((r, k), device=dy.device) if m == 0 else launch_x_pass(x, ds, dropout, for_da=True)
    return LoraGrads(
        dx=dx,
        d_lora_a=da.to(lora_a.dtype) if da is not None else None,
        d_lora_b=db.to(lora_b.dtype) if need.dlora else None,
        d_bias=colsum.to(dy.dtype) if need.dbias else None,
        d_lora_bias=(colsum * options.scaling).to(lora_b.dtype) if need.dlora_bias else None,
    )
