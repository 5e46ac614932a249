"""Tools for what CoTo does to adapters: structured/magnitude pruning, merging, Shapley values.

    from coto_kernels.tools import LoraAdapter, pruned, select_off, export_pruned, merge_adapters, adapter_shapley

    with pruned(model, select_off(model, "every-other")):   # evaluate with blocks 1, 3, 5... switched off
        accuracy = evaluate(model)
    merged = merge_adapters([model_seed0, model_seed1], method="ensemble")   # exact rank-sum adapter
    merged.save_pretrained("merged")                        # loads with peft.PeftModel.from_pretrained

Every produced adapter is written in PEFT's own format and loads without coto_kernels.
"""

from .adapter import LoraAdapter, load_peft_model
from .merge import METHODS, as_adapter, interpolate, interpolation_curve, merge_adapters
from .prune import (
    PATTERNS,
    adapter_blocks,
    export_pruned,
    lora_modules,
    magnitude_prune,
    pattern_blocks,
    projection_of,
    prune_adapter,
    pruned,
    pruned_product,
    select_off,
)
from .shapley import (
    ShapleyResult,
    adapter_players,
    adapter_shapley,
    adapter_value_fn,
    draw_shapley_heatmap,
    exact_shapley,
    plot_shapley_heatmap,
    shapley_grid,
    shapley_values,
)

__all__ = [
    "METHODS",
    "PATTERNS",
    "LoraAdapter",
    "ShapleyResult",
    "adapter_blocks",
    "adapter_players",
    "adapter_shapley",
    "adapter_value_fn",
    "draw_shapley_heatmap",
    "as_adapter",
    "exact_shapley",
    "export_pruned",
    "interpolate",
    "interpolation_curve",
    "load_peft_model",
    "lora_modules",
    "magnitude_prune",
    "merge_adapters",
    "pattern_blocks",
    "plot_shapley_heatmap",
    "projection_of",
    "prune_adapter",
    "pruned",
    "pruned_product",
    "select_off",
    "shapley_grid",
    "shapley_values",
]
