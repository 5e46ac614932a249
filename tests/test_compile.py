"""``torch.compile`` on a patched model: eager results, one graph for every gate pattern, no update when off."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import batch_for, tiny_model, tiny_peft_model
from peft import LoraConfig, get_peft_model
from torch._dynamo.backends.debugging import aot_eager

import coto_kernels
from coto_kernels.compile import gated_lora_linear
from coto_kernels.functional import lora_linear, lora_linear_group
from coto_kernels.functional_dora import dora_linear, dora_linear_group
from coto_kernels.kernels import backend_status
from coto_kernels.kernels.lora_group import GroupMember

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


class CountingBackend:
    """``aot_eager`` (AOTAutograd traces forward and backward, no codegen: fast on the CPU) counting compiles."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return aot_eager(gm, example_inputs)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def adapter_params(model, block: int | None = None):
    return {n: p for n, p in model.named_parameters()
            if "lora_" in n and (block is None or f".layers.{block}." in n)}


def test_twenty_steps_with_changing_gates_compile_once_and_skip_updates_when_off():
    model = tiny_peft_model("llama", num_layers=3, dropout=0.1)  # dropout: its seed must not be a guard either
    controller = coto_kernels.patch(model, total_steps=40, initial_p=0.2, seed=3)
    model.train()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5)
    controller.attach_optimizer(optimizer)
    patterns = set()
    for step in range(20):
        patterns.add(tuple(controller.gates))
        off = [i for i, on in enumerate(controller.gates) if not on]
        before = {n: p.detach().clone() for i in off for n, p in adapter_params(model, i).items()}
        compiled(**batch_for("llama", seed=step)).loss.backward()
        # the static graph gives gated-off adapters zero gradients, not None ...
        assert all(p.grad is not None and not p.grad.any() for i in off for p in adapter_params(model, i).values())
        optimizer.step()  # ... so the controller clears them first: no AdamW momentum / weight decay update
        assert all(torch.equal(p, before[n]) for i in off for n, p in adapter_params(model, i).items())
        optimizer.zero_grad(set_to_none=True)
        controller.step()
        if step == 0:
            first = backend.compiles
    assert len(patterns) >= 4
    assert backend.compiles == first >= 1  # no recompile for any of the gate patterns


def test_compiled_matches_eager_for_each_gate_pattern():
    model = tiny_peft_model("llama", num_layers=3)
    eager = copy.deepcopy(model)
    controller = coto_kernels.patch(model, seed=0)
    eager_controller = coto_kernels.patch(eager, seed=0)
    model.train()
    eager.train()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    batch = batch_for("llama")
    for gates in ([True, True, True], [False, True, False], [False, False, True], [True, False, False]):
        controller._apply(gates)  # as controller.step() would hand them over (no override: that is a guard)
        eager_controller._apply(gates)
        loss = compiled(**batch).loss
        loss.backward()
        controller.clear_inactive_grads()
        ref = eager(**batch).loss
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
        grads, ref_grads = adapter_params(model), adapter_params(eager)
        for name, p in grads.items():
            if ref_grads[name].grad is None:
                assert p.grad is None, name
            else:
                torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-5, atol=1e-6)
        model.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
    assert backend.compiles == 1
    # evaluation: every adapter on, whatever the gates (one more graph for eval mode, then none)
    model.eval()
    eager.eval()
    with torch.no_grad():
        for gates in ([True, False, True], [False, True, True]):
            controller._apply(gates)
            torch.testing.assert_close(compiled(**batch).logits, eager(**batch).logits, rtol=1e-5, atol=1e-6)
    assert backend.compiles == 2


def test_unfused_layers_select_by_the_gate_tensor():
    # LoRA on the embedding: a layer type the fused path does not cover, run through PEFT's forward, gated
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(tiny_model("llama", num_layers=2), config)
    for name, param in model.named_parameters():
        if "lora_B" in name or "lora_embedding_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        controller = coto_kernels.patch(model, seed=0)
    model.train()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    eager = copy.deepcopy(model)
    batch = batch_for("llama")
    assert len(controller.groups) == 3
    for gates in ([True, False, True], [False, True, False], [True, True, True]):
        controller._apply(gates)
        eager.coto_controller._apply(gates)
        torch.testing.assert_close(compiled(**batch).loss, eager(**batch).loss, rtol=1e-5, atol=1e-6)
    assert backend.compiles == 1


def test_gate_tensor_follows_the_python_gate():
    model = tiny_peft_model("llama", num_layers=2)
    controller = coto_kernels.patch(model, seed=0)
    layer = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    tensor = layer.coto_gate_tensor
    for gates in ([False, True], [True, False]):
        controller._apply(gates)
        assert layer.coto_gate is gates[0] and bool(tensor) is gates[0]
        assert layer.coto_gate_tensor is tensor  # updated in place: compiled graphs keep reading it
    coto_kernels.unpatch(model)
    assert "coto_gate_tensor" not in layer.__dict__


@pytest.mark.parametrize("gate", [True, False])
def test_custom_op_matches_lora_linear_and_passes_opcheck(gate):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(12, 16, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    a = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    y = gated_lora_linear(x, w, b, a, bb, None, gate=torch.tensor(gate), scaling=2.0)
    ref = coto_kernels.lora_linear(x, w, b, a, bb, None, scaling=2.0, gate=gate)
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a, bb), dy)
    if gate:
        want = torch.autograd.grad(ref, (x, a, bb), dy)
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r)
    else:
        torch.testing.assert_close(got[0], dy @ w)
        assert not got[1].any() and not got[2].any()
    args = (x.detach().reshape(-1, 16), w, b, a.detach(), bb.detach(), None, torch.tensor(gate), 2.0, 0.0, False,
            "torch")
    torch.library.opcheck(torch.ops.coto_kernels.gated_lora_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))


_NATIVE_MISSING = backend_status()["native"]
_BLAS_BACKENDS = ["torch", pytest.param("native", marks=pytest.mark.skipif(
    _NATIVE_MISSING is not None, reason=f"native backend not built: {_NATIVE_MISSING}"))]


def _functional_layer(kind: str, dropout_p: float, backend: str):
    """A loss over one functional layer call (or a group of two reading one x), and the leaves it depends on."""
    g = torch.Generator().manual_seed(7)

    def rand(*shape, grad=True):
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).requires_grad_(grad)

    x, weights = rand(2, 9, 24), [rand(12, 24, grad=False), rand(20, 24, grad=False)]
    biases, lora_as, lora_bs = [rand(12), rand(20)], [rand(4, 24), rand(3, 24)], [rand(12, 4), rand(20, 3)]
    magnitudes = [w.norm(dim=1).detach().requires_grad_() for w in weights]
    used = 2 if kind.endswith("group") else 1
    leaves = [x, *biases[:used], *lora_as[:used], *lora_bs[:used], *(magnitudes[:used] if "dora" in kind else [])]
    options = dict(scaling=1.5, dropout_p=dropout_p, seed=3, backend=backend)
    members = [GroupMember(w, b, a, bb, None, 1.5) for w, b, a, bb in zip(weights, biases, lora_as, lora_bs)]

    def loss():
        if kind == "lora":
            ys = [lora_linear(x, weights[0], biases[0], lora_as[0], lora_bs[0], **options)]
        elif kind == "dora":
            ys = [dora_linear(x, weights[0], biases[0], lora_as[0], lora_bs[0], None, magnitudes[0], **options)]
        elif kind == "lora_group":
            ys = lora_linear_group(x, members, dropout_p=dropout_p, seeds=(3, 4), backend=backend)
        else:
            ys = dora_linear_group(x, members, magnitudes, backend=backend)
        return sum(y.square().sum() for y in ys)

    return loss, leaves


@pytest.mark.parametrize("backend", _BLAS_BACKENDS)
@pytest.mark.parametrize("kind, dropout_p", [("lora", 0.0), ("lora", 0.1), ("dora", 0.0), ("dora", 0.1),
                                             ("lora_group", 0.0), ("dora_group", 0.0)])
def test_functional_layers_under_torch_compile_match_eager(kind, dropout_p, backend):
    """lora_linear, dora_linear and the group functions under Dynamo: eager's loss and gradients. Under torch 2.11
    every gradient came out zero (their forwards write Y in place: ``functional.traced_outputs``), and the torch
    backend's dropout mask did not trace (``out=`` into a view). LoRA's trace whole (``fullgraph``); DoRA's row
    norm (a cache, a data-dependent guard) breaks the graph, and the Function then runs eagerly."""
    loss, leaves = _functional_layer(kind, dropout_p, backend)
    want_loss = loss()
    want = torch.autograd.grad(want_loss, leaves)
    compiled = torch.compile(loss, fullgraph="dora" not in kind, backend="aot_eager")
    got_loss = compiled()
    got = torch.autograd.grad(got_loss, leaves)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want, strict=True):
        assert w.abs().max() > 0
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
