"""The one dropout-mask definition of the LoRA path, shared bit for bit by every backend.

Element (m, k) of X [M, K] (row m, column k) belongs to the column pair w = k >> 1; one 32-bit hash per
(row, pair) decides both elements of the pair, each from 15 bits of its half-word. On uint32 (wrap-around,
logical shifts), with (k0, k1) two keys derived from the seed::

    row(m)     = h * 0x85EBCA6B  with  h = m * 0x9E3779B1 + k0;  h ^= h >> 15
    col(w)     = fmix32(w * 0x85EBCA77 + k1)                       (MurmurHash3's finaliser)
    pair(m, w) = (row(m) ^ col(w)) * 0x27D4EB2F
    keep[m, k] = (pair(m, k >> 1) >> (16 * (k & 1))) & 0x7FFF  >=  t,   t = round(p * 2**15)

Why this shape (issue 9: the hash is regenerated inside the GPU kernels' S and dA loops, where it must cost
<= 8 SASS instructions per element, loads and MMA included; a per-element fmix32 of the flat index cost 15-17):

- one hash per pair of elements, and the threshold test of both halves as one SWAR subtraction on the word
  (bit 15 of each half forced to 1, so no borrow crosses halves: hence 15-bit halves), which also gives the
  AND-mask that zeroes the dropped bf16/fp16 halves of the packed X word: 8 integer instructions per pair
  (xor, multiply, then or, subtract, and, shift, subtract, and-or);
- the keys of rows and of column pairs are hashed once per row / column of a tile and combined by one xor,
  so the per-element work does not depend on how strong they are. ``col`` is a full fmix32 (the S pass
  streams columns: 4 pairs per thread and tile); ``row`` is one multiply-xorshift round (the dA pass streams
  rows) and is only ever seen through ``pair``'s mixing.

Properties: if row() and col() values behave as independent uniform draws, row(m) ^ col(w) is uniform and
pairwise independent over distinct (m, w), and pair() is a bijection of it, so every element is kept with
probability exactly 1 - t / 2**15 (p resolved to 2**-15), independently of any other single element (the two
halves of a word are disjoint bits of one uniform word; the low half of the product depends on the low half
of its input only, which is still uniform). The multiply in pair() breaks the one structure the xor leaves
(the four corners of a rectangle have inputs that xor to zero: without it, at p = 0.5 the fourth corner's
decision would follow from the other three). The statistical tests
(``tests/test_dropout_mask.py``) check the keep rate, neighbours along both axes, rectangles and seeds. The
mask depends on (seed, m, k) only, not on K, and needs no 64-bit arithmetic at any size.

This module is the PyTorch implementation (int64 ops on the [M] row and [K/2] pair keys, then one int32
[M, K/2] combine and two compares; ~2.5x cheaper than ``bernoulli_`` on the CPU); the Triton (``lora_triton``)
and native (``csrc/coto_mask.h``) backends implement the same function, and the tests compare them bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

GOLDEN = -1640531535  # 0x9E3779B1 as int32: row(m)'s multiplier
COLUMN_MULT = -2048144777  # 0x85EBCA77 as int32: col(w)'s multiplier
FMIX = (-2048144789, -1028477387)  # MurmurHash3 fmix32 multipliers 0x85EBCA6B, 0xC2B2AE35 as int32
PAIR_MIX = 0x27D4EB2F  # pair()'s multiplier (xxHash's PRIME32_4)
HALF_BITS = 15  # bits of each half-word the threshold reads
_U32 = 0xFFFFFFFF


def _int32(value: int) -> int:
    value &= _U32
    return value - (1 << 32) if value >= 1 << 31 else value


def seed_keys(seed: int) -> tuple[int, int]:
    """(k0, k1): the two int32 keys the hash derives from ``seed``."""
    return _int32(seed * 0x9E3779B97F4A7C15 >> 16), _int32(seed * 0xBF58476D1CE4E5B9 >> 24)


def keep_threshold(dropout_p: float) -> int:
    """t: an element is kept when its 15-bit half-word is >= t (uniform over [0, 2**15))."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return round(dropout_p * 2**HALF_BITS)


def _mul(h: Tensor, constant: int) -> Tensor:
    """h * constant mod 2**32 on int64 holding uint32 values."""
    return h.mul_(constant & _U32).bitwise_and_(_U32)


def _xorshift(h: Tensor, shift: int) -> Tensor:
    return h.bitwise_xor_(h >> shift)


def row_keys(rows: Tensor, key0: int) -> Tensor:
    """row(m) (int64 holding uint32) for int64 row indices."""
    h = _mul(rows.clone(), GOLDEN).add_(key0 & _U32).bitwise_and_(_U32)
    return _mul(_xorshift(h, 15), FMIX[0])


def column_keys(pairs: Tensor, key1: int) -> Tensor:
    """col(w) (int64 holding uint32) for int64 column-pair indices."""
    h = _mul(pairs.clone(), COLUMN_MULT).add_(key1 & _U32).bitwise_and_(_U32)
    h = _mul(_xorshift(h, 16), FMIX[0])
    h = _mul(_xorshift(h, 13), FMIX[1])
    return _xorshift(h, 16)


def _as_int32(h: Tensor) -> Tensor:
    """int64 holding uint32 -> the same bits as int32."""
    return torch.where(h >= 1 << 31, h - (1 << 32), h).to(torch.int32)


def dropout_keep_mask(seed: int, shape: tuple[int, int], dropout_p: float, device: torch.device | str) -> Tensor:
    """The keep mask (bool, ``shape``) for ``seed``, computed with PyTorch ops (views by ``unsqueeze``/
    ``narrow``, not indexing: kernels-check runs this on fake CUDA tensors, where indexing needs a real device).

    The key vectors are built in int64; the [rows, pairs] stage runs on int32 (torch's int32 multiply wraps
    like uint32; the logical shift is an arithmetic one with the sign extension masked off)."""
    key0, key1 = seed_keys(seed)
    rows, cols = shape
    device = torch.device(device)
    pairs = (cols + 1) // 2
    row = _as_int32(row_keys(torch.arange(rows, device=device), key0))
    col = _as_int32(column_keys(torch.arange(pairs, device=device), key1))
    h = (row.unsqueeze(1) ^ col.unsqueeze(0)).mul_(_int32(PAIR_MIX))
    threshold = keep_threshold(dropout_p)
    half_mask = (1 << HALF_BITS) - 1
    low = h.bitwise_and(half_mask) >= threshold
    high = h.bitwise_and_(half_mask << 16) >= threshold << 16  # the high half: h's last use, masked in place
    # stacked, not written through out= into strided halves: Dynamo cannot trace out= on a view (torch.compile)
    keep = torch.stack((low, high), dim=2)
    return keep.view(rows, 2 * pairs).narrow(1, 0, cols)
