"""Sibling layers (q/k/v, gate/up) computed as one group: ``lora_linear_group`` against float64, and ``patch``'s
grouping (learnt from the forward) against PEFT, including the cases where a held output must not be used."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from helpers import assert_trainable_grads_match, batch_for, tiny_peft_model
from reference import DORA_GRAD_NAMES, assert_matches, gated_lora, peft_dora

import coto_kernels
import coto_kernels.functional as functional
import coto_kernels.functional_dora as functional_dora
from coto_kernels.functional import can_group, lora_linear, lora_linear_group
from coto_kernels.functional_dora import dora_linear, dora_linear_group
from coto_kernels.kernels import backend_available
from coto_kernels.kernels.lora_group import GroupMember
from coto_kernels.siblings import SiblingInputs

BACKENDS = ["torch"] + (["native"] if backend_available("native") else [])
_GRAD_NAMES = dict(bias="d_bias", lora_a="d_lora_a", lora_b="d_lora_b", lora_bias="d_lora_bias")


def _members(k: int, shapes: list[tuple[int, int]], dtype: torch.dtype, seed: int = 0) -> list[dict]:
    """One dict of operands per (n, r): a bias and a lora_bias on every other member, distinct scalings."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, grad=True):
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.25).to(dtype).requires_grad_(grad)

    return [
        dict(weight=rand(n, k, grad=False), bias=rand(n) if i % 2 == 0 else None, lora_a=rand(r, k),
             lora_b=rand(n, r), lora_bias=rand(n) if i % 2 == 1 else None, scaling=0.5 + i)
        for i, (n, r) in enumerate(shapes)
    ]


def _group_member(t: dict) -> GroupMember:
    return GroupMember(t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["lora_bias"], t["scaling"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,shapes", [(37, 45, [(29, 3), (17, 5), (40, 1)]), (64, 33, [(70, 16), (33, 8)])])
def test_group_matches_float64_forward_and_every_gradient(backend, dtype, m, k, shapes):
    members = _members(k, shapes, dtype)
    x = (torch.randn(m, k) / k**0.25).to(dtype).requires_grad_()
    ys = lora_linear_group(x, [_group_member(t) for t in members], backend=backend)
    dys = [torch.randn(m, n).to(dtype) for n, _ in shapes]
    torch.autograd.backward(ys, dys)
    dx_ref = torch.zeros(m, k, dtype=torch.float64)
    for y, dy, t in zip(ys, dys, members, strict=True):
        operands = {name: t[name] for name in ("weight", "bias", "lora_a", "lora_b", "lora_bias")}
        ref = gated_lora(x, **operands, scaling=t["scaling"], dy=dy)
        assert y.dtype == dtype
        assert_matches(y, ref["y"], dtype, "y")
        dx_ref += ref["dx"]
        for name, grad_name in _GRAD_NAMES.items():
            if t[name] is not None:
                assert t[name].grad is not None and t[name].grad.dtype == dtype, name
                assert_matches(t[name].grad, ref[grad_name], dtype, name)
    assert_matches(x.grad, dx_ref, dtype, "dx")


needs_native = pytest.mark.skipif(not backend_available("native"), reason="native backend not built")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_group_with_dropout_matches_float64_with_each_members_mask(dtype, p):
    from coto_kernels.kernels.lora_native import dropout_keep_mask

    m, k, shapes, seeds = 70, 37, [(29, 3), (17, 5), (40, 16)], [11, -5, 2**40 + 3]
    members = _members(k, shapes, dtype, seed=2)
    x = (torch.randn(m, k) / k**0.25).to(dtype).requires_grad_()
    ys = lora_linear_group(x, [_group_member(t) for t in members], dropout_p=p, seeds=seeds, backend="native")
    dys = [torch.randn(m, n).to(dtype) for n, _ in shapes]
    torch.autograd.backward(ys, dys)
    dx_ref = torch.zeros(m, k, dtype=torch.float64)
    for y, dy, t, seed in zip(ys, dys, members, seeds, strict=True):
        operands = {name: t[name] for name in ("weight", "bias", "lora_a", "lora_b", "lora_bias")}
        keep = dropout_keep_mask(seed, (m, k), p, "cpu")
        ref = gated_lora(x, **operands, scaling=t["scaling"], keep=keep, dropout_p=p, dy=dy)
        assert_matches(y, ref["y"], dtype, "y")
        dx_ref += ref["dx"]
        for name, grad_name in _GRAD_NAMES.items():
            if t[name] is not None:
                assert_matches(t[name].grad, ref[grad_name], dtype, name)
    assert_matches(x.grad, dx_ref, dtype, "dx")


@needs_native
def test_group_dropout_ops_refuse_bad_ranks_and_seeds():
    from coto_kernels.kernels import lora_native

    x, a = torch.randn(4, 6), torch.randn(5, 6)
    with pytest.raises(RuntimeError, match="one entry per member"):
        lora_native.lora_down_group(x, a, [2, 3], [1], 0.1)
    with pytest.raises(RuntimeError, match="do not add up"):
        lora_native.lora_down_group(x, a, [2, 2], [1, 2], 0.1)
    with pytest.raises(RuntimeError, match="positive"):
        lora_native.lora_dx_da_group(None, x, torch.randn(4, 5), a, [5, 0], [1, 2], 0.1, True)
    with pytest.raises(RuntimeError, match="dropout_p"):
        lora_native.lora_down_group(x, a, [5], [1], 1.0)


@needs_native
def test_group_dropout_ops_pass_opcheck():
    from coto_kernels.kernels import lora_native  # noqa: F401  (registers the fake kernels)

    ops = torch.ops.coto_kernels_native
    x, a, ds = torch.randn(9, 12), torch.randn(7, 12), torch.randn(9, 7)
    torch.library.opcheck(ops.lora_down_group, (x, a, [3, 4], [5, 6], 0.25))
    torch.library.opcheck(ops.lora_dx_da_group, (torch.randn(9, 12), x, ds, a, [3, 4], [5, 6], 0.25, True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_equals_the_separate_calls(backend):
    members = _members(24, [(16, 4), (16, 4), (40, 2)], torch.float32, seed=3)
    x = torch.randn(2, 11, 24, requires_grad=True)
    ys = lora_linear_group(x, [_group_member(t) for t in members], backend=backend)
    loss = sum((y * torch.linspace(-1, 1, y.shape[-1])).sum() for y in ys)
    grads = torch.autograd.grad(loss, [x] + [t["lora_a"] for t in members] + [t["lora_b"] for t in members])
    x2 = x.detach().clone().requires_grad_()
    separate = [lora_linear(x2, t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["lora_bias"],
                            scaling=t["scaling"], backend=backend) for t in members]
    loss2 = sum((y * torch.linspace(-1, 1, y.shape[-1])).sum() for y in separate)
    grads2 = torch.autograd.grad(loss2, [x2] + [t["lora_a"] for t in members] + [t["lora_b"] for t in members])
    for y, y2 in zip(ys, separate, strict=True):
        assert y.shape == y2.shape
        torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-6)
    for g, g2 in zip(grads, grads2, strict=True):
        torch.testing.assert_close(g, g2, rtol=1e-5, atol=1e-5)


def test_group_takes_conv1d_members_in_their_own_layout():
    members = _members(21, [(13, 4), (9, 2)], torch.float32, seed=4)
    members[1]["weight"] = members[1]["weight"].t().contiguous()  # GPT-2 Conv1D stores W as [in, out]
    group = [_group_member(members[0]), _group_member(members[1])._replace(weight_is_kn=True)]
    x = torch.randn(6, 21, requires_grad=True)
    ys = lora_linear_group(x, group, backend="torch")
    dys = [torch.randn(6, 13), torch.randn(6, 9)]
    torch.autograd.backward(ys, dys)
    dx_ref = torch.zeros(6, 21, dtype=torch.float64)
    for y, dy, t, kn in zip(ys, dys, members, (False, True), strict=True):
        operands = {name: t[name] for name in ("weight", "bias", "lora_a", "lora_b", "lora_bias")}
        ref = gated_lora(x, **operands, scaling=t["scaling"], weight_is_kn=kn, dy=dy)
        assert_matches(y, ref["y"], torch.float32, "y")
        assert_matches(t["lora_a"].grad, ref["d_lora_a"], torch.float32, "lora_a")
        dx_ref += ref["dx"]
    assert_matches(x.grad, dx_ref, torch.float32, "dx")


def test_an_unused_output_gives_its_member_no_gradient():
    members = _members(20, [(12, 3), (12, 3), (12, 3)], torch.float32)
    x = torch.randn(9, 20, requires_grad=True)
    ys = lora_linear_group(x, [_group_member(t) for t in members], backend="torch")
    (ys[0].sum() + ys[2].square().sum()).backward()
    assert members[1]["lora_a"].grad is None and members[1]["lora_b"].grad is None
    x_ref = x.detach().clone().requires_grad_()
    ref = [lora_linear(x_ref, t["weight"], t["bias"], t["lora_a"].detach(), t["lora_b"].detach(), t["lora_bias"],
                       scaling=t["scaling"], backend="torch") for t in members]
    (ref[0].sum() + ref[2].square().sum()).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert members[0]["lora_a"].grad is not None and members[2]["lora_b"].grad is not None


def test_group_under_autocast_matches_separate_calls():
    members = _members(32, [(16, 4), (24, 4)], torch.float32, seed=1)
    x = torch.randn(10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ys = lora_linear_group(x, [_group_member(t) for t in members], backend="torch")
        separate = [lora_linear(x, t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["lora_bias"],
                                scaling=t["scaling"], backend="torch") for t in members]
    for y, y2 in zip(ys, separate, strict=True):
        assert y.dtype == y2.dtype == torch.bfloat16
        torch.testing.assert_close(y, y2, rtol=2e-2, atol=2e-2)


def test_bad_groups_are_refused_with_a_reason():
    members = [_group_member(t) for t in _members(8, [(4, 2), (4, 2)], torch.float32)]
    x = torch.randn(3, 8)
    assert can_group(x, members, "torch") and not can_group(x, members[:1], "torch")
    assert not can_group(x.double(), members, "torch")
    with pytest.raises(ValueError, match="x's dtype"):
        lora_linear_group(x.double(), members, backend="torch")
    with pytest.raises(ValueError, match="shape mismatch"):
        lora_linear_group(torch.randn(3, 9), [m._replace(weight=torch.randn(4, 9)) for m in members],
                          backend="torch")


# -- SiblingInputs: runs of calls on one tensor, outputs held for it only -----------------------------------------


def test_runs_of_calls_on_one_tensor_become_groups():
    siblings = SiblingInputs()
    q, k, v, o = (torch.nn.Linear(1, 1) for _ in range(4))
    x, h = torch.randn(3), torch.randn(3)
    for layer in (q, k, v):
        assert siblings.observe(layer, x)
    siblings.observe(o, h)
    assert siblings.group_led_by(q) is None  # learnt, in effect from the next forward on
    siblings(None, ())
    assert siblings.group_led_by(q) == (q, k, v) and siblings.group_led_by(o) is None
    siblings.observe(q, x)
    siblings.observe(v, x)
    siblings(None, ())  # a forward's last run is learnt when the next forward begins
    assert siblings.group_led_by(q) == (q, v)  # learnt again from what the last forward did
    siblings.observe(q, x)
    x.add_(1.0)
    siblings.observe(k, x)
    siblings(None, ())
    assert siblings.group_led_by(q) is None  # x changed in place between the calls: not the same input
    assert not siblings.observe(q, _inference_tensor())  # no version counter: never grouped


def _inference_tensor() -> torch.Tensor:
    with torch.inference_mode():
        return torch.randn(3)


def test_a_held_output_is_handed_over_once_and_only_for_its_tensor_and_version():
    siblings = SiblingInputs()
    q, k = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    x, y = torch.randn(3), torch.ones(1)
    siblings.observe(q, x)
    siblings.hold(k, x, y)
    assert siblings.take(k, x) is y
    assert siblings.take(k, x) is None  # once
    siblings.hold(k, x, y)
    assert siblings.take(k, x.clone()) is None  # another tensor (equal values do not count)
    siblings.hold(k, x, y)
    x.add_(1.0)
    assert siblings.take(k, x) is None  # changed in place since
    siblings.observe(q, x)
    siblings.hold(k, x, y)
    siblings.observe(q, torch.randn(3))  # a call on another tensor drops what was held
    siblings.observe(k, x)
    assert siblings.take(k, x) is None


# -- patch: groups learnt from the forward ------------------------------------------------------------------------


def _count_group_calls(monkeypatch, function: type = functional.GatedLoRAGroupFunction) -> list[int]:
    """A counter of ``function.apply`` calls (the group Functions: one call computes a whole group)."""
    calls = [0]
    apply = function.apply

    def counting(*args):
        calls[0] += 1
        return apply(*args)

    monkeypatch.setattr(function, "apply", counting)
    return calls


def _patched(model, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        controller = coto_kernels.patch(model, seed=0, schedule="off", **options)
    return controller


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_llama_groups_qkv_and_gate_up_and_matches_peft(backend, dora, monkeypatch):
    ref = tiny_peft_model("llama", num_layers=2, use_dora=dora)
    ours = copy.deepcopy(ref)
    _patched(ours, backend=backend)
    batch = batch_for("llama", batch=2, seq=5)
    with torch.no_grad():
        ours(**batch)  # the first forward learns the groups
    calls = _count_group_calls(
        monkeypatch, functional_dora.GatedDoRAGroupFunction if dora else functional.GatedLoRAGroupFunction)
    for _ in range(2):  # grouped forwards and backwards agree with PEFT's separate layers
        ref.zero_grad(set_to_none=True)
        ours.zero_grad(set_to_none=True)
        ref_loss, loss = ref(**batch).loss, ours(**batch).loss
        ref_loss.backward()
        loss.backward()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        assert_trainable_grads_match(ours, ref)
    assert calls[0] == 2 * 2 * 2  # 2 steps x 2 blocks x (q/k/v, gate/up)
    if dora:
        assert any("lora_magnitude_vector" in name and p.grad is not None for name, p in ours.named_parameters())
    siblings = ours.__dict__["coto_siblings"]
    block = ours.base_model.model.model.layers[0]
    attention, mlp = block.self_attn, block.mlp
    assert siblings.group_led_by(attention.q_proj) == (attention.q_proj, attention.k_proj, attention.v_proj)
    assert siblings.group_led_by(mlp.gate_proj) == (mlp.gate_proj, mlp.up_proj)
    assert siblings.group_led_by(attention.o_proj) is None and siblings.group_led_by(attention.k_proj) is None


def test_no_grouping_when_turned_off_or_with_dropout_off_the_native_backend(monkeypatch):
    batch = batch_for("llama", batch=2, seq=5)
    calls = _count_group_calls(monkeypatch)
    for model, options in ((tiny_peft_model("llama", num_layers=1), dict(fuse_siblings=False)),
                           (tiny_peft_model("llama", num_layers=1, dropout=0.1), {})):
        _patched(model, backend="torch", **options)
        for _ in range(2):
            model(**batch).loss.backward()
    assert calls[0] == 0


class _Block(torch.nn.Module):
    """Three projections; ``forward`` can feed k another tensor, change x in place, or skip v."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(12, 12) for _ in range(3))
        self.mode = "same"

    def forward(self, x):
        x = x * 1.0  # a fresh tensor each forward, as a norm layer's output is
        q = self.q_proj(x)
        if self.mode == "in_place":
            x.add_(0.5)  # k and v must see the changed x
        k = self.k_proj(x + 1.0 if self.mode == "other_input" else x)
        if self.mode == "skip_v":
            return q * k
        return q * k + self.v_proj(x)


def _peft_block():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_Block(), LoraConfig(r=3, target_modules=["q_proj", "k_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.3)
    return model


@pytest.mark.parametrize("mode", ["other_input", "in_place", "skip_v"])
def test_a_held_output_is_used_only_for_its_own_input(mode, monkeypatch):
    ref = _peft_block()
    ours = copy.deepcopy(ref)
    _patched(ours, backend="torch")
    x = torch.randn(5, 12)
    ours(x)  # learns (q, k, v)
    calls = _count_group_calls(monkeypatch)
    for model in (ref, ours):
        model.base_model.model.mode = mode
    if mode == "in_place":  # autograd refuses a backward through a saved input changed in place: outputs only
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x))
        assert calls[0] == 1
        return
    ref(x).square().sum().backward()
    ours(x).square().sum().backward()
    assert calls[0] == 1  # the leader computed the group; the members had to find their own way
    assert_trainable_grads_match(ours, ref, rtol=1e-5)  # skip_v: v's adapter gets no gradient, as in PEFT


def test_a_member_with_a_forward_pre_hook_is_not_computed_ahead_of_it(monkeypatch):
    ref = _peft_block()
    ours = copy.deepcopy(ref)
    _patched(ours, backend="torch")

    def double_lora_b(module, args):  # changes the layer's weights just before its own call
        module.lora_B["default"].weight.data.mul_(2.0)

    for model in (ref, ours):
        model.base_model.model.k_proj.register_forward_pre_hook(double_lora_b)
    x = torch.randn(5, 12)
    ours(x)
    ref(x)
    calls = _count_group_calls(monkeypatch)
    torch.testing.assert_close(ours(x), ref(x))
    assert calls[0] == 0


def test_a_member_switched_off_leaves_the_group_and_rejoins(monkeypatch):
    ref = _peft_block()
    ours = copy.deepcopy(ref)
    _patched(ours, backend="torch")
    x = torch.randn(5, 12)
    ours(x)
    calls = _count_group_calls(monkeypatch)
    k_proj = ours.base_model.model.k_proj
    k_proj.coto_override = False
    torch.testing.assert_close(ours(x), ref.base_model.model.q_proj(x * 1.0) * k_proj.base_layer(x)
                               + ref.base_model.model.v_proj(x * 1.0))
    assert calls[0] == 0  # a member could not join: nothing computed as a group
    k_proj.coto_override = None
    ours(x)  # learns (q, v) without k, then (q, k, v) again
    torch.testing.assert_close(ours(x), ref(x))
    assert calls[0] == 2


def test_patched_models_with_groups_deepcopy_pickle_and_unpatch():
    model = tiny_peft_model("llama", num_layers=1)
    _patched(model, backend="torch")
    batch = batch_for("llama", batch=1, seq=4)
    expected = model(**batch).loss
    model(**batch)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(**batch).loss, expected)
    torch.testing.assert_close(pickle.loads(pickle.dumps(clone))(**batch).loss, expected)
    coto_kernels.unpatch(model)
    assert "coto_siblings" not in model.__dict__
    assert not any("coto_siblings" in m.__dict__ for m in model.modules())


def test_inference_mode_runs_ungrouped(monkeypatch):
    model = tiny_peft_model("llama", num_layers=1)
    _patched(model, backend="torch")
    batch = batch_for("llama", batch=1, seq=4)
    expected = model(**batch).loss
    calls = _count_group_calls(monkeypatch)
    with torch.inference_mode():
        for _ in range(2):
            torch.testing.assert_close(model(**batch).loss, expected)
    assert calls[0] == 0


@needs_native
def test_patched_llama_with_dropout_groups_and_equals_the_ungrouped_model(monkeypatch):
    grouped = tiny_peft_model("llama", num_layers=2, dropout=0.2)
    separate = copy.deepcopy(grouped)
    _patched(grouped, backend="native")
    _patched(separate, backend="native", fuse_siblings=False)
    batch = batch_for("llama", batch=2, seq=5)
    grouped(**batch)
    calls = _count_group_calls(monkeypatch)
    for _ in range(2):  # the same seeds in the same order: the same masks, grouped or not
        losses = []
        for model in (grouped, separate):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(7)
            losses.append(model(**batch).loss)
            losses[-1].backward()
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
        assert_trainable_grads_match(grouped, separate)
    assert calls[0] == 2 * 2 * 2


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_grouping_under_activation_checkpointing_matches_peft(use_reentrant, dora, monkeypatch):
    ref = tiny_peft_model("llama", num_layers=2, use_dora=dora)
    ours = copy.deepcopy(ref)
    for model in (ref, ours):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=use_reentrant))
        model.train()
    _patched(ours, backend="torch")
    calls = _count_group_calls(
        monkeypatch, functional_dora.GatedDoRAGroupFunction if dora else functional.GatedLoRAGroupFunction)
    batch = batch_for("llama", batch=2, seq=5)
    for _ in range(3):  # the first step learns the groups; its recomputation must still run ungrouped
        ref.zero_grad(set_to_none=True)
        ours.zero_grad(set_to_none=True)
        ref(**batch).loss.backward()
        ours(**batch).loss.backward()
        assert_trainable_grads_match(ours, ref)
    assert calls[0] == 2 * 2 * 2 * 2  # steps 2 and 3, forward and recomputation, 2 blocks x 2 groups


# -- DoRA groups ---------------------------------------------------------------------------------------------------


def _dora_members(k: int, shapes: list[tuple[int, int]], dtype: torch.dtype, seed: int = 5) -> list[dict]:
    """``_members`` plus an fp32 magnitude (as PEFT keeps it) each; member 0's has a zero (its dm is recomputed)."""
    members = _members(k, shapes, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for i, t in enumerate(members):
        magnitude = torch.rand(t["lora_b"].shape[0], generator=g) + 0.5
        if i == 0:
            magnitude[1] = 0.0
        t["magnitude"] = magnitude.requires_grad_()
    return members


def _dora_group(x, members, backend, kn=()):
    group = [_group_member(t)._replace(weight_is_kn=i in kn) for i, t in enumerate(members)]
    return dora_linear_group(x, group, [t["magnitude"] for t in members], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,shapes", [(37, 45, [(29, 3), (17, 5), (40, 1)]), (64, 33, [(70, 16), (33, 8)])])
def test_dora_group_matches_peft_dora_in_float64_forward_and_every_gradient(backend, dtype, m, k, shapes):
    members = _dora_members(k, shapes, dtype)
    for t in members[1::2]:  # Conv1D members: W stored [in, out]
        t["weight"] = t["weight"].detach().t().contiguous()
    kn = range(1, len(members), 2)
    x = (torch.randn(m, k) / k**0.25).to(dtype).requires_grad_()
    ys = _dora_group(x, members, backend, kn=kn)
    dys = [torch.randn(m, n).to(dtype) for n, _ in shapes]
    torch.autograd.backward(ys, dys)
    dx_ref = torch.zeros(m, k, dtype=torch.float64)
    for i, (y, dy, t) in enumerate(zip(ys, dys, members, strict=True)):
        operands = {name: t[name] for name in ("weight", "bias", "lora_a", "lora_b", "lora_bias", "magnitude")}
        ref = peft_dora(x, **operands, scaling=t["scaling"], weight_is_kn=i in kn, dy=dy)
        assert y.dtype == dtype
        assert_matches(y, ref["y"], dtype, "y")
        dx_ref += ref["dx"]
        for name, grad_name in DORA_GRAD_NAMES.items():
            if name != "x" and t[name] is not None:
                assert t[name].grad is not None and t[name].grad.dtype == t[name].dtype, name
                assert_matches(t[name].grad, ref[grad_name], dtype, name)
    assert_matches(x.grad, dx_ref, dtype, "dx")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dora_group_equals_the_separate_calls_and_an_unused_output_gets_no_gradient(backend):
    members = _dora_members(24, [(16, 4), (16, 4), (40, 2)], torch.float32, seed=8)
    members[2]["weight"].requires_grad_()  # an unfrozen base weight: dW = (c dY)^T X
    x = torch.randn(2, 11, 24, requires_grad=True)
    ys = _dora_group(x, members, backend)
    separate = [dora_linear(x, t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["lora_bias"], t["magnitude"],
                            scaling=t["scaling"], backend=backend) for t in members]
    params = [x] + [t[name] for t in members for name in ("lora_a", "lora_b", "magnitude")] + [members[2]["weight"]]
    for used in ([0, 1, 2], [0, 2]):
        grads = torch.autograd.grad(sum(ys[i].square().sum() for i in used), params, allow_unused=True,
                                    retain_graph=True)
        grads2 = torch.autograd.grad(sum(separate[i].square().sum() for i in used), params, allow_unused=True,
                                     retain_graph=True)
        for g, g2 in zip(grads, grads2, strict=True):
            assert (g is None) == (g2 is None)
            if g is not None:  # square loss: dA sums terms of either sign, a few ulps apart in another order
                torch.testing.assert_close(g, g2, rtol=1e-4, atol=1e-5)
    assert all(g is None for g in grads[4:7])  # member 1's lora_a, lora_b, magnitude: its output unused
    for y, y2 in zip(ys, separate, strict=True):
        assert y.shape == y2.shape
        torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-6)


def test_dora_group_under_autocast_matches_separate_calls_and_refuses_bad_input():
    members = _dora_members(32, [(16, 4), (24, 4)], torch.float32, seed=9)
    x = torch.randn(10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ys = _dora_group(x, members, "torch")
        separate = [dora_linear(x, t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["lora_bias"], t["magnitude"],
                                scaling=t["scaling"], backend="torch") for t in members]
    for y, y2 in zip(ys, separate, strict=True):
        assert y.dtype == y2.dtype == torch.bfloat16
        torch.testing.assert_close(y, y2, rtol=2e-2, atol=2e-2)
    group = [_group_member(t) for t in members]
    with pytest.raises(ValueError, match="one magnitude per member"):
        dora_linear_group(x, group, [members[0]["magnitude"]], backend="torch")
    with pytest.raises(ValueError, match="DoRA shape mismatch"):
        dora_linear_group(x, group, [members[1]["magnitude"], members[0]["magnitude"]], backend="torch")
    with pytest.raises(ValueError, match="x's dtype"):
        dora_linear_group(x.double(), group, [t["magnitude"] for t in members], backend="torch")


def test_dora_with_dropout_groups_in_eval_only(monkeypatch):
    """DoRA's dropout path has no group form: in training each layer runs alone; eval (no dropout) groups."""
    ref = tiny_peft_model("llama", num_layers=1, dropout=0.1, use_dora=True)
    ours = copy.deepcopy(ref)
    _patched(ours, backend="torch")
    batch = batch_for("llama", batch=2, seq=5)
    calls = _count_group_calls(monkeypatch, functional_dora.GatedDoRAGroupFunction)
    for _ in range(2):
        ours(**batch).loss.backward()
    assert calls[0] == 0
    ours.eval()
    ref.eval()
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(ours(**batch).logits, ref(**batch).logits, rtol=1e-5, atol=1e-5)
    assert calls[0] == 2 * 2  # groups learnt in training: both eval forwards x (q/k/v, gate/up)
