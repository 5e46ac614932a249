"""The dropout mask definition (``coto_kernels.kernels.dropout_mask``): its statistics, and the Triton kernels'
copy of it, bit for bit."""

from __future__ import annotations

import math
import os

import pytest
import torch

from coto_kernels.kernels import dropout_mask

SHAPE = (1000, 1001)  # ~1e6 elements; odd K: the last column is half a pair
N = SHAPE[0] * SHAPE[1]
SEEDS = (0, 1, 2**31 - 1, 2**40 + 7, 2**63 - 1)


def _mask(seed: int, p: float, shape: tuple[int, int] = SHAPE) -> torch.Tensor:
    return dropout_mask.dropout_keep_mask(seed, shape, p, "cpu")


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drop_rate_within_four_sigma(p):
    sigma = math.sqrt(p * (1 - p) / N)
    for seed in SEEDS[:3]:
        dropped = 1.0 - _mask(seed, p).double().mean().item()
        assert abs(dropped - p) < 4 * sigma, (seed, dropped, p, sigma)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_neighbours_uncorrelated(p):
    """Row neighbours (i, i+1) and column neighbours (i, i+K): |correlation| within 4 standard errors of 0."""
    bound = 4 / math.sqrt(N)
    for seed in SEEDS[:3]:
        keep = _mask(seed, p)
        assert abs(_corr(keep[:, :-1], keep[:, 1:])) < bound, (seed, "row neighbours")
        assert abs(_corr(keep[:-1], keep[1:])) < bound, (seed, "column neighbours")


def test_different_seeds_give_independent_masks():
    bound = 4 / math.sqrt(N)
    p = 0.5
    pairs = [(0, 1), (1, 2), (41, 42), (2**32, 2**32 + 1), (7, 7 + 2**16), (2**63 - 2, 2**63 - 1)]
    for s1, s2 in pairs:
        a, b = _mask(s1, p), _mask(s2, p)
        assert abs(_corr(a, b)) < bound, (s1, s2)
        # no shifted copy either: seed s2's mask is not seed s1's moved by one element or one row
        assert abs(_corr(a.flatten()[1:], b.flatten()[:-1])) < bound, (s1, s2, "shift 1")
        assert abs(_corr(a[1:], b[:-1])) < bound, (s1, s2, "shift one row")


def test_mask_depends_on_row_and_column_only():
    """keep[m, k] is a function of (seed, m, k): the same for any K, and a row block is a prefix."""
    full = _mask(9, 0.3, (48, 50))
    assert torch.equal(full[:, :31], _mask(9, 0.3, (48, 31)))
    assert torch.equal(full[:5], _mask(9, 0.3, (5, 50)))
    assert _mask(9, 0.0, (48, 50)).all()


def test_rectangle_corners_are_not_determined():
    """row(m) ^ col(w) of the four corners of a rectangle xor to zero; pair()'s multiply must hide that: at
    p = 0.5 (the threshold reads one bit) the xor of the corners' decisions is a fair coin."""
    keep = _mask(3, 0.5).long()
    corners = keep[:-1, :-2] ^ keep[1:, :-2] ^ keep[:-1, 2:] ^ keep[1:, 2:]  # columns k and k+2: same half
    n = corners.numel()
    assert abs(corners.double().mean().item() - 0.5) < 4 * math.sqrt(0.25 / n)


def _swar_keep_words(h: int, threshold: int) -> int:
    """The kernels' word-wise test (lora_triton._keep_words), on Python ints."""
    flags = (((h | 0x80008000) - threshold * 0x10001) & 0xFFFFFFFF) & 0x80008000
    return flags | (flags - (flags >> 15))


def test_swar_word_test_equals_the_per_half_definition():
    generator = torch.Generator().manual_seed(0)
    words = torch.randint(0, 2**32, (4000,), generator=generator, dtype=torch.int64).tolist()
    words += [0, 0xFFFFFFFF, 0x7FFF7FFF, 0x80008000, 0x00007FFF, 0x7FFF0000]
    for p in (0.0, 0.05, 0.1, 0.5, 0.999):
        t = dropout_mask.keep_threshold(p)
        for h in words:
            want = (0xFFFF if (h & 0x7FFF) >= t else 0) | (0xFFFF0000 if ((h >> 16) & 0x7FFF) >= t else 0)
            assert _swar_keep_words(h, t) == want, (hex(h), p)


# The Triton kernels' copy (CPU interpreter without a GPU): bit for bit, several seeds, odd shapes.
@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_triton_mask_is_bit_identical(p):
    pytest.importorskip("triton")
    from coto_kernels.kernels import lora_triton

    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    for seed in SEEDS + (12345,):
        for shape in ((37, 45), (130, 64), (5, 1), (1, 300)):
            want = dropout_mask.dropout_keep_mask(seed, shape, p, device)
            got = lora_triton.dropout_keep_mask(seed, shape, p, device)
            assert torch.equal(got, want), (seed, shape, p, (got != want).sum().item())
