"""Schedule p(step), gate grouping and the gate sampler: pure Python/torch, no model."""

from __future__ import annotations

import math
import random

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
