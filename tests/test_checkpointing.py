"""Gradient checkpointing (reentrant and not) with CoTo: same gradients, and no backward below the lowest adapter."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import assert_trainable_grads_match, batch_for, tiny_peft_model

import coto_kernels
from bench import bench_checkpointing

pytestmark = pytest.mark.usefixtures("one_thread")


def blocks_of(model):
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, torch.nn.ModuleList):
            return module
        if name.endswith("transformer.h"):
            return module
    raise AssertionError("no blocks")


def enable_checkpointing(model, reentrant: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:  # what PEFT / Transformers do for reentrant checkpointing
            model.enable_input_require_grads()


def first_step_with_lowest_block_off(controller) -> int:
    for step in range(controller.total_steps):
        controller.set_step(step)
        if not controller.gates[0] and any(controller.gates[1:]):
            return step
    raise AssertionError("no such step")


@pytest.mark.parametrize(("arch", "order"), [
    ("llama", "checkpointing_then_patch"), ("llama", "patch_then_checkpointing"), ("gpt2", "checkpointing_then_patch"),
])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_checkpointed_coto_gradients_and_truncation(arch, order, reentrant):
    model = tiny_peft_model(arch, num_layers=4)
    plain = copy.deepcopy(model)
    if order == "checkpointing_then_patch":
        enable_checkpointing(model, reentrant)
    controller = coto_kernels.patch(model, total_steps=12, initial_p=0.3, seed=1)
    if order == "patch_then_checkpointing":
        enable_checkpointing(model, reentrant)
    plain_controller = coto_kernels.patch(plain, total_steps=12, initial_p=0.3, seed=1)
    model.train()
    plain.train()
    # which blocks re-run their forward (checkpoint recomputation) during backward
    phase = ["forward"]
    recomputed: set[int] = set()
    for i, block in enumerate(blocks_of(model)):
        inner = next(m for m in block.children() if any(True for _ in m.parameters()))
        inner.register_forward_pre_hook(lambda m, a, i=i: recomputed.add(i) if phase[0] == "backward" else None)
    for step in (first_step_with_lowest_block_off(controller), controller.total_steps - 1):
        controller.set_step(step)
        plain_controller.set_step(step)
        gates, lowest = controller.gates, controller.gates.index(True)
        batch = batch_for(arch, seed=step)
        phase[0] = "forward"
        recomputed.clear()
        loss = model(**batch).loss
        phase[0] = "backward"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reentrant checkpoint warns for blocks with no grad-requiring input
            loss.backward()
        plain(**batch).loss.backward()
        # truncation: exactly the blocks from the lowest active one up are recomputed in backward
        assert recomputed == set(range(lowest, len(gates))), (gates, recomputed)
        assert_trainable_grads_match(model, plain, rtol=1e-5, atol=1e-7)
        model.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)


def test_forced_input_grads_would_recompute_every_block():
    """The contrast: with an input-grad hook at the embeddings (vanilla PEFT) every block re-runs in backward."""
    model = tiny_peft_model("llama", num_layers=4)
    controller = coto_kernels.patch(model, seed=0)
    enable_checkpointing(model, reentrant=True)
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    controller.set_override([False, False, True, False])
    recomputed = set()
    phase = ["forward"]
    for i, block in enumerate(blocks_of(model)):
        block.self_attn.register_forward_pre_hook(
            lambda m, a, i=i: recomputed.add(i) if phase[0] == "backward" else None)
    loss = model(**batch_for("llama")).loss
    phase[0] = "backward"
    loss.backward()
    assert recomputed == {0, 1, 2, 3}


def test_benchmark_runs_and_shows_the_truncation():
    rows = bench_checkpointing.checkpointing_benchmark("tiny")
    by_key = {(r.checkpointing, r.gates, r.input_grads): r for r in rows}
    assert len(rows) == 16
    for mode in bench_checkpointing.CHECKPOINTING:
        assert by_key[(mode, "all on", "coto")].blocks_in_backward == 4
        assert by_key[(mode, "top half", "coto")].blocks_in_backward == 2
        assert by_key[(mode, "top block", "coto")].blocks_in_backward == 1
        assert by_key[(mode, "bottom block", "coto")].blocks_in_backward == 4
    assert by_key[("reentrant", "top block", "forced")].blocks_in_backward == 4
    assert "| reentrant | top block | forced |" in bench_checkpointing.to_markdown(rows, "cpu")
