"""Fused DoRA: the autograd Function against float64 PEFT math, the row norm (cache, precision guard), and
``patch`` on PEFT DoRA models (Llama, GPT-2's Conv1D) against PEFT itself."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import batch_for, read_adapter_config, tiny_peft_model
from reference import (
    TOLERANCE,
    assert_matches,
    check_dora_layer,
    check_fresh_adapter_norm_is_exact,
    check_guard_fixes_cancelling_rows,
    dora_inputs,
    exact_row_norm,
    peft_dora,
    relative_error,
)
from torch.utils._python_dispatch import TorchDispatchMode

import coto_kernels
from coto_kernels import functional_dora
from coto_kernels.functional_dora import dora_linear
from coto_kernels.kernels import backend_available, dora_torch, load_dora_backend
from coto_kernels.kernels.dropout_mask import dropout_keep_mask


def check_against_peft_math(t, dtype, *, scaling, dropout_p=0.0, kn=False, seed=3, backend="torch"):
    if not backend_available(backend):
        pytest.skip(f"{backend} backend not built here")
    check_dora_layer(t, dtype, backend=backend, scaling=scaling, dropout_p=dropout_p, kn=kn, seed=seed)


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("kn", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("m,k,n,r,lora_bias", [(37, 45, 29, 3, True), (64, 33, 70, 16, False)])
def test_forward_and_every_gradient_match_float64_peft_formula(dtype, dropout_p, kn, m, k, n, r, lora_bias, backend):
    """PEFT's formula in float64 with the same dropout mask; the magnitude gradient included."""
    t = dora_inputs(m, k, n, r, dtype, kn=kn, lora_bias=lora_bias)
    check_against_peft_math(t, dtype, scaling=1.7, dropout_p=dropout_p, kn=kn, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_bf16_base_with_fp32_adapters(dropout_p, backend):
    """PEFT's default for a bf16 model: adapters and magnitude kept in fp32 over the bf16 base layer."""
    t = dora_inputs(37, 45, 29, 3, torch.bfloat16, lora_bias=True)
    for name in ("lora_a", "lora_b", "lora_bias"):
        t[name] = t[name].detach().float().requires_grad_()
    check_against_peft_math(t, torch.bfloat16, scaling=1.7, dropout_p=dropout_p, backend=backend)


class _CountDispatches(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_native_dora_layer_issues_few_dispatches():
    """Per layer and step, each op dispatched from Python costs microseconds whatever the shape (a small model's
    step runs ~60 DoRA layers): the native CPU layer issues 13 ops forward (the row norm one of them; torch's
    expansion alone issues ~20) and 17 backward (LoRA's native backward on G; 24 through the torch formulation)."""
    if not backend_available("native"):
        pytest.skip("native backend not built here")
    t = dora_inputs(8, 64, 64, 4, torch.float32, bias=False)
    dora_linear(*t.values(), scaling=2.0, backend="native").sum().backward()  # ||W||^2 cached, as in training
    for v in t.values():
        if v is not None:
            v.grad = None
    with _CountDispatches() as forward:
        y = dora_linear(*t.values(), scaling=2.0, backend="native")
    dy = torch.randn_like(y)
    with _CountDispatches() as backward:
        torch.autograd.grad(y, [t[name] for name in ("x", "lora_a", "lora_b", "magnitude")], dy)
    assert len(forward.ops) <= 15, forward.ops
    assert len(backward.ops) <= 19, backward.ops


def test_tolerance_catches_an_undetached_or_wrong_norm():
    """Wrong DoRA math (norm missing the update, magnitude ignored) moves y far beyond the bf16 tolerance."""
    t = dora_inputs(37, 45, 29, 3, torch.float32)
    ref = peft_dora(*t.values(), scaling=1.7)["y"]
    no_update_in_norm = dict(t, lora_b=torch.zeros_like(t["lora_b"]))
    norm_without_update = peft_dora(*no_update_in_norm.values(), scaling=1.7)["norm"]
    assert relative_error(norm_without_update, peft_dora(*t.values(), scaling=1.7)["norm"]) > 0.05
    unit_magnitude = dict(t, magnitude=torch.ones_like(t["magnitude"]))
    assert relative_error(peft_dora(*unit_magnitude.values(), scaling=1.7)["y"], ref) > 10 * TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_zero_magnitude_columns_get_their_gradient(backend):
    """Y_j = bias_j where m_j = 0: dm_j cannot come from the saved output and is recomputed."""
    t = dora_inputs(20, 24, 12, 4, torch.float32)
    with torch.no_grad():
        t["magnitude"][[2, 7]] = 0.0
    check_against_peft_math(t, torch.float32, scaling=0.9, backend=backend)


def test_gate_off_is_the_base_layer_and_gives_the_adapter_no_gradient():
    t = dora_inputs(10, 16, 8, 2, torch.float32)
    y = dora_linear(*t.values(), scaling=2.0, dropout_p=0.1, gate=False, backend="torch")
    torch.testing.assert_close(y, torch.nn.functional.linear(t["x"], t["weight"], t["bias"]), rtol=0, atol=0)
    y.sum().backward()
    assert all(t[name].grad is None for name in ("lora_a", "lora_b", "magnitude"))


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("train_magnitude", [False, True])
def test_in_place_add_onto_the_output(backend, bias, train_magnitude):
    """The output (3-D input) is no view made inside the Function, so an in-place add onto it (PEFT's
    ``result += ...``) gives the same gradients as an out-of-place one. One exception: a trained magnitude of a
    layer without bias takes its gradient from the saved output (no extra M x N write; with a bias the forward
    keeps Z anyway), so changing that output in place raises PyTorch's in-place error at backward, as for any op
    that saves its output (``torch.exp``): never a wrong gradient."""
    if not backend_available(backend):
        pytest.skip(f"{backend} backend not built here")
    t = dora_inputs(20, 24, 12, 4, torch.float32)
    t["x"] = t["x"].detach().reshape(4, 5, 24).requires_grad_()
    t["magnitude"].requires_grad_(train_magnitude)
    if not bias:
        t["bias"] = None
    leaves = [v for v in t.values() if v is not None and v.requires_grad]
    residual = torch.randn(4, 5, 12)

    def output_plus_residual(in_place: bool) -> torch.Tensor:
        y = dora_linear(*t.values(), scaling=0.9, backend=backend)
        if in_place:
            y += residual
            return y
        return y + residual

    if train_magnitude and not bias:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            output_plus_residual(in_place=True).sum().backward()
        return
    want = torch.autograd.grad(output_plus_residual(in_place=False).square().sum(), leaves)
    got = torch.autograd.grad(output_plus_residual(in_place=True).square().sum(), leaves)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


# -- the row norm ------------------------------------------------------------------------------------------------


@pytest.fixture(params=["torch", "native"])
def norm_backend(request):
    """The DoRA kernels module whose ``dora_row_norm`` a test checks (native: the CPU op over the cached ||W||^2)."""
    if not backend_available(request.param):
        pytest.skip(f"{request.param} backend not built here")
    return load_dora_backend(request.param)


def test_row_norm_matches_the_materialised_norm_and_lora_bias_enters_every_column(norm_backend):
    t = dora_inputs(4, 300, 50, 8, torch.float32, lora_bias=True)
    norm = norm_backend.dora_row_norm(t["weight"], t["lora_a"], t["lora_b"], t["lora_bias"], scaling=1.3,
                                      weight_is_kn=False)
    lora_weight = t["lora_b"] @ t["lora_a"] + t["lora_bias"][:, None]  # PEFT's B(A(I_K)) includes lora_B's bias
    exact = torch.linalg.norm(t["weight"].double() + 1.3 * lora_weight.double(), dim=1)
    assert norm.dtype == torch.float32 and not norm.requires_grad
    assert relative_error(norm, exact) < TOLERANCE[torch.float32]
    bf16 = {name: v.detach().to(torch.bfloat16) for name, v in t.items() if name in ("weight", "lora_a", "lora_b")}
    norm_bf16 = norm_backend.dora_row_norm(bf16["weight"], bf16["lora_a"], bf16["lora_b"], None, scaling=1.3,
                                           weight_is_kn=False)
    assert norm_bf16.dtype == torch.float32  # the expansion runs in fp32 from bf16 operands
    assert relative_error(norm_bf16, exact_row_norm(bf16["weight"], bf16["lora_a"], bf16["lora_b"], 1.3)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kn", [False, True], ids=["linear", "conv1d"])
def test_row_norm_of_a_conv1d_or_half_precision_weight_with_fp32_adapters(norm_backend, dtype, kn):
    """[in, out] weights (GPT-2's Conv1D) and 16-bit weights over more rows than one widening chunk holds."""
    g = torch.Generator().manual_seed(4)
    n, k, r = 2100, 600, 5  # 1,260,000 elements: two chunks of 2**20 when a 16-bit W is widened
    w_nk = torch.randn(n, k, generator=g).to(dtype)
    a, b, lb = torch.randn(r, k, generator=g) * 0.05, torch.randn(n, r, generator=g) * 0.5, torch.randn(n, generator=g)
    weight = w_nk.t().contiguous() if kn else w_nk
    norm = norm_backend.dora_row_norm(weight, a, b, lb, scaling=0.8, weight_is_kn=kn)
    exact = torch.linalg.norm(w_nk.double() + 0.8 * (b.double() @ a.double() + lb.double()[:, None]), dim=1)
    assert relative_error(norm, exact) < 1e-6


@pytest.mark.parametrize("layout", ["strided", "float64", "rank-256", "one-column"])
def test_row_norm_of_strided_float64_high_rank_and_single_column_weights(norm_backend, layout):
    """The native op's streaming pass reads W in its storage order: every other column of a wider W (neither
    layout: copied first), fp64 W (read as fp32, as the BLAS expansion did), r 256, N = 1 and K below one chunk."""
    g = torch.Generator().manual_seed(7)
    n, k, r = (1, 19, 3) if layout == "one-column" else (70, 133, 256 if layout == "rank-256" else 6)
    wide = torch.randn(n, 2 * k, generator=g, dtype=torch.float64 if layout == "float64" else torch.float32)
    w_nk = wide[:, ::2] if layout == "strided" else wide[:, :k].contiguous()
    a, b, lb = torch.randn(r, k, generator=g) * 0.05, torch.randn(n, r, generator=g) * 0.5, torch.randn(n, generator=g)
    norm = norm_backend.dora_row_norm(w_nk, a, b, lb, scaling=1.1, weight_is_kn=False)
    exact = torch.linalg.norm(w_nk.double() + 1.1 * (b.double() @ a.double() + lb.double()[:, None]), dim=1)
    assert relative_error(norm, exact) < 1e-6


def test_row_norm_of_a_fresh_adapter_is_the_weight_norm_bit_for_bit(norm_backend):
    check_fresh_adapter_norm_is_exact(norm_backend.dora_row_norm,
                                      dora_inputs(4, 77, 33, 8, torch.float32, lora_bias=True))


def test_weight_norm_cache_is_reused_and_invalidated_when_the_weight_changes():
    t = dora_inputs(4, 32, 16, 2, torch.float32)
    weight = t["weight"]
    first = dora_torch.weight_row_norms_squared(weight, False)
    assert dora_torch.weight_row_norms_squared(weight, False) is first  # cached
    with torch.no_grad():
        weight[3].mul_(2.0)  # bumps the version counter
    second = dora_torch.weight_row_norms_squared(weight, False)
    assert second is not first and second[3] == pytest.approx(4 * first[3].item(), rel=1e-6)
    weight.data[5].mul_(3.0)  # .data writes are invisible to the version counter ...
    assert dora_torch.weight_row_norms_squared(weight, False) is second
    dora_torch.clear_weight_norm_cache(weight)  # ... hence the explicit invalidation
    assert dora_torch.weight_row_norms_squared(weight, False)[5] == pytest.approx(9 * second[5].item(), rel=1e-6)
    norm = dora_torch.dora_row_norm(weight, t["lora_a"], t["lora_b"], None, scaling=0.5, weight_is_kn=False)
    assert relative_error(norm, exact_row_norm(weight, t["lora_a"], t["lora_b"], 0.5)) < TOLERANCE[torch.float32]


def test_trained_base_weight_under_fused_adamw_is_renormed_every_step():
    """A fused optimizer writes W without bumping its version counter: a weight that requires grad is not cached."""
    ref = tiny_peft_model("llama", use_dora=True)
    for name, param in ref.named_parameters():
        if "base_layer.weight" in name:
            param.requires_grad_(True)
    ours = copy.deepcopy(ref)
    coto_kernels.patch(ours, schedule="off", seed=0)
    batch = batch_for("llama")
    losses = {}
    for label, model in (("peft", ref), ("ours", ours)):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
        versions = {n: p._version for n, p in model.named_parameters() if "base_layer.weight" in n}
        for _ in range(2):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        # the premise: fused AdamW writes W without a version bump (if torch changes that, this test needs another)
        assert all(p._version == versions[n] for n, p in model.named_parameters() if n in versions)
        losses[label] = model(**batch).loss.detach()
    assert relative_error(losses["ours"], losses["peft"]) < 4 * TOLERANCE[torch.float32]


def test_merge_and_unmerge_forget_the_cached_weight_norm(monkeypatch):
    """PEFT merges through ``weight.data``, which the version counter does not see."""
    model = tiny_peft_model("llama", use_dora=True)
    coto_kernels.patch(model, schedule="off", seed=0)
    model(**batch_for("llama")).loss.backward()
    forgotten = []
    monkeypatch.setattr(coto_kernels.layers, "clear_weight_norm_cache", forgotten.append)
    layer = next(m for m in model.modules() if isinstance(m, coto_kernels.layers.CoToLayerMixin))
    layer.merge()
    layer.unmerge()
    assert len(forgotten) == 2 and all(w is layer.get_base_layer().weight for w in forgotten)


def test_precision_guard_recomputes_cancelling_rows_exactly(monkeypatch, norm_backend):
    check_guard_fixes_cancelling_rows(norm_backend.dora_row_norm, monkeypatch)


# -- patch on PEFT DoRA models -----------------------------------------------------------------------------------


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def count_dora(monkeypatch):
    calls = []
    original = functional_dora.DoRAFunction.apply

    def apply(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(functional_dora.DoRAFunction, "apply", apply)
    return calls


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_patched_dora_matches_peft_at_p1(arch, autocast, count_dora):
    ref = tiny_peft_model(arch, use_dora=True)
    ours = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DoRA layers take the fused path: no fallback warning
        controller = coto_kernels.patch(ours, schedule="off", seed=0)
    assert all(controller.gates)
    batch = batch_for(arch)
    losses = []
    for model in (ref, ours):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        losses.append(loss)
    n_layers = sum(isinstance(m, coto_kernels.layers.CoToLayerMixin) for m in ours.modules())
    assert len(count_dora) == n_layers > 0
    dtype = torch.bfloat16 if autocast else torch.float32
    # the loss sums many layers' roundings: 4x the per-tensor tolerance (fp32 measured ~1e-7 relative)
    assert relative_error(losses[1].detach(), losses[0].detach()) < 4 * TOLERANCE[dtype]
    ref_grads, grads = _grads(ref), _grads(ours)
    assert ref_grads.keys() == grads.keys()
    assert any("lora_magnitude_vector" in name for name in grads)
    for name, grad in grads.items():
        if ref_grads[name] is None:
            assert grad is None, name
            continue
        limit = TOLERANCE[dtype] if not autocast else 4 * TOLERANCE[dtype]  # gradients through 3 bf16 layers
        assert relative_error(grad, ref_grads[name]) < limit, name


def test_patched_dora_with_dropout_uses_the_shared_mask(count_dora):
    """Training with dropout: the layer passes p and a seed to the fused Function, whose math is checked above;
    its output matches PEFT's formula with that seed's mask."""
    model = tiny_peft_model("llama", dropout=0.2, use_dora=True, num_layers=1)
    coto_kernels.patch(model, schedule="off", seed=0)
    model.train()
    model(**batch_for("llama")).loss.backward()
    p_values = {args[9] for args in count_dora}
    assert p_values == {0.2}
    layer = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    x = torch.randn(5, layer.in_features)
    y = layer(x)
    seed = count_dora[-1][10]
    keep = dropout_keep_mask(seed, tuple(x.shape), 0.2, "cpu")
    ref = peft_dora(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["default"].weight,
                    layer.lora_B["default"].weight, None, layer.lora_magnitude_vector["default"].weight,
                    scaling=layer.scaling["default"], keep=keep, dropout_p=0.2)
    assert_matches(y, ref["y"], torch.float32, "y")
    model.eval()  # eval: PEFT's no-dropout formula
    ref_eval = peft_dora(x, layer.base_layer.weight, None, layer.lora_A["default"].weight,
                         layer.lora_B["default"].weight, None, layer.lora_magnitude_vector["default"].weight,
                         scaling=layer.scaling["default"])
    assert_matches(layer(x), ref_eval["y"], torch.float32, "eval y")


def test_gated_off_dora_layers_return_the_base_output_with_no_gradients():
    model = tiny_peft_model("gpt2", use_dora=True)
    coto_kernels.patch(model, schedule="off", seed=0)
    for module in model.modules():
        if isinstance(module, coto_kernels.layers.CoToLayerMixin):
            module.coto_gate = False
    model.train()
    with model.disable_adapter():
        base_loss = model(**batch_for("gpt2")).loss
    loss = model(**batch_for("gpt2")).loss
    torch.testing.assert_close(loss, base_loss, rtol=0, atol=0)
    assert not loss.requires_grad  # no adapter (and no magnitude vector) is on the graph at all


def test_save_pretrained_is_unchanged_by_patching_dora(tmp_path):
    ref = tiny_peft_model("llama", use_dora=True)
    ours = copy.deepcopy(ref)
    coto_kernels.patch(ours, schedule="off", seed=0)
    ref.save_pretrained(tmp_path / "ref")
    ours.save_pretrained(tmp_path / "ours")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("magnitude" in key for key in a)
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert read_adapter_config(tmp_path / "ref") == read_adapter_config(tmp_path / "ours")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fresh_dora_adapter_is_an_exact_no_op(arch):
    """B = 0 after PEFT's init: m equals the row norm bit for bit, so c = 1 and the output is the base model's
    (PEFT's own test_lora_use_dora_linear checks this with torch.allclose's default atol of 1e-8)."""
    from helpers import tiny_model
    from peft import LoraConfig, get_peft_model

    targets = ["c_attn", "c_proj", "c_fc"] if arch == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_model(arch), LoraConfig(r=4, target_modules=targets, use_dora=True))
    coto_kernels.patch(model, schedule="off", seed=0)
    batch = batch_for(arch)
    with torch.no_grad():
        with model.disable_adapter():
            base = model(**batch).logits
        dora = model(**batch).logits
    assert torch.allclose(dora, base, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_fresh_dora_adapter_on_a_biased_layer_returns_the_base_output_bit_for_bit(backend):
    """PEFT's test_lora_use_dora_linear shape (K = 1000, a bias): bias + c * (X W^T) rounds 1 ulp away from the base
    layer's addmm(bias, X, W^T), so the full-precision forward must build on the base output itself."""
    from peft import LoraConfig, get_peft_model

    if not backend_available(backend):
        pytest.skip(f"{backend} backend not built here")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.Tanh())
    x = torch.rand(10, 1000)
    base = model(x)
    peft = get_peft_model(model, LoraConfig(target_modules=["0"], use_dora=True))
    coto_kernels.patch(peft, schedule="off", backend=backend)
    assert torch.equal(peft(x), base)
