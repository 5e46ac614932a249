"""coto_kernels.tools: pruning, merging and Shapley values checked against hand-computed numbers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import batch_for, tiny_model, tiny_peft_model
from peft import LoraConfig, PeftModel, get_peft_model

import coto_kernels
from coto_kernels.tools import (
    LoraAdapter,
    adapter_players,
    adapter_shapley,
    adapter_value_fn,
    exact_shapley,
    export_pruned,
    interpolation_curve,
    lora_modules,
    magnitude_prune,
    merge_adapters,
    plot_shapley_heatmap,
    pruned,
    pruned_product,
    select_off,
    shapley_grid,
    shapley_values,
)

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCKS6 = [f"base_model.model.model.layers.{i}.self_attn.{p}" for i in range(6) for p in ("q_proj", "v_proj")]


def _out(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.double()


def _zero_b(model, off):
    """A copy of ``model`` whose adapters in ``off`` have B = 0 (the reference for pruning)."""
    clone = copy.deepcopy(model)
    modules = dict(clone.named_modules())
    with torch.no_grad():
        for name in off:
            modules[name].lora_B["default"].weight.zero_()
    return clone


def _random_lora(model, seed):
    """Give the model's LoRA factors new random values (a second "seed" on the same base)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _hand_model(arch, deltas, extra=None, num_layers=3):
    """The base model with ``W += delta`` applied by hand (float32), no PEFT involved."""
    base = tiny_model(arch, num_layers, 0)
    with torch.no_grad():
        for module, delta in deltas.items():
            layer = base.get_submodule(module.removeprefix("base_model.model."))
            layer.weight += delta.to(layer.weight.dtype)
        for key, value in (extra or {}).items():
            base.get_parameter(key.removeprefix("base_model.model.")).copy_(value)
    return base


# -- selections ----------------------------------------------------------------------------------------------------


def test_select_off_patterns():
    blocks = lambda off: sorted({int(m.split(".")[4]) for m in off})  # noqa: E731
    assert blocks(select_off(BLOCKS6, "every-other")) == [1, 3, 5]
    assert blocks(select_off(BLOCKS6, "every-other-even")) == [0, 2, 4]
    assert blocks(select_off(BLOCKS6, "low")) == [0, 1]
    assert blocks(select_off(BLOCKS6, "middle")) == [2, 3]
    assert blocks(select_off(BLOCKS6, "high")) == [4, 5]
    assert select_off(BLOCKS6, keep_projections=["q_proj"]) == [m for m in BLOCKS6 if m.endswith("v_proj")]
    assert select_off(BLOCKS6, groups=["base_model.model.model.layers.2"]) == BLOCKS6[4:6]
    both = select_off(BLOCKS6, "high", keep_projections=["v_proj"])
    assert len(both) == 4 + 4  # blocks 4, 5 entirely + q_proj of blocks 0..3
    with pytest.raises(ValueError):
        select_off(BLOCKS6, "top")
    with pytest.raises(KeyError):
        select_off(BLOCKS6, groups=["nonexistent"])


# -- structured pruning -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patched", [False, True])
@pytest.mark.parametrize("selection", [
    {"pattern": "every-other"}, {"pattern": "high"}, {"keep_projections": ["query", "value"]},
    {"groups": ["base_model.model.bert.encoder.layer.1.attention.self.key"]},
])
def test_pruned_eval_equals_zeroed_b(patched, selection):
    model = tiny_peft_model("bert", num_layers=3)
    batch = batch_for("bert", batch=3)
    off = select_off(model, **selection)
    assert off
    reference = _out(_zero_b(model, off), batch)
    full = _out(model, batch)
    if patched:
        coto_kernels.patch(model, total_steps=10, seed=0)
    with pruned(model, off) as resolved:
        assert resolved == off
        got = _out(model, batch)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-6)
    assert (got - full).abs().max() > 1e-6  # the selection really changes the function
    torch.testing.assert_close(_out(model, batch), full, rtol=0, atol=1e-6)  # restored on exit
    if patched:
        assert all(layer.coto_override is None for layer in lora_modules(model).values())


def test_pruned_forces_off_in_training_too():
    model = tiny_peft_model("llama", num_layers=3)
    controller = coto_kernels.patch(model, total_steps=10, seed=0)
    controller.set_step(10)  # p = 1: every gate on
    off = select_off(model, "low")
    batch = batch_for("llama")
    reference = _zero_b(model, off).train()
    model.train()
    with torch.no_grad(), pruned(model, off):
        got = model(input_ids=batch["input_ids"]).logits
    with torch.no_grad():
        want = reference(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_export_pruned_loads_in_vanilla_peft(arch, tmp_path):
    model = tiny_peft_model(arch, num_layers=3)
    batch = batch_for(arch, batch=2)
    off = select_off(model, "every-other")
    coto_kernels.patch(model, total_steps=10, seed=0)
    with pruned(model, off):
        want = _out(model, batch)
    adapter = export_pruned(model, off, tmp_path / "pruned")
    assert all(not adapter.B[m].any() for m in off)
    loaded = PeftModel.from_pretrained(tiny_model(arch, 3, 0), tmp_path / "pruned")
    assert not any(isinstance(m, coto_kernels.layers.CoToLayerMixin) for m in loaded.modules())
    assert set(lora_modules(loaded)) == set(lora_modules(model))  # exactly the adapted modules, no more
    torch.testing.assert_close(_out(loaded, batch), want, rtol=0, atol=1e-5)


def test_adapter_load_into_round_trip():
    source = tiny_peft_model("bert", num_layers=3)
    target = _random_lora(tiny_peft_model("bert", num_layers=3), 5)
    batch = batch_for("bert")
    LoraAdapter.from_model(source).load_into(target)
    torch.testing.assert_close(_out(target, batch), _out(source, batch), rtol=0, atol=0)


# -- magnitude pruning ----------------------------------------------------------------------------------------------


def test_magnitude_prune_exact_and_svd(tmp_path):
    model = _random_lora(tiny_peft_model("llama", num_layers=2), 3)
    adapter = LoraAdapter.from_model(model)
    sparsity = 0.6
    exact = magnitude_prune(adapter, sparsity, refactor="exact")
    svd = magnitude_prune(adapter, sparsity, refactor="svd")
    for m in adapter.modules:
        target = adapter.scaling[m] * pruned_product(adapter.B[m], adapter.A[m], sparsity)
        n, k = target.shape
        assert exact.rank(m) == min(n, k)
        zeros = int((target == 0).sum())
        assert zeros == round(sparsity * n * k)
        kept = target[target != 0].abs().min()
        dropped = (adapter.delta(m, torch.float64))[target == 0].abs().max()
        assert dropped <= kept  # the smallest magnitudes went
        torch.testing.assert_close(exact.delta(m, torch.float64), target, rtol=0, atol=1e-5)
        # rank-preserving: the Eckart-Young best rank-r approximation of the pruned product
        U, S, Vh = torch.linalg.svd(target)
        r = adapter.rank(m)
        assert svd.rank(m) == r
        torch.testing.assert_close(svd.delta(m, torch.float64), (U[:, :r] * S[:r]) @ Vh[:r], rtol=0, atol=1e-5)
    untouched = magnitude_prune(adapter, 0.0, refactor="svd")
    for m in adapter.modules:
        torch.testing.assert_close(untouched.delta(m), adapter.delta(m), rtol=0, atol=1e-5)
    # the exact adapter (rank 32 for q/o/up..., 16 for k/v: rank_pattern) loads in vanilla PEFT
    exact.save_pretrained(tmp_path / "mag")
    assert exact.peft_config().rank_pattern
    loaded = PeftModel.from_pretrained(tiny_model("llama", 2, 0), tmp_path / "mag")
    hand = _hand_model("llama", {m: exact.delta(m) for m in adapter.modules}, num_layers=2)
    batch = batch_for("llama")
    torch.testing.assert_close(_out(loaded, batch), _out(hand, batch), rtol=0, atol=2e-5)


# -- merging --------------------------------------------------------------------------------------------------------


def _two_seeds(arch="llama", **kwargs):
    a = _random_lora(tiny_peft_model(arch, num_layers=3, **kwargs), 11)
    b = _random_lora(tiny_peft_model(arch, num_layers=3, **kwargs), 12)
    return LoraAdapter.from_model(a), LoraAdapter.from_model(b)


def test_fusion_math_and_vanilla_peft_load(tmp_path):
    a, b = _two_seeds()
    w = (0.3, 0.7)
    fused = merge_adapters([a, b], w, "fusion")
    for m in a.modules:
        A = w[0] * a.A[m].double() + w[1] * b.A[m].double()
        B = w[0] * a.B[m].double() + w[1] * b.B[m].double()
        assert fused.rank(m) == a.rank(m) and fused.scaling[m] == a.scaling[m]
        torch.testing.assert_close(fused.delta(m, torch.float64), a.scaling[m] * B @ A, rtol=0, atol=1e-6)
    fused.save_pretrained(tmp_path / "fused")
    loaded = PeftModel.from_pretrained(tiny_model("llama", 3, 0), tmp_path / "fused")
    hand = _hand_model("llama", {m: fused.delta(m, torch.float64) for m in a.modules})
    batch = batch_for("llama")
    torch.testing.assert_close(_out(loaded, batch), _out(hand, batch), rtol=0, atol=2e-5)


@pytest.mark.parametrize("kwargs", [{}, {"use_rslora": True}])
def test_ensemble_is_exact_rank_sum(tmp_path, kwargs):
    a, b = _two_seeds(**kwargs)
    w = (0.25, 0.75)
    ens = merge_adapters([a, b], w, "ensemble")
    for m in a.modules:
        want = w[0] * a.delta(m, torch.float64) + w[1] * b.delta(m, torch.float64)
        assert ens.rank(m) == a.rank(m) + b.rank(m)
        torch.testing.assert_close(ens.delta(m, torch.float64), want, rtol=0, atol=1e-6)
    ens.save_pretrained(tmp_path / "ens")
    config = LoraConfig.from_pretrained(str(tmp_path / "ens"))
    assert config.r == 8 and not config.use_rslora
    assert math.isclose(config.lora_alpha / config.r, ens.scaling[a.modules[0]])
    loaded = PeftModel.from_pretrained(tiny_model("llama", 3, 0), tmp_path / "ens")
    hand = _hand_model("llama", {m: w[0] * a.delta(m, torch.float64) + w[1] * b.delta(m, torch.float64)
                                 for m in a.modules})
    batch = batch_for("llama")
    torch.testing.assert_close(_out(loaded, batch), _out(hand, batch), rtol=0, atol=2e-5)


def test_merge_different_ranks_and_heads(tmp_path):
    """Ensemble of r=4 and r=2 adapters of a classifier; the trained heads are averaged."""
    a = LoraAdapter.from_model(_random_lora(tiny_peft_model("bert", num_layers=3, r=4), 1))
    b = LoraAdapter.from_model(_random_lora(tiny_peft_model("bert", num_layers=3, r=2), 2))
    for key in b.extra:
        b.extra[key] = b.extra[key] + 0.5
    ens = merge_adapters([a, b], method="ensemble")
    with pytest.raises(ValueError, match="ensemble"):
        merge_adapters([a, b], method="fusion")
    ens.save_pretrained(tmp_path / "ens")
    loaded = PeftModel.from_pretrained(tiny_model("bert", 3, 0), tmp_path / "ens")
    deltas = {m: 0.5 * a.delta(m, torch.float64) + 0.5 * b.delta(m, torch.float64) for m in a.modules}
    heads = {k: 0.5 * a.extra[k] + 0.5 * b.extra[k] for k in a.extra}
    hand = _hand_model("bert", deltas, heads)
    batch = batch_for("bert", batch=3)
    torch.testing.assert_close(_out(loaded, batch), _out(hand, batch), rtol=0, atol=2e-5)


def test_interpolation_curve_endpoints():
    a, b = _two_seeds()
    model = get_peft_model(tiny_model("llama", 3, 0), LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM"))
    batch = batch_for("llama")

    def evaluate(adapter):
        adapter.load_into(model)
        return float(_out(model, batch).sum())

    curve = interpolation_curve(a, b, evaluate, [0.0, 0.5, 1.0], "fusion")
    assert [lam for lam, _ in curve] == [0.0, 0.5, 1.0]
    assert math.isclose(curve[0][1], evaluate(a), rel_tol=1e-6)
    assert math.isclose(curve[2][1], evaluate(b), rel_tol=1e-6)


# -- Shapley --------------------------------------------------------------------------------------------------------


def test_shapley_additive_game_is_exact():
    contribution = {"a": 0.5, "b": -0.2, "c": 0.1, "d": 0.0}
    result = shapley_values(lambda s: sum(contribution[p] for p in s), list(contribution), n_samples=16, seed=1)
    for player, phi, se in zip(result.players, result.values, result.stderr):
        assert math.isclose(phi, contribution[player], abs_tol=1e-12)
        assert se < 1e-12
    assert abs(result.efficiency_gap) < 1e-12


def test_shapley_with_interactions_matches_closed_form():
    # v(S) = sum_i c_i [i in S] + c_ab [a, b in S] + c_abc [a, b, c in S] + 0.3 [|S| >= 3]
    # closed form: phi_i = c_i + c_ab / 2 (a, b) + c_abc / 3 (a, b, c) + 0.3 / 4 (symmetric in the 4 players)
    c = {"a": 1.0, "b": 0.5, "c": -0.25, "d": 0.75}

    def v(s):
        return (sum(c[p] for p in s) + 0.8 * ({"a", "b"} <= s) - 0.6 * ({"a", "b", "c"} <= s)
                + 0.3 * (len(s) >= 3))

    closed = {"a": 1.0 + 0.4 - 0.2 + 0.075, "b": 0.5 + 0.4 - 0.2 + 0.075, "c": -0.25 - 0.2 + 0.075, "d": 0.825}
    exact = exact_shapley(v, list(c))
    for player, phi in zip(c, exact):
        assert math.isclose(phi, closed[player], abs_tol=1e-12)
    result = shapley_values(v, list(c), n_samples=400, seed=0)
    for player, phi, se in zip(result.players, result.values, result.stderr):
        assert se > 0
        assert abs(phi - closed[player]) < 4 * se + 1e-9, (player, phi, closed[player], se)
    assert abs(result.efficiency_gap) < 4 * result.sum_stderr
    assert math.isclose(result.v_all - result.v_none, sum(closed.values()), abs_tol=1e-12)
    assert result.n_evaluations <= 16


def test_adapter_shapley_on_a_model_matches_exact():
    model = tiny_peft_model("bert", num_layers=3)
    coto_kernels.patch(model, total_steps=10, seed=0)
    batch = batch_for("bert", batch=4)
    model.eval()

    def metric(m):
        with torch.no_grad():
            return float(m(input_ids=batch["input_ids"]).logits[:, 0].mean())

    players = adapter_players(model, "layer")
    assert len(players) == 4  # three blocks and the pooler
    exact = exact_shapley(adapter_value_fn(model, metric, players), list(players))
    result = adapter_shapley(model, metric, granularity="layer", n_samples=48, seed=0)
    assert result.players == list(players)
    for phi, se, want in zip(result.values, result.stderr, exact):
        assert abs(phi - want) < 4 * se + 1e-6
    with pruned(model, []):
        assert math.isclose(result.v_all, metric(model), rel_tol=1e-6)
    per_module = adapter_players(model, "module")
    assert len(per_module) == 3 * 6 + 1  # query, key, value and three dense per block, and the pooler


def test_shapley_grid_and_heatmap(tmp_path):
    values = {m: float(i) for i, m in enumerate(BLOCKS6)}
    result = shapley_values(lambda s: sum(values[p] for p in s), BLOCKS6, n_samples=2)
    blocks, projections, rows = shapley_grid(result)
    assert blocks == [str(i) for i in range(6)] and projections == ["q_proj", "v_proj"]
    assert rows[2] == [4.0, 5.0]
    pytest.importorskip("matplotlib")
    path = plot_shapley_heatmap({"LoRA": result, "CoTo": result}, tmp_path / "h.png")
    assert path is not None and path.stat().st_size > 1000


# -- errors name the thing at fault -------------------------------------------------------------------------------


def test_missing_local_folder_is_not_taken_for_a_hub_repo(tmp_path, monkeypatch):
    from coto_kernels.tools import as_adapter, load_peft_model

    monkeypatch.chdir(tmp_path)
    for call in (lambda: LoraAdapter.from_pretrained("runs/seed0"), lambda: as_adapter("runs/seed0"),
                 lambda: load_peft_model(tiny_model("llama"), "runs/seed0")):
        with pytest.raises(FileNotFoundError, match=r"no adapter folder at 'runs/seed0'.*snapshot_download"):
            call()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/adapter_config\.json does not exist"):
        LoraAdapter.from_pretrained("empty")


def test_unreadable_or_misshaped_weights_name_the_file_and_module(tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = LoraAdapter.from_model(tiny_peft_model("llama"))
    folder = adapter.save_pretrained(tmp_path / "adapter")
    weights = folder / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if k.endswith("q_proj.lora_B.weight"))
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)
    save_file(state, str(weights))
    module = key.removesuffix(".lora_B.weight")
    with pytest.raises(ValueError, match=rf"{module}: lora_A \(4, 32\) and lora_B \(32, 5\) are no LoRA pair"):
        LoraAdapter.from_pretrained(folder)
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, e.g. an interrupted copy
    with pytest.raises(ValueError, match=rf"cannot read the adapter weights {weights}"):
        LoraAdapter.from_pretrained(folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        LoraAdapter.from_pretrained(folder)


def test_non_finite_or_non_numeric_arguments_raise():
    a, b = _two_seeds()
    for weights in ([float("nan"), 0.5], [0.5, float("inf")]):
        with pytest.raises(ValueError, match="merge weight [01] must be finite"):
            merge_adapters([a, b], weights)
    with pytest.raises(TypeError, match="merge weight 0 must be a real number"):
        merge_adapters([a, b], [True, 0.5])
    with pytest.raises(ValueError, match="lam must be finite"):
        interpolation_curve(a, b, lambda adapter: 0.0, lambdas=[float("nan")])
    with pytest.raises(ValueError, match="sparsity must be finite"):
        magnitude_prune(a, float("nan"))
    game = lambda coalition: float(len(coalition))  # noqa: E731
    for name, kwargs in (("n_samples", {"n_samples": True}), ("n_samples", {"n_samples": 8.0}),
                         ("seed", {"seed": 1.5}), ("seed", {"seed": "1"})):
        with pytest.raises(TypeError, match=f"{name} must be an integer"):
            shapley_values(game, ["a", "b"], **kwargs)
    with pytest.raises(ValueError, match="n_samples must be >= 2"):
        shapley_values(game, ["a", "b"], n_samples=1)
