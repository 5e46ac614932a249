"""Pure-PyTorch DoRA kernels (math: the DoRA part of ``coto_kernels.kernels.interface``).

**Row norm without an N x K temporary.** PEFT builds ``W + s * B(A(I_K))`` (N x K) every step to take its row
norms. Here, with A' = [A; 1^T] and B' = [B, lora_bias] (the lora_bias column only when there is one)::

    n_j^2 = ||W_j||^2 + 2 s (W A'^T)_j . B'_j + s^2 B'_j (A' A'^T) B'_j^T

in fp32: an N x r' product over K (``W A'^T``, ~r/M of the main GEMM), an r' x r' Gram matrix and row dots.
``||W_j||^2`` is computed once (PEFT's own ``torch.linalg.norm``, squared) and cached per frozen weight, keyed
on its storage pointer, shape, dtype and autograd version counter (an in-place write through the tensor bumps
it). A weight that requires grad is never cached: the fused optimizers (``AdamW(fused=True)``) update it without
bumping the version counter. Writes through ``weight.data`` do not bump it either: the patched layers forget
their weight's entry on ``merge``/``unmerge``; after any other such write call ``clear_weight_norm_cache``.

**When the expansion loses precision.** Its rounding error is about u * (||W_j||^2 + ||s (B'A')_j||^2) (u the
fp32 unit roundoff times the summation length's growth factor), so the *relative* error of n_j^2 is that over
n_j^2. Small updates (||sBA|| << ||W||, the normal case) are harmless: n_j^2 ~ ||W_j||^2 and the error stays at
fp32 level. Near-cancellation (W_j + s(BA)_j much shorter than its parts, anti-parallel parts of similar size)
is not: the error grows like (||W_j||^2 + ||s(BA)_j||^2) / n_j^2 and the expansion can even go negative. Guard:
rows where n_j^2 < ``CANCELLATION_GUARD`` * (||W_j||^2 + ||s(B'A')_j||^2) (relative error of n_j then stays
below ~4 u) are recomputed exactly, in fp64, from those rows of W + s B'A' (a (bad rows) x K temporary only).

**Magnitude gradient: saved tensors, not recomputation.** dm = sum_rows(dY * Z) / n needs an M x N tensor:
recomputing Z = X W^T + ... would cost a second main GEMM (2 M N K flops, the size of the forward itself), while
keeping one costs M x N bytes. Without dropout and without a base bias, Z = Y / c and dm = sum_rows(dY * Y) / m:
the layer's *output* is saved, which is often free (the next op, e.g. an activation, SDPA's V or the MLP
product, saves the same tensor); columns with m_j = 0 (Y_j carries nothing of Z_j there) are recomputed from X,
S and their rows of W and B. With a base bias, Y - bias cancels (in bf16, measured 2x PEFT's dm error), so Z is
kept; with dropout, Z = D W^T + s(S B^T + lb) cannot be recovered from Y (which holds X W^T too), so Z is kept
instead of recomputing D W^T.

**Exact no-op with a bias (fp32/fp64).** A fresh adapter (B = 0, c = 1) must return the base layer's output bit for
bit (PEFT's ``test_lora_use_dora_linear``), but ``bias + c * (X W^T)`` rounds differently from the base layer's
``addmm(bias, X, W^T)`` (1 ulp). In full precision the forward therefore follows PEFT's order: Y = Y_base + (c - 1)
Z + s L on the exact base output, with Z = (Y_base - bias) + s L; the cancellation in Y_base - bias costs Z about
u |bias| / |Z| of relative error, u = 2^-24 in fp32: nothing dm can see. Half precision (u = 2^-8 for bf16) keeps
the bias-free Z above, whose digits dm needs; there Y = bias + c Z may differ from the base output by one ulp.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.weak import WeakTensorKeyDictionary

from .dropout_mask import dropout_keep_mask
from .interface import DoraGrads, GradRequest, LoraOptions, weight_nk

__all__ = [
    "CANCELLATION_GUARD", "augmented_factors", "clear_weight_norm_cache", "column_scale", "dora_backward",
    "dora_forward", "forward_from_down", "dora_row_norm", "dropout_keep_mask", "dropped_input", "magnitude_grad",
    "magnitude_grad_from_dots", "recompute_silent_columns_", "scale_dy", "times_transposed_fp32",
    "weight_row_norms_squared",
]

#: Rows whose expanded n_j^2 falls below this fraction of ||W_j||^2 + ||s (BA)_j||^2 are recomputed exactly.
CANCELLATION_GUARD = 0.25

# Elements of one row chunk when a half-precision W is converted to fp32 (its ||W||^2 and W A^T).
_CHUNK_ELEMENTS = 1 << 20

# weight -> (key, ||W_j||^2 in fp32); weak, so a dropped model frees its entries.
_WEIGHT_NORMS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def _cache_key(weight: Tensor) -> tuple:
    return weight.data_ptr(), weight._version, tuple(weight.shape), weight.stride(), weight.dtype, weight.device


def clear_weight_norm_cache(weight: Tensor | None = None) -> None:
    """Forget the cached ||W_j||^2 of ``weight`` (all weights when None); needed only after ``weight.data`` writes."""
    if weight is None:
        _WEIGHT_NORMS.clear()
    else:
        _WEIGHT_NORMS.pop(weight, None)


def _row_chunks(w_nk: Tensor) -> list[Tensor]:
    return list(w_nk.split(max(1, _CHUNK_ELEMENTS // max(1, w_nk.shape[1]))))


def weight_row_norms_squared(weight: Tensor, weight_is_kn: bool) -> Tensor:
    """||W_j||^2 (fp32 [N]), cached per frozen weight until its storage or version changes (module docstring)."""
    key = _cache_key(weight)
    hit = _WEIGHT_NORMS.get(weight)
    if hit is not None and hit[0] == key and not weight.requires_grad:
        return hit[1]
    w_nk = weight_nk(weight.detach(), weight_is_kn)
    # PEFT's own reduction (``torch.linalg.norm(W, dim=1)``), squared: at B = 0 the expansion's sqrt gives that norm
    # back bit for bit (sqrt(fl(x * x)) = x in binary floating point), so c = m / n is exactly 1 after PEFT's
    # initialisation and a fresh DoRA adapter is an exact no-op, as PEFT's own tests require.
    if w_nk.dtype == torch.float32:
        norms = torch.linalg.norm(w_nk, dim=1)
    else:
        norms = torch.cat([torch.linalg.norm(rows.float(), dim=1) for rows in _row_chunks(w_nk)])
    value = norms.square()
    if weight.requires_grad:  # and drop the entry from when it was frozen: trained by a fused optimizer and then
        _WEIGHT_NORMS.pop(weight, None)  # frozen again, it would match its old key with other values
    else:
        _WEIGHT_NORMS[weight] = (key, value)
    return value


def times_transposed_fp32(w_nk: Tensor, a: Tensor) -> Tensor:
    """W A^T in fp32 (N x r); a half-precision W is converted a chunk of rows at a time, never as a whole."""
    if w_nk.dtype == torch.float32:
        return w_nk @ a.t()
    return torch.cat([rows.float() @ a.t() for rows in _row_chunks(w_nk)])


def augmented_factors(lora_a: Tensor, lora_b: Tensor, lora_bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """(A', B') in fp32 with B'A' = BA + lora_bias 1^T (PEFT's ``B(A(I_K))`` includes lora_B's bias)."""
    a, b = lora_a.detach().float(), lora_b.detach().float()
    if lora_bias is None:
        return a, b
    ones = a.new_ones(1, a.shape[1])
    return torch.cat([a, ones]), torch.cat([b, lora_bias.detach().float().unsqueeze(1)], dim=1)


def dora_row_norm(
    weight: Tensor, lora_a: Tensor, lora_b: Tensor, lora_bias: Tensor | None, *, scaling: float, weight_is_kn: bool,
) -> Tensor:
    """n_j = ||W_j + s (B A)_j + s lora_bias_j||, fp32 [N], detached, by the guarded expansion (module docstring)."""
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        a, b = augmented_factors(lora_a, lora_b, lora_bias)
        w_nk = weight_nk(weight.detach(), weight_is_kn)
        w_squared = weight_row_norms_squared(weight, weight_is_kn)
        cross = (times_transposed_fp32(w_nk, a) * b).sum(1)
        update_squared = ((b @ (a @ a.t())) * b).sum(1).mul_(scaling * scaling)  # ||s (B'A')_j||^2
        norm_squared = w_squared + (2.0 * scaling) * cross + update_squared
        unreliable = norm_squared < CANCELLATION_GUARD * (w_squared + update_squared)
        if bool(unreliable.any()):  # a host read: on a GPU a sync (dora_triton's norm kernel decides in place)
            rows = unreliable.nonzero().squeeze(1)
            exact = w_nk[rows].double() + scaling * (b[rows].double() @ a.double())
            norm_squared[rows] = exact.square().sum(1).float()
        return norm_squared.sqrt_()


def column_scale(magnitude: Tensor, norm: Tensor) -> Tensor:
    """c = m / n (fp32 [N]), the per-output-column scale."""
    return magnitude.detach().float() / norm


KeepMask = Callable[[int, tuple[int, int], float, "torch.device | str"], Tensor]
"""``dropout_keep_mask``'s signature: how a backend generates the (bit-identical) keep mask."""


def _keep(x: Tensor, options: LoraOptions, keep_mask: KeepMask = dropout_keep_mask) -> Tensor | None:
    return keep_mask(options.seed, tuple(x.shape), options.dropout_p, x.device) if options.has_dropout else None


def _masked(x: Tensor, keep: Tensor | None, dtype: torch.dtype) -> Tensor:
    """keep * X in ``dtype``, without the 1/(1-p) factor (folded into smaller operands by the callers)."""
    x = x.to(dtype)
    return x if keep is None else x * keep


def _addmm_into(out: Tensor, left: Tensor, right: Tensor, alpha: float = 1.0) -> Tensor:
    """out + alpha * left @ right, in place when the dtypes agree (else in left's dtype, cast back, as PEFT does)."""
    if left.dtype == out.dtype:
        return out.addmm_(left, right, alpha=alpha)
    return (out + (left @ right) * alpha).to(out.dtype)


def _add_low_rank(z: Tensor, s: Tensor, lora_b: Tensor, lora_bias: Tensor | None, scaling: float) -> Tensor:
    """z + s * (S B^T + lora_bias)."""
    z = _addmm_into(z, s, lora_b.t(), scaling)
    if lora_bias is not None:
        z.add_(lora_bias.to(z.dtype), alpha=scaling)
    return z


# Dtypes whose rounding of Y_base - bias costs dm nothing that matters (module docstring, "exact no-op").
_FULL_PRECISION = (torch.float32, torch.float64)


def _forward_on_base_output(
    x: Tensor, w: Tensor, bias: Tensor, s: Tensor, lora_b: Tensor, lora_bias: Tensor | None, scale: Tensor,
    scaling: float, save_z: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """PEFT's own order for a biased full-precision layer: Y = Y_base + (c - 1) Z + s L with Y_base = addmm(bias,
    X, W^T) (the base layer's exact output), L = S B^T + lora_bias and Z = (Y_base - bias) + s L."""
    y = F.linear(x, w, bias)
    low_rank = torch.mm(s, lora_b.t()).mul_(scaling)  # s is in the adapter's dtype, like lora_b
    if lora_bias is not None:
        low_rank.add_(lora_bias.to(low_rank.dtype), alpha=scaling)
    low_rank = low_rank.to(y.dtype)
    z = (y - bias).add_(low_rank)
    y.addcmul_(z, (scale - 1.0).to(y.dtype)).add_(low_rank)
    return y, s, z if save_z else None


def forward_from_down(
    x: Tensor, w: Tensor, bias: Tensor | None, s: Tensor, lora_b: Tensor, lora_bias: Tensor | None, scale: Tensor,
    scaling: float, save_z: bool,
) -> tuple[Tensor, Tensor | None]:
    """``(Y, Z or None)`` without dropout, given S = X A^T and W as [N, K]: one base GEMM, the low-rank term added
    in place, the column scale c; Z is returned (when ``save_z``) only where dm cannot come from Y (a bias)."""
    if bias is not None and x.dtype in _FULL_PRECISION:
        y, _, z = _forward_on_base_output(x, w, bias, s, lora_b, lora_bias, scale, scaling, save_z)
        return y, z
    z = _add_low_rank(F.linear(x, w), s, lora_b, lora_bias, scaling)
    if bias is None:  # Y = c * Z in place; dm comes from the saved output
        return z.mul_(scale.to(z.dtype)), None
    # with a bias, Y - bias would cancel (a half-precision Y loses dm's digits): keep Z instead
    return torch.addcmul(bias, z, scale.to(z.dtype)), z if save_z else None


def dora_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, lora_bias: Tensor | None,
    magnitude: Tensor, norm: Tensor, *, options: LoraOptions, save_z: bool, keep_mask: KeepMask = dropout_keep_mask,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(Y, S, Z)`` for 2-D ``x``: one base GEMM + in-place low-rank add + column scale without dropout.
    ``keep_mask``: how the dropout mask is generated (the native backend passes its one-pass op)."""
    w = weight_nk(weight, options.weight_is_kn)
    scale = column_scale(magnitude, norm)
    keep = _keep(x, options, keep_mask)
    if keep is None:
        s = x.to(lora_a.dtype) @ lora_a.t()
        y, z = forward_from_down(x, w, bias, s, lora_b, lora_bias, scale, options.scaling, save_z)
        return y, s, z
    inv_keep = 1.0 / (1.0 - options.dropout_p)
    masked = _masked(x, keep, x.dtype)
    s = (masked.to(lora_a.dtype) @ lora_a.t()).mul_(inv_keep)
    y = F.linear(x, w, bias)
    z = F.linear(masked, w).mul_(inv_keep)  # D W^T
    y.sub_(z)
    z = _add_low_rank(z, s, lora_b, lora_bias, options.scaling)
    y.addcmul_(z, scale.to(y.dtype))
    return y, s, z if save_z else None


def scale_dy(dy: Tensor, scale: Tensor, saved: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """G = c * dY (dY's dtype) and, when ``saved`` (Y or Z) is given, sum_rows(dY * saved) in fp32: the magnitude
    gradient's numerator. torch forms the M x N product dY * saved before reducing it."""
    g = dy * scale.to(dy.dtype)
    return g, None if saved is None else (dy * saved).sum(0, dtype=torch.float32)


ScaleDy = Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor | None]]


def magnitude_grad(
    dots: Tensor, dy: Tensor, x: Tensor, weight_rows: Tensor, bias: Tensor | None, lora_b: Tensor,
    lora_bias: Tensor | None, magnitude: Tensor, norm: Tensor, s: Tensor, from_z: bool, scaling: float,
) -> Tensor:
    """dm from ``dots`` = sum_rows(dY * Z) (dropout or bias: Z saved) or sum_rows(dY * Y) (module docstring)."""
    dy_colsum = dy.sum(0, dtype=torch.float32) if bias is not None and not from_z else None
    return magnitude_grad_from_dots(
        dots, dy_colsum, from_z=from_z, dy=dy, x=x, weight_rows=weight_rows, bias=bias, lora_b=lora_b,
        lora_bias=lora_bias, magnitude=magnitude, norm=norm, s=s, scaling=scaling)


def recompute_silent_columns_(d_magnitude: Tensor, *, dy: Tensor, x: Tensor, weight_rows: Tensor, lora_b: Tensor,
                              lora_bias: Tensor | None, magnitude: Tensor, norm: Tensor, s: Tensor,
                              scaling: float) -> None:
    """d_magnitude[j] = sum_rows(dY_j * Z_j) / n_j for the columns with m_j = 0 (Y_j = bias_j carries nothing of
    Z_j there), Z_j recomputed from X, S and row j of W and B. Finds them on the host: on a GPU a sync
    (``dora_triton`` has a kernel instead)."""
    silent = (magnitude.detach() == 0).nonzero().squeeze(1)
    if silent.numel():
        z_cols = x @ weight_rows[silent].t()
        z_cols = _add_low_rank(z_cols, s, lora_b[silent], None if lora_bias is None else lora_bias[silent], scaling)
        d_magnitude[silent] = (dy[:, silent] * z_cols).sum(0, dtype=torch.float32) / norm[silent]


SilentColumns = Callable[..., None]
"""``recompute_silent_columns_``'s signature: how a backend recomputes dm where m_j = 0."""


def magnitude_grad_from_dots(
    column_dots: Tensor, dy_colsum: Tensor | None, *, from_z: bool, dy: Tensor, x: Tensor, weight_rows: Tensor,
    bias: Tensor | None, lora_b: Tensor, lora_bias: Tensor | None, magnitude: Tensor, norm: Tensor, s: Tensor,
    scaling: float, silent_columns: SilentColumns = recompute_silent_columns_,
) -> Tensor:
    """dm from ``column_dots`` (fp32 [N]) = sum_rows(dY * Z) (``from_z``) or sum_rows(dY * Y) (Y saved; then
    ``dy_colsum`` = sum_rows(dY) when there is a bias). A backend whose dY pass computes those sums (one read of
    dY) finishes here: / n, or (Y - bias) / m with the m_j = 0 columns recomputed by ``silent_columns``."""
    if from_z:
        return (column_dots / norm).to(magnitude.dtype)
    m = magnitude.detach().float()
    if bias is not None:
        column_dots = column_dots - bias.float() * dy_colsum
    d_magnitude = column_dots / m
    silent_columns(d_magnitude, dy=dy, x=x, weight_rows=weight_rows, lora_b=lora_b, lora_bias=lora_bias,
                   magnitude=magnitude, norm=norm, s=s, scaling=scaling)
    return d_magnitude.to(magnitude.dtype)


def dora_backward(
    dy: Tensor, x: Tensor, y: Tensor | None, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
    lora_bias: Tensor | None, magnitude: Tensor, norm: Tensor, s: Tensor, z_saved: Tensor | None, *,
    options: LoraOptions, need: GradRequest, need_magnitude: bool, scale_dy: ScaleDy = scale_dy,
    keep_mask: KeepMask = dropout_keep_mask,
) -> DoraGrads:
    """The gradients for 2-D ``dy``; None where not requested. ``scale_dy``: how G = c * dY and the magnitude
    gradient's sum_rows(dY * Y) are formed, ``keep_mask``: how the dropout mask is (the native backend passes its
    one-pass ops for both)."""
    w = weight_nk(weight, options.weight_is_kn)
    scaling = options.scaling
    saved = z_saved if z_saved is not None else y
    if need_magnitude and saved is None:
        raise RuntimeError("DoRA backward: the magnitude gradient without dropout needs the saved output y")
    g, dots = scale_dy(dy, column_scale(magnitude, norm), saved if need_magnitude else None)
    g_lora = g.to(lora_b.dtype)
    ds = (g_lora @ lora_b).mul_(scaling)
    keep = _keep(x, options, keep_mask)  # regenerated once, shared by dA and dX
    inv_keep = 1.0 / (1.0 - options.dropout_p) if keep is not None else 1.0
    d_lora_a = d_lora_b = d_lora_bias = d_magnitude = dx = None
    if need.dlora:
        d_lora_b = (g_lora.t() @ s).mul_(scaling)
        d_lora_a = (ds.t() @ _masked(x, keep, lora_a.dtype)).mul_(inv_keep)
    if need.dlora_bias:
        d_lora_bias = g_lora.sum(0).mul_(scaling)
    d_bias = dy.sum(0) if need.dbias else None
    if need_magnitude:
        d_magnitude = magnitude_grad(dots, dy, x, w, bias, lora_b, lora_bias, magnitude, norm, s,
                                      z_saved is not None, scaling)
    if need.dx:
        if keep is None:  # dX = G W + dS A: one GEMM, the low-rank term added in place
            dx = _addmm_into(g @ w, ds, lora_a)
        else:  # dX = dY W + drop'((G - dY) W + dS A)
            dx = dy @ w
            dropped_part = _addmm_into((g - dy) @ w, ds, lora_a)
            dx.addcmul_(dropped_part.to(dx.dtype), keep, value=inv_keep)
    return DoraGrads(dx, d_lora_a, d_lora_b, d_bias, d_lora_bias, d_magnitude)


def dropped_input(x: Tensor, options: LoraOptions) -> Tensor:
    """D = drop(X) (M x K), for the gradient of an unfrozen base weight only."""
    keep = _keep(x, options)
    return x if keep is None else x * keep * (1.0 / (1.0 - options.dropout_p))
