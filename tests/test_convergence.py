"""Convergence, Liger-style: a patched model with ``schedule="off"`` trains like vanilla PEFT LoRA, step by step.

The same tiny Llama (``helpers.tiny_peft_model``: same init, nonzero B, weights at std 0.2 so that the logits
and the loss respond to the adapters), the same batches of a learnable task (counting: token t+1 = token t + 1)
and AdamW; the loss of every one of ``STEPS`` steps is compared, so a difference in the forward, a gradient or
the optimizer's view of the parameters shows up where it starts, not only in the final loss. LoRA dropout is 0:
PEFT draws its mask from torch's generator and the kernels from their own counter-based hash, so with dropout
the runs would differ by design.
"""

from __future__ import annotations

import copy
import functools
from contextlib import nullcontext

import pytest
import torch
from helpers import tiny_peft_model

import coto_kernels

STEPS = 20
LR = 1e-2
VOCAB_LOW, VOCAB_SIZE = 3, 94  # tokens 3..96 of the tiny models' 97

# Relative difference |loss - vanilla loss| / vanilla loss allowed at every step, by how the run computes.
# Measured (CPU, torch 2.13): fp32 2.1e-7, bf16-autocast 3.5e-3, bf16-weights 4.0e-3 at worst over the 20 steps.
# - fp32: the same math summed in another order (fused addmm vs separate GEMMs): ~1e-7, which AdamW's normalised
#   updates carry forward without growth here; 1e-5 leaves 50x margin.
# - bf16 (autocast with fp32 master weights, or bf16 weights and AdamW state): the patched layer rounds
#   S = x A^T and the sum of the base and LoRA terms once each in bf16 where PEFT rounds three GEMM outputs and a
#   sum, so the losses differ by a few bf16 ulps of the logits (2^-7 = 7.8e-3 relative, partly averaging out in
#   the mean), and training carries that along.
# A forgotten or doubled LoRA scaling moves the loss by 9e-2 to 2e-1 within the run, more than 3x the bf16
# tolerance (``test_a_wrong_scaling_fails_the_comparison``).
LOSS_TOLERANCE = {"fp32": 1e-5, "bf16-autocast": 1.5e-2, "bf16-weights": 1.5e-2}


def counting_batch(step: int, batch: int = 8, seq: int = 16) -> dict[str, torch.Tensor]:
    """Rows that count up from a random start (mod the vocabulary); four distinct batches, cycled."""
    generator = torch.Generator().manual_seed(step % 4)
    start = torch.randint(0, VOCAB_SIZE, (batch, 1), generator=generator)
    ids = (start + torch.arange(seq)) % VOCAB_SIZE + VOCAB_LOW
    return {"input_ids": ids, "labels": ids.clone()}


def _train(model: torch.nn.Module, precision: str, controller=None) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-autocast" else nullcontext()
    losses = []
    for step in range(STEPS):
        with autocast:
            loss = model(**counting_batch(step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if controller is not None:
            controller.step()
        losses.append(loss.item())
    return losses


def _models(precision: str, scaling_factor: float = 1.0):
    vanilla = tiny_peft_model("llama", num_layers=2, r=8, init_std=0.2)
    if precision == "bf16-weights":
        vanilla = vanilla.to(torch.bfloat16)
    patched = copy.deepcopy(vanilla)
    controller = coto_kernels.patch(patched, schedule="off", seed=0, total_steps=STEPS, backend="torch")
    if scaling_factor != 1.0:
        for module in patched.modules():
            if hasattr(module, "scaling") and isinstance(module.scaling, dict):
                module.scaling = {name: s * scaling_factor for name, s in module.scaling.items()}
    return vanilla, patched, controller


@functools.cache
def _vanilla_losses(precision: str) -> tuple[float, ...]:
    """The vanilla PEFT run of ``precision`` (deterministic; shared by the tests)."""
    vanilla, _, _ = _models(precision)
    return tuple(_train(vanilla, precision))


def _relative_differences(losses: list[float], reference: list[float]) -> list[float]:
    return [abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True)]


@pytest.mark.parametrize("precision", list(LOSS_TOLERANCE))
def test_patched_model_trains_like_vanilla_peft(precision, one_thread):
    _, patched, controller = _models(precision)
    reference = _vanilla_losses(precision)
    losses = _train(patched, precision, controller)
    assert reference[-1] < 0.6 * reference[0], reference  # it learned: the curves compared are not flat
    differences = _relative_differences(losses, reference)
    worst = max(range(STEPS), key=differences.__getitem__)
    assert differences[worst] < LOSS_TOLERANCE[precision], (precision, worst, losses[worst], reference[worst])


# s = lora_alpha / r = 2 here, so a layer that forgot to multiply by s computes the LoRA term at half its size.
@pytest.mark.parametrize("scaling_factor", [0.5, 2.0], ids=["scaling-forgotten", "scaling-applied-twice"])
def test_a_wrong_scaling_fails_the_comparison(scaling_factor, one_thread):
    """The bf16 tolerance is tight enough to catch a LoRA term that is dropped or scaled twice."""
    _, patched, controller = _models("bf16-autocast", scaling_factor)
    reference = _vanilla_losses("bf16-autocast")
    losses = _train(patched, "bf16-autocast", controller)
    differences = _relative_differences(losses, reference)
    assert max(differences) > 3 * LOSS_TOLERANCE["bf16-autocast"]
