"""CoToConfig: one declaration of the run's options, validated once, used by patch, the controller and the schedule."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from helpers import tiny_peft_model

import coto_kernels
from coto_kernels import CoToConfig, activation_probability
from coto_kernels.controller import CoToController


def test_every_option_is_documented_and_defaults_are_the_authors():
    for f in dataclasses.fields(CoToConfig):
        assert len(f.metadata.get("help", "")) > 20, f.name
    assert dataclasses.asdict(CoToConfig()) == dict(initial_p=0.1, final_p=1.0, stage1_ratio=0.75, schedule="linear",
                                                    granularity="layer", seed=None, total_steps=None)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(initial_p=math.nan), "initial_p must be finite"),
        (dict(initial_p=math.inf), "initial_p must be finite"),
        (dict(final_p=math.nan), "final_p must be finite"),
        (dict(stage1_ratio=-math.inf), "stage1_ratio must be finite"),
        (dict(initial_p=True), "initial_p must be a real number"),
        (dict(initial_p="0.1"), "initial_p must be a real number"),
        (dict(initial_p=1.5), r"initial_p must lie in \[0, 1\]"),
        (dict(final_p=0.0), r"final_p must lie in \(0, 1\]"),
        (dict(initial_p=0.9, final_p=0.5), "must not exceed"),
        (dict(stage1_ratio=1.01), "stage1_ratio"),
        (dict(total_steps=True), "total_steps must be an integer, got the bool"),
        (dict(total_steps=2.5), "total_steps must be an integer"),
        (dict(total_steps=10.0), "total_steps must be an integer"),
        (dict(total_steps="10"), "total_steps must be an integer"),
        (dict(total_steps=0), "total_steps must be a positive integer"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(seed=False), "seed must be an integer, got the bool"),
        (dict(schedule="cosine"), "unknown CoTo schedule"),
        (dict(granularity="block"), "granularity"),
    ],
)
def test_bad_values_name_the_option(options, match):
    with pytest.raises(ValueError, match=match):
        CoToConfig(**options)


def test_values_are_normalised_and_the_config_is_frozen():
    config = CoToConfig(initial_p=0, final_p=1, total_steps=np.int64(10), seed=np.int64(3))
    assert type(config.initial_p) is float and type(config.final_p) is float
    assert type(config.total_steps) is int and type(config.seed) is int
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.total_steps = 20
    # changes go through replace/build, which validate again
    assert CoToConfig.build(config, total_steps=20).total_steps == 20
    with pytest.raises(ValueError, match="total_steps"):
        CoToConfig.build(config, total_steps=-1)


def test_unknown_options_are_a_type_error_naming_them():
    with pytest.raises(TypeError, match=r"\['totl_steps'\]"):
        CoToConfig.build(totl_steps=10)
    model = tiny_peft_model("llama", num_layers=2)
    with pytest.raises(TypeError, match=r"\['intial_p'\]"):
        coto_kernels.patch(model, intial_p=0.2)
    assert "coto_controller" not in model.__dict__  # rejected before anything was patched
    with pytest.raises(TypeError, match="CoToConfig"):
        coto_kernels.patch(model, {"seed": 1})


def test_patch_keyword_api_and_config_give_the_same_run():
    by_keywords = coto_kernels.patch(tiny_peft_model("llama", num_layers=4), total_steps=10, seed=3, initial_p=0.2,
                                     schedule="sine")
    config = CoToConfig(total_steps=10, seed=3, initial_p=0.2, schedule="sine")
    by_config = coto_kernels.patch(tiny_peft_model("llama", num_layers=4), config)
    assert by_keywords.config == by_config.config == config
    for _ in range(5):
        by_keywords.step()
        by_config.step()
        assert (by_keywords.p, by_keywords.gates) == (by_config.p, by_config.gates)
    # keywords override the config's fields
    overridden = coto_kernels.patch(tiny_peft_model("llama", num_layers=4), config, seed=4)
    assert overridden.config == dataclasses.replace(config, seed=4)


def test_patch_resolves_the_seed_and_hands_the_controller_an_int():
    controller = coto_kernels.patch(tiny_peft_model("llama", num_layers=2))
    assert type(controller.seed) is int and controller.config.seed == controller.seed


def test_activation_probability_takes_a_config_or_keywords():
    config = CoToConfig(total_steps=100, initial_p=0.0, final_p=0.5, stage1_ratio=0.5)
    assert activation_probability(5, config=config) == pytest.approx(0.05)
    assert activation_probability(5, 100, initial_p=0.0, final_p=0.5, stage1_ratio=0.5) == pytest.approx(0.05)
    assert activation_probability(5, config=config, final_p=1.0) == pytest.approx(0.1)  # a keyword overrides


def test_a_constant_schedule_needs_no_total_steps():
    assert activation_probability(50, None, initial_p=0.5, final_p=0.5) == 0.5
    assert activation_probability(50, None, schedule="off") == 1.0
    with pytest.raises(ValueError, match="total_steps"):
        activation_probability(50, None, initial_p=0.5, final_p=0.6)


def test_controller_takes_a_config_or_keywords():
    layers = {f"model.layers.{i}.q_proj": type("L", (), {"coto_gate": True, "coto_override": None})()
              for i in range(3)}
    a = CoToController(layers, CoToConfig(seed=2, total_steps=8, granularity="module"))
    b = CoToController(layers, seed=2, total_steps=8, granularity="module")
    assert a.config == b.config and a.gates == b.gates
    assert (a.initial_p, a.final_p, a.stage1_ratio, a.schedule, a.granularity, a.seed, a.total_steps) == (
        0.1, 1.0, 0.75, "linear", "module", 2, 8)
    with pytest.raises(AttributeError, match="read-only"):
        a.initial_p = 0.5  # would otherwise shadow the config silently
    with pytest.raises(ValueError, match="total_steps"):
        a.total_steps = 0  # settable, and validated


def test_state_dict_keeps_the_0_1_0_keys():
    model = tiny_peft_model("llama", num_layers=2)
    state = coto_kernels.patch(model, seed=1, total_steps=5).state_dict()
    assert set(state) == {"step", "p", "gates", "groups", "total_steps", "initial_p", "final_p", "stage1_ratio",
                          "schedule", "granularity", "rng"}
    assert state["rng"] == {"seed": 1}
