"""``LoraAdapter``: a LoRA adapter as plain tensors, read from a PEFT model or folder and written back as one.

Every tool in ``coto_kernels.tools`` that produces a new adapter (pruned, merged, magnitude-pruned) builds a
``LoraAdapter`` and writes it with ``save_pretrained``: an ``adapter_config.json`` plus
``adapter_model.safetensors`` in the exact layout of ``PeftModel.save_pretrained``, so the result loads in
vanilla PEFT (``PeftModel.from_pretrained(base, folder)``) with no coto_kernels import.

For module ``m`` the adapter holds ``A_m`` ([r_m, K_m]), ``B_m`` ([N_m, r_m]) and the scalar ``s_m`` PEFT
multiplies by (``lora_alpha / r`` or ``lora_alpha / sqrt(r)`` with rsLoRA), so the module computes::

    y = W x + s_m * B_m A_m x        (delta_m = s_m * B_m @ A_m, an N_m x K_m matrix)

Other saved entries (``modules_to_save`` such as a classification head) are kept in ``extra``. When the ranks
or scalings differ between modules, ``save_pretrained`` writes ``rank_pattern`` / ``alpha_pattern`` so that
PEFT's ``lora_alpha / r`` reproduces every ``s_m``; rsLoRA configs are rewritten as plain LoRA with the
equivalent ``lora_alpha``.
"""

from __future__ import annotations

import copy
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

_PREFIX = "base_model.model."
_A, _B = ".lora_A.weight", ".lora_B.weight"


@dataclass
class LoraAdapter:
    """A LoRA adapter as tensors: ``A[m]``, ``B[m]``, ``scaling[m]`` per module path, plus ``extra`` entries.

    Module paths are the PEFT model's module names (``base_model.model.bert.encoder.layer.0....query``), the
    same strings as ``named_modules()`` of the ``PeftModel`` and the key prefixes of a saved adapter.
    """

    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    scaling: dict[str, float]
    config: object  # a peft.LoraConfig
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], config: object) -> LoraAdapter:
        """Build from a saved-format state dict (``get_peft_model_state_dict``) and its ``LoraConfig``."""
        if getattr(config, "use_dora", False):
            raise NotImplementedError("DoRA adapters are not supported by coto_kernels.tools")
        if getattr(config, "lora_bias", False):
            raise NotImplementedError("LoRA adapters with a lora_B bias are not supported by coto_kernels.tools")
        A, B, extra = {}, {}, {}
        for key, value in state.items():
            if not torch.is_tensor(value):
                raise TypeError(f"adapter entry {key} is a {type(value).__name__}, not a tensor")
            if key.endswith(_A):
                A[key[: -len(_A)]] = value.detach().clone()
            elif key.endswith(_B):
                B[key[: -len(_B)]] = value.detach().clone()
            else:
                extra[key] = value.detach().clone()
        if set(A) != set(B):
            raise ValueError(f"unpaired LoRA factors for {sorted(set(A) ^ set(B))}")
        for m in A:
            _check_pair(m, A[m], B[m])
        scaling = {m: _peft_scaling(config, m, A[m].shape[0]) for m in A}
        return cls(A=A, B=B, scaling=scaling, config=copy.deepcopy(config), extra=extra)

    @classmethod
    def from_model(cls, model: nn.Module, adapter_name: str = "default") -> LoraAdapter:
        """Read the adapter ``adapter_name`` of a ``PeftModel`` (patched by coto_kernels or not)."""
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, adapter_name=adapter_name)
        adapter = cls.from_state_dict(state, model.peft_config[adapter_name])
        # The live layers know the exact scaling (rank_pattern, alpha_pattern, rsLoRA already applied).
        for name, module in model.named_modules():
            if name in adapter.A and hasattr(module, "scaling") and adapter_name in module.scaling:
                adapter.scaling[name] = float(module.scaling[adapter_name])
        return adapter

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> LoraAdapter:
        """Read a folder written by ``PeftModel.save_pretrained`` (safetensors or ``adapter_model.bin``)."""
        from peft import LoraConfig

        path = adapter_folder(path)
        config = LoraConfig.from_pretrained(str(path))
        return cls.from_state_dict(_read_weights(path), config)

    # -- views -------------------------------------------------------------------------------------------------

    @property
    def modules(self) -> list[str]:
        """Adapted module paths, in insertion (model) order."""
        return list(self.A)

    def rank(self, module: str) -> int:
        return int(self.A[module].shape[0])

    def delta(self, module: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``s_m * B_m @ A_m`` (N x K), the update this module adds to its base weight (nn.Linear layout)."""
        return self.scaling[module] * (self.B[module].to(dtype) @ self.A[module].to(dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The saved-format state dict (what ``set_peft_model_state_dict`` and ``save_pretrained`` take)."""
        state = {}
        for m in self.A:
            state[m + _A] = self.A[m].contiguous()
            state[m + _B] = self.B[m].contiguous()
        state.update({k: v.contiguous() for k, v in self.extra.items()})
        return state

    def map(self, fn: Callable[[str, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor, float]]
            ) -> LoraAdapter:
        """A new adapter with ``(A, B, s) = fn(module, A, B, s)`` for every module; ``extra`` is copied."""
        A, B, scaling = {}, {}, {}
        for m in self.A:
            A[m], B[m], scaling[m] = fn(m, self.A[m], self.B[m], self.scaling[m])
        return LoraAdapter(A=A, B=B, scaling=scaling, config=copy.deepcopy(self.config),
                           extra={k: v.clone() for k, v in self.extra.items()})

    # -- writing -----------------------------------------------------------------------------------------------

    def peft_config(self) -> object:
        """A ``LoraConfig`` whose ``r`` / ``lora_alpha`` (+ patterns) reproduce every module's rank and scaling."""
        config = copy.deepcopy(self.config)
        ranks = {m: self.rank(m) for m in self.A}
        alphas = {m: self.scaling[m] * ranks[m] for m in self.A}
        r = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(_clean(a) for a in alphas.values()).most_common(1)[0][0]
        config.r = r
        config.lora_alpha = alpha
        config.use_rslora = False
        config.rank_pattern = {_relative(m): ranks[m] for m in self.A if ranks[m] != r}
        config.alpha_pattern = {_relative(m): _clean(alphas[m]) for m in self.A if not math.isclose(
            alphas[m], alpha, rel_tol=1e-9, abs_tol=0.0)}
        # Full paths: exactly these modules get an adapter, whatever regex / layers_to_transform chose them.
        config.target_modules = sorted(_relative(m) for m in self.A)
        config.layers_to_transform = None
        config.layers_pattern = None
        config.init_lora_weights = True
        config.inference_mode = True
        return config

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` loadable by ``PeftModel.from_pretrained``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.peft_config().save_pretrained(str(path))
        save_file(self.state_dict(), str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        return path

    def load_into(self, model: nn.Module, adapter_name: str = "default") -> None:
        """Copy the weights into a ``PeftModel`` whose adapter has the same ranks and scalings (no reload)."""
        modules = dict(model.named_modules())
        for m in self.A:
            layer = modules.get(m)
            if layer is None or adapter_name not in getattr(layer, "lora_A", {}):
                raise KeyError(f"the model has no LoRA adapter {adapter_name!r} at {m}")
            if tuple(layer.lora_A[adapter_name].weight.shape) != tuple(self.A[m].shape):
                raise ValueError(f"{m}: model rank {layer.lora_A[adapter_name].weight.shape[0]} != {self.rank(m)}; "
                                 "save_pretrained and PeftModel.from_pretrained on a fresh base instead")
            if not math.isclose(float(layer.scaling[adapter_name]), self.scaling[m], rel_tol=1e-6):
                raise ValueError(f"{m}: model scaling {layer.scaling[adapter_name]} != {self.scaling[m]}")
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, self.state_dict(), adapter_name=adapter_name)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise KeyError(f"keys the model does not have: {unexpected[:5]}")


def load_peft_model(base: nn.Module, adapter: LoraAdapter | str | os.PathLike, tmpdir: str | None = None) -> nn.Module:
    """``PeftModel.from_pretrained(base, folder)`` for an adapter object (written to a temporary folder)."""
    import tempfile

    from peft import PeftModel

    if isinstance(adapter, LoraAdapter):
        with tempfile.TemporaryDirectory(dir=tmpdir) as folder:
            adapter.save_pretrained(folder)
            return PeftModel.from_pretrained(base, folder)
    return PeftModel.from_pretrained(base, str(adapter_folder(adapter)))


def adapter_folder(path: str | os.PathLike) -> Path:
    """``path`` as a local adapter folder, checked at once: the tools never take a path for a Hub repo id.

    PEFT's loaders read a path that is not a local folder as a Hugging Face Hub repo id (network retries, and
    a remote adapter would be used if one had that name); a typo in a local path must fail here instead.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no adapter folder at {os.fspath(path)!r} (resolved: {folder.resolve()}); coto_kernels.tools reads "
            "local folders written by save_pretrained. For an adapter on the Hugging Face Hub, download it first "
            "(huggingface_hub.snapshot_download(repo_id)) and pass the folder."
        )
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} does not exist: {folder} is no adapter folder written by save_pretrained")
    return folder


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The saved state dict of an adapter folder; a missing or unreadable file is an error naming it."""
    safetensors_file, bin_file = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    if safetensors_file.is_file():
        from safetensors.torch import load_file

        file, read = safetensors_file, lambda: load_file(str(safetensors_file))
    elif bin_file.is_file():
        file, read = bin_file, lambda: torch.load(bin_file, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder} holds neither adapter_model.safetensors nor adapter_model.bin")
    try:
        return read()
    except Exception as err:  # safetensors and torch raise their own types for a truncated or foreign file
        raise ValueError(f"cannot read the adapter weights {file}: {err}") from err


def _check_pair(module: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(
            f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are no LoRA pair (expected A [r, in] "
            "and B [out, r])"
        )


def _relative(module: str) -> str:
    return module[len(_PREFIX):] if module.startswith(_PREFIX) else module


def _clean(x: float) -> float | int:
    return int(round(x)) if math.isclose(x, round(x), rel_tol=0.0, abs_tol=1e-9) else float(x)


def _peft_scaling(config: object, module: str, r: int) -> float:
    from peft.utils.other import get_pattern_key

    key = _relative(module)
    alpha_pattern = getattr(config, "alpha_pattern", None) or {}
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), key), config.lora_alpha)
    return float(alpha / math.sqrt(r) if getattr(config, "use_rslora", False) else alpha / r)

