"""Schedule p(step), gate grouping and the gate sampler: pure Python/torch, no model."""

from __future__ import annotations

import math
import random
import re
import threading
import warnings

import pytest
import torch

from coto_kernels import activation_probability, block_prefix, draw_gates, group_names
from coto_kernels.controller import CoToController


def authors_rate(global_step: int, max_steps: int, p0: float = 0.1, p1: float = 1.0) -> float:
    """The authors' on_step_end formula, verbatim."""
    return min(p1, p0 + (p1 - p0) * global_step / math.ceil(max_steps * 0.75))


@pytest.mark.parametrize("total", [1, 7, 10, 100, 1001])
def test_linear_matches_authors_callback(total):
    for step in range(total + 1):
        assert activation_probability(step, total) == pytest.approx(authors_rate(step, total), abs=1e-12)


def test_linear_values_at_given_steps():
    assert activation_probability(0, None) == 0.1  # before any step: p0, total not needed
    assert activation_probability(0, 100) == 0.1
    assert activation_probability(30, 100) == pytest.approx(0.1 + 0.9 * 30 / 75)
    assert activation_probability(75, 100) == 1.0
    assert activation_probability(99, 100) == 1.0
    # ceil: 10 * 0.75 = 7.5 -> 8 ramp steps
    assert activation_probability(4, 10) == pytest.approx(0.1 + 0.9 * 4 / 8)
    assert activation_probability(5, 100, initial_p=0.0, final_p=0.5, stage1_ratio=0.5) == pytest.approx(0.05)


def test_sine_is_concave_and_exponential_convex_with_same_end_points():
    total = 100
    for step in (10, 30, 50, 70):
        lin = activation_probability(step, total)
        assert activation_probability(step, total, schedule="sine") > lin
        assert activation_probability(step, total, schedule="exponential") < lin
    for shape in ("sine", "exponential"):
        assert activation_probability(0, total, schedule=shape) == 0.1
        assert activation_probability(75, total, schedule=shape) == pytest.approx(1.0)
        assert activation_probability(90, total, schedule=shape) == pytest.approx(1.0)


def test_off_and_callable_schedules():
    assert activation_probability(0, None, schedule="off") == 1.0
    assert activation_probability(5, 10, schedule=lambda step, total: step / total) == 0.5
    with pytest.raises(ValueError, match="must lie in"):
        activation_probability(1, 10, schedule=lambda step, total: 1.5)
    with pytest.raises(ValueError, match="unknown CoTo schedule"):
        activation_probability(1, 10, schedule="cosine")
    with pytest.raises(ValueError, match="total_steps"):
        activation_probability(1, None)


def test_block_prefix_and_groups():
    names = [
        "base_model.model.model.layers.10.mlp.up_proj",
        "base_model.model.model.layers.7.self_attn.q_proj",
        "base_model.model.model.layers.7.mlp.up_proj",
        "base_model.model.model.layers.2.self_attn.v_proj",
        "base_model.model.lm_head",
        "encoder.block.2.layer.0.SelfAttention.q",
        "decoder.block.2.layer.1.EncDecAttention.q",
        "model.layers.3.block_sparse_moe.experts.5.w1",
    ]
    assert block_prefix(names[1]) == "base_model.model.model.layers.7"
    assert block_prefix("encoder.block.2.layer.0.SelfAttention.q") == "encoder.block.2"
    assert block_prefix("model.layers.3.block_sparse_moe.experts.5.w1") == "model.layers.3"
    assert block_prefix("base_model.model.lm_head") is None
    groups, index = group_names(names)
    assert groups == [
        "base_model.model.lm_head",
        "base_model.model.model.layers.2",
        "base_model.model.model.layers.7",
        "base_model.model.model.layers.10",  # numeric order, not string order
        "decoder.block.2",
        "encoder.block.2",
        "model.layers.3",
    ]
    assert index[1] == index[2] == 2  # q_proj and up_proj of block 7 share one gate
    assert groups[index[5]] != groups[index[6]]  # encoder and decoder blocks are separate groups
    # never rely on module order
    shuffled = names[:]
    random.Random(0).shuffle(shuffled)
    assert group_names(shuffled)[0] == groups
    per_module, index = group_names(names, "module")
    assert len(per_module) == len(names) and sorted(index) == list(range(len(names)))
    with pytest.raises(ValueError, match="granularity"):
        group_names(names, "block")


@pytest.mark.parametrize("granularity", ["layer", "module"])
def test_a_lora_layer_nested_in_another_shares_its_gate(granularity):
    """PEFT's MultiheadAttention adapts out_proj by a nested lora.Linear that only the outer layer drives."""
    names = ["base_model.model.lin0", "base_model.model.mha", "base_model.model.mha.base_layer.out_proj",
             "base_model.model.mhax"]  # a sibling whose name merely starts the same is not nested
    groups, index = group_names(names, granularity)
    assert groups == ["base_model.model.lin0", "base_model.model.mha", "base_model.model.mhax"]
    assert index == [0, 1, 1, 2]


def test_at_least_one_gate_and_p_extremes():
    for step in range(200):
        assert any(draw_gates(4, 0.05, seed=1, step=step))
    assert draw_gates(5, 1.0, seed=0, step=3) == [True] * 5
    counts = torch.zeros(4)
    for step in range(2000):
        gates = draw_gates(4, 0.0, seed=3, step=step)
        assert sum(gates) == 1  # p = 0: exactly one, uniformly
        counts += torch.tensor(gates, dtype=torch.float)
    assert torch.all((counts / 2000 - 0.25).abs() < 0.04), counts


@pytest.mark.parametrize("p", [0.3, 0.5, 0.8])
def test_empirical_active_fraction(p):
    n_groups, draws = 32, 1500
    on = sum(sum(draw_gates(n_groups, p, seed=7, step=s)) for s in range(draws)) / (n_groups * draws)
    # with 32 groups the at-least-one conditioning is negligible; 4 standard errors
    assert abs(on - p) < 4 * math.sqrt(p * (1 - p) / (n_groups * draws))


def test_conditioning_on_at_least_one_matches_rejection_sampling():
    # 2 groups at p = 0.5: P(both on | at least one) = 1/3
    both = sum(all(draw_gates(2, 0.5, seed=0, step=s)) for s in range(6000)) / 6000
    assert abs(both - 1 / 3) < 0.025


def test_sampler_is_deterministic_in_seed_and_step():
    assert draw_gates(16, 0.5, seed=11, step=4) == draw_gates(16, 0.5, seed=11, step=4)
    sequence = [tuple(draw_gates(16, 0.5, seed=11, step=s)) for s in range(20)]
    assert len(set(sequence)) > 15  # steps are decorrelated
    assert sequence != [tuple(draw_gates(16, 0.5, seed=12, step=s)) for s in range(20)]


class _Layer:
    coto_gate = True
    coto_override = None


def _controller(**kwargs) -> CoToController:
    layers = {f"model.layers.{i}.{proj}": _Layer() for i in range(6) for proj in ("q_proj", "v_proj")}
    return CoToController(layers, **kwargs)


def test_controller_gates_valid_at_creation_and_applied_to_layers():
    controller = _controller(seed=0, total_steps=40)
    assert controller.p == 0.1 and len(controller.gates) == 6 and any(controller.gates)
    for i, on in enumerate(controller.gates):
        members = controller._members[i]
        assert len(members) == 2 and all(m.coto_gate == on for m in members)


def test_controller_state_round_trip_continues_the_same_schedule():
    run = _controller(seed=5, total_steps=40)
    for _ in range(7):
        run.step()
    state = run.state_dict()
    expected = []
    for _ in range(10):
        run.step()
        expected.append((run.p, run.gates))
    resumed = _controller(seed=999, total_steps=1)
    resumed.load_state_dict(state)
    assert resumed.global_step == 7 and resumed.seed == 5 and resumed.total_steps == 40
    got = []
    for _ in range(10):
        resumed.step()
        got.append((resumed.p, resumed.gates))
    assert got == expected
    bad = dict(state, groups=state["groups"][:-1])
    with pytest.raises(ValueError, match="different adapter groups"):
        resumed.load_state_dict(bad)


def test_torch_manual_seed_fixes_an_unseeded_controller():
    torch.manual_seed(0)
    a = _controller(total_steps=10)
    torch.manual_seed(0)
    b = _controller(total_steps=10)
    assert a.seed == b.seed and a.gates == b.gates


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(initial_p=-0.1), "initial_p"),
        (dict(final_p=0.0), "final_p"),
        (dict(initial_p=0.9, final_p=0.5), "must not exceed"),
        (dict(stage1_ratio=0.0), "stage1_ratio"),
        (dict(schedule="cosine"), "unknown CoTo schedule"),
        (dict(total_steps=0), "total_steps"),
        (dict(total_steps=2.5), "total_steps"),
        (dict(granularity="block"), "granularity"),
    ],
)
def test_controller_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _controller(**kwargs)


def test_step_without_total_steps_is_a_clear_error():
    controller = _controller(seed=0)
    with pytest.raises(ValueError, match="total_steps"):
        controller.step()


def test_override_forces_groups_and_releases():
    controller = _controller(seed=0)
    with controller.override({"model.layers.0": False}):
        assert controller._members[0][0].coto_override is False
        assert controller._members[1][0].coto_override is True
    assert controller._members[0][0].coto_override is None
    with pytest.raises(KeyError, match="unknown CoTo groups"):
        controller.set_override({"nope": False})
    with pytest.raises(ValueError, match="one per group"):
        controller.set_override([True])


# -- failures that used to be silent (issue 11) -----------------------------------------------------------------


def _finishes(fn, timeout_s: float = 10.0) -> BaseException | None:
    """Run ``fn`` in a thread; fail the test if it does not return (a hang must not block CI). Returns its error."""
    outcome: list = []

    def run() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            outcome.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"did not return within {timeout_s} s"
    return outcome[0]


@pytest.mark.parametrize("p", [math.nan, math.inf, -0.1, 1.5])
def test_draw_gates_rejects_p_outside_0_1_instead_of_looping(p):
    error = _finishes(lambda: draw_gates(4, p, 0, 1))
    assert isinstance(error, ValueError) and "p in [0, 1]" in str(error)


def _snapshot(controller: CoToController) -> tuple:
    return (controller.config, controller.global_step, controller.p, list(controller.gates),
            [m.coto_gate for members in controller._members for m in members])


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(initial_p=math.nan), ValueError, "initial_p must be finite"),
        (dict(initial_p=1.5), ValueError, "initial_p must lie in"),
        (dict(p=1.5), ValueError, r"p must lie in \[0, 1\]"),
        (dict(p=math.nan), ValueError, "p must be finite"),
        (dict(total_steps=True), ValueError, "total_steps must be an integer"),
        (dict(rng={"seed": 1.5}), ValueError, "seed must be an integer"),
        (dict(step=-1), ValueError, "step must be >= 0"),
        (dict(gates=[True]), ValueError, "gates must be 6 bools"),
        (dict(total_steps=None), ValueError, "total_steps"),  # step 7 of a ramp cannot be computed without it
        (dict(step=8), RuntimeError, "did not reproduce"),  # seed, step and gates do not belong together
    ],
)
def test_load_state_dict_checks_everything_before_applying_anything(change, error, match):
    saved = _controller(seed=5, total_steps=40)
    for _ in range(7):
        saved.step()
    state = {**saved.state_dict(), **change}
    target = _controller(seed=999, total_steps=10)
    target.step()
    before = _snapshot(target)
    raised = _finishes(lambda: target.load_state_dict(state))
    assert isinstance(raised, error) and re.search(match, str(raised)), raised
    assert _snapshot(target) == before  # all or nothing


def test_a_failed_step_does_not_advance_the_controller():
    controller = _controller(seed=0)  # no total_steps
    before = _snapshot(controller)
    with pytest.raises(ValueError, match="total_steps"):
        controller.step()
    assert _snapshot(controller) == before and controller.global_step == 0
    controller.total_steps = 10
    controller.step()
    assert controller.global_step == 1


def test_a_constant_schedule_steps_without_total_steps():
    controller = _controller(seed=0, initial_p=0.5, final_p=0.5)
    draws = []
    for _ in range(20):
        controller.step()
        draws.append(tuple(controller.gates))
    assert controller.global_step == 20 and controller.p == 0.5
    assert draws == [tuple(draw_gates(6, 0.5, 0, step)) for step in range(1, 21)] and len(set(draws)) > 5


def test_override_context_restores_the_previous_override():
    controller = _controller(seed=0)
    controller.set_override({"model.layers.2": False})
    user = controller.overrides()
    assert user["model.layers.2.q_proj"] is False and user["model.layers.0.q_proj"] is True
    with controller.override({"model.layers.0": False}):
        with controller.override([True] * 6):
            assert set(controller.overrides().values()) == {True}
        assert controller.overrides()["model.layers.0.v_proj"] is False
        assert controller.overrides()["model.layers.2.v_proj"] is True  # a mapping forces the others on
    assert controller.overrides() == user  # the user's set_override survives, not None
    controller.set_override(None)
    with controller.override({"model.layers.1": False}):
        pass
    assert set(controller.overrides().values()) == {None}


@pytest.mark.parametrize("whole_groups", [True, False])
def test_tools_pruned_restores_a_set_override(whole_groups):
    from helpers import tiny_peft_model

    from coto_kernels import patch
    from coto_kernels.tools import pruned

    model = tiny_peft_model("llama", num_layers=3)
    controller = patch(model, seed=0)
    controller.set_override({controller.groups[2]: False})
    user = controller.overrides()
    off = [controller.groups[0]] if whole_groups else [controller.layer_names[0]]
    with pruned(model, off):
        assert controller.overrides()[controller.layer_names[0]] is False
    assert controller.overrides() == user


def test_add_layers_regroups_as_if_built_with_all_layers():
    names = [f"model.layers.{i}.{proj}" for i in range(6) for proj in ("q_proj", "v_proj")]
    all_layers = {name: _Layer() for name in names}
    late = {name: all_layers[name] for name in names if ".layers.3." in name or name.endswith("v_proj")}
    controller = CoToController({n: layer for n, layer in all_layers.items() if n not in late}, seed=4, total_steps=9)
    controller.step()
    controller.add_layers(late)
    fresh = CoToController(all_layers, seed=4, total_steps=9)
    fresh.step()
    assert controller.groups == fresh.groups and controller.gates == fresh.gates
    assert all(layer.coto_gate == controller.gates[int(name.split(".")[2])] for name, layer in late.items())
    with pytest.raises(ValueError, match="already gates"):
        controller.add_layers({names[0]: _Layer()})


def _adamw_over_two_steps(set_to_none: bool, attach: bool):
    """Block 0 trains at step 1, only block 1 at step 2; returns (warnings of step 2, did block 0 move at step 2)."""
    from helpers import batch_for, tiny_peft_model

    from coto_kernels import patch

    model = tiny_peft_model("llama", num_layers=2)
    controller = patch(model, seed=0, total_steps=10)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    if attach:
        controller.attach_optimizer(optimizer)
    block0 = {n: p for n, p in model.named_parameters() if ".layers.0." in n and "lora_" in n}
    for gates in ([True, False], [False, True]):
        controller.set_override(gates)
        before = {n: p.detach().clone() for n, p in block0.items()}
        model(**batch_for("llama")).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=set_to_none)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            controller.step()
    moved = any(not torch.equal(p, before[n]) for n, p in block0.items())
    return [str(w.message) for w in caught], moved


def test_stale_zero_grads_of_gated_off_adapters_warn_once_when_they_moved_them():
    caught, moved = _adamw_over_two_steps(set_to_none=False, attach=False)
    assert moved  # the hazard is real: AdamW moved block 0 although it was off
    assert len(caught) == 1 and "zero_grad(set_to_none=False)" in caught[0] and "attach_optimizer" in caught[0]
    for set_to_none, attach in ((True, False), (False, True)):
        caught, moved = _adamw_over_two_steps(set_to_none=set_to_none, attach=attach)
        assert not moved and caught == []
