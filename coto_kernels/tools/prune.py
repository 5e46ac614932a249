"""Adapter pruning: evaluate or export a LoRA model with chosen adapters switched off, and magnitude pruning.

Structured pruning switches whole adapters off. A switched-off module ``m`` computes its base layer only::

    y = W_m x            instead of      y = W_m x + s_m B_m A_m x

which is exactly what a PEFT adapter with ``B_m = 0`` computes. Selections are made of module paths and
groups; a *block* is the prefix of a module path up to its first numeric component (``...encoder.layer.3``),
as in ``coto_kernels.block_prefix``. Patterns over the ``n`` adapted blocks, in index order:

* ``"every-other"``: blocks 1, 3, 5, ... off (every other layer kept, starting with the first);
  ``"every-other-even"``: blocks 0, 2, 4, ... off;
* ``"low"`` / ``"middle"`` / ``"high"``: the first / second / third of ``torch.tensor_split(range(n), 3)`` off
  (for 6 blocks: {0, 1}, {2, 3}, {4, 5});
* ``keep_projections=("query", "value")``: every module whose projection (module path after its block, or
  its last component) is not listed is switched off.

``pruned(model, off)`` switches the modules off for evaluation. On a model patched by ``coto_kernels.patch``
it uses the controller's ``override`` (forced in train and eval), per group when the selection is a union of
the controller's groups and per layer otherwise; on a vanilla PEFT model it sets PEFT's per-layer
``_disable_adapters`` flag (not ``enable_adapters(False)``, which would also flip ``requires_grad``). Nothing
is copied and the weights are untouched. ``export_pruned`` writes the same function as a PEFT adapter with the
switched-off ``B`` set to zero.

Unstructured magnitude pruning (``magnitude_prune``) works on each module's product ``P_m = B_m A_m``
(N x K): the ``round(sparsity * N * K)`` entries of smallest ``|P_m|`` are set to zero, giving ``P'_m``, which is
in general no longer of rank <= r. Two ways to store it as a LoRA adapter:

* ``refactor="svd"`` (default, rank-preserving): the best rank-r approximation of ``P'_m`` in Frobenius norm
  (Eckart-Young), ``P'_m ~= U_r S_r V_r^T``, stored as ``B = U_r S_r^{1/2}``, ``A = S_r^{1/2} V_r^T``. Same
  shapes and config as the input, so it loads into the same model; the stored product is *not* exactly sparse.
* ``refactor="exact"``: the full SVD ``P'_m = U S V^T`` stored as ``B = U S``, ``A = V^T`` with rank
  ``min(N, K)``; ``r`` / ``lora_alpha`` (and ``rank_pattern`` / ``alpha_pattern`` where shapes differ) are
  rewritten so PEFT's scaling is unchanged. Exact up to float rounding, at the cost of a full-rank adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from ..gates import block_prefix, natural_key
from ..patching import CONTROLLER_KEY
from .adapter import LoraAdapter
from .checks import finite

PATTERNS = ("every-other", "every-other-even", "low", "middle", "high")
REFACTOR = ("svd", "exact")


def lora_modules(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Module]:
    """``{module path: layer}`` for every PEFT LoRA layer of ``model`` holding ``adapter_name``, in model order."""
    from peft.tuners.lora import LoraLayer

    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, LoraLayer) and adapter_name in getattr(m, "lora_A", {})
    }


def adapter_blocks(modules: Iterable[str]) -> list[str]:
    """The distinct block prefixes of ``modules``, sorted by block index (modules outside blocks are skipped)."""
    return sorted({b for m in modules if (b := block_prefix(m)) is not None}, key=natural_key)


def projection_of(module: str) -> str:
    """The module path after its block prefix (``attention.self.query``), or the last component outside blocks."""
    block = block_prefix(module)
    return module[len(block) + 1:] if block is not None and module != block else module.rsplit(".", 1)[-1]


def _projection_matches(module: str, names: Iterable[str]) -> bool:
    proj = projection_of(module)
    return any(proj == n or proj.rsplit(".", 1)[-1] == n or proj.endswith("." + n) for n in names)


def pattern_blocks(blocks: Sequence[str], pattern: str) -> list[str]:
    """The blocks a named pattern switches off (see the module docstring)."""
    n = len(blocks)
    if pattern == "every-other":
        return [b for i, b in enumerate(blocks) if i % 2 == 1]
    if pattern == "every-other-even":
        return [b for i, b in enumerate(blocks) if i % 2 == 0]
    if pattern in ("low", "middle", "high"):
        part = torch.tensor_split(torch.arange(n), 3)[("low", "middle", "high").index(pattern)]
        return [blocks[i] for i in part.tolist()]
    raise ValueError(f"unknown pruning pattern {pattern!r}; expected one of {PATTERNS}")


def select_off(
    modules: Iterable[str] | nn.Module,
    pattern: str | None = None,
    *,
    keep_projections: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
) -> list[str]:
    """Module paths to switch off: the union of a block ``pattern``, the modules outside ``keep_projections``
    and the explicit ``groups`` (module paths, block prefixes such as ``...layer.3``, or projection names).

    ``modules`` is a PEFT model or the list of its LoRA module paths; the result keeps model order.
    """
    names = list(lora_modules(modules)) if isinstance(modules, nn.Module) else list(modules)
    off: set[str] = set()
    if pattern is not None:
        blocks = set(pattern_blocks(adapter_blocks(names), pattern))
        off |= {m for m in names if block_prefix(m) in blocks}
    if keep_projections is not None:
        off |= {m for m in names if not _projection_matches(m, keep_projections)}
    for g in groups or ():
        hit = [m for m in names if m == g or block_prefix(m) == g or _projection_matches(m, [g])]
        if not hit:
            raise KeyError(f"{g!r} matches no LoRA module; modules are e.g. {names[:3]}")
        off |= set(hit)
    return [m for m in names if m in off]


@contextlib.contextmanager
def pruned(model: nn.Module, off: Iterable[str], adapter_name: str = "default") -> Iterator[list[str]]:
    """Evaluate ``model`` with the LoRA modules ``off`` switched off (module paths, block prefixes or projection
    names, resolved by ``select_off(model, groups=off)``); yields the resolved module paths.

    Patched models: ``controller.override`` (per group) or per-layer ``coto_override``; vanilla PEFT models:
    per-layer ``_disable_adapters``. Everything is restored on exit.
    """
    layers = lora_modules(model, adapter_name)
    off = list(off)
    off_modules = select_off(list(layers), groups=off) if off else []
    controller = model.__dict__.get(CONTROLLER_KEY)
    if controller is not None and set(controller.layer_names) == set(layers):
        group_of = controller.group_of_layer
        off_groups = {group_of[m] for m in off_modules}
        if {m for m in layers if group_of[m] in off_groups} == set(off_modules):  # whole groups only
            with controller.override({g: False for g in off_groups}):
                yield off_modules
            return
    saved = []
    try:
        for m in off_modules:
            layer = layers[m]
            if hasattr(layer, "coto_is_on"):  # gated by coto_kernels: forced off in train and eval
                saved.append((layer, "coto_override", layer.__dict__.get("coto_override", None)))
                layer.coto_override = False
            else:
                saved.append((layer, "_disable_adapters", layer.__dict__.get("_disable_adapters", None)))
                layer._disable_adapters = True
        yield off_modules
    finally:
        for layer, attr, value in reversed(saved):
            if value is None:
                layer.__dict__.pop(attr, None)
            else:
                setattr(layer, attr, value)


def prune_adapter(adapter: LoraAdapter, off: Iterable[str]) -> LoraAdapter:
    """A copy of ``adapter`` with ``B_m = 0`` for every module in ``off`` (paths, blocks or projections)."""
    off_modules = set(select_off(adapter.modules, groups=list(off)))
    return adapter.map(lambda m, A, B, s: (A.clone(), torch.zeros_like(B) if m in off_modules else B.clone(), s))


def export_pruned(
    model: nn.Module,
    off: Iterable[str],
    save_directory: str | None = None,
    adapter_name: str = "default",
) -> LoraAdapter:
    """The model's adapter with the modules ``off`` zeroed (``B = 0``); written as a PEFT folder when
    ``save_directory`` is given. It loads in vanilla PEFT and computes what ``pruned(model, off)`` computes."""
    adapter = prune_adapter(LoraAdapter.from_model(model, adapter_name), off)
    if save_directory is not None:
        adapter.save_pretrained(save_directory)
    return adapter


def magnitude_prune(adapter: LoraAdapter, sparsity: float, *, refactor: str = "svd") -> LoraAdapter:
    """Unstructured magnitude pruning of each module's product ``B A`` at ``sparsity`` (fraction of entries set
    to zero, per module), stored back as LoRA factors by ``refactor`` (``"svd"``: rank r, approximate;
    ``"exact"``: rank min(N, K), exact). Computed in float64, stored in the input dtype."""
    if not 0.0 <= finite("sparsity", sparsity) <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    if refactor not in REFACTOR:
        raise ValueError(f"refactor must be one of {REFACTOR}, got {refactor!r}")

    def one(module: str, A: torch.Tensor, B: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        product = pruned_product(B, A, sparsity)
        U, S, Vh = torch.linalg.svd(product, full_matrices=False)
        if refactor == "svd":
            r = A.shape[0]
            root = S[:r].sqrt()
            return (root[:, None] * Vh[:r]).to(A.dtype), (U[:, :r] * root).to(B.dtype), s
        return Vh.to(A.dtype).contiguous(), (U * S).to(B.dtype), s

    return adapter.map(one)


def pruned_product(B: torch.Tensor, A: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``B @ A`` in float64 with its ``round(sparsity * numel)`` smallest-magnitude entries set to zero."""
    product = B.double() @ A.double()
    k = int(round(sparsity * product.numel()))
    if k > 0:
        flat = product.flatten()
        drop = torch.topk(flat.abs(), k, largest=False).indices
        flat[drop] = 0.0
        product = flat.view_as(product)
    return product
