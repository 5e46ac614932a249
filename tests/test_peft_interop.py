"""A patched model under what PEFT users do to it: in-place adds on outputs, add/load/merge/unload adapters,
deepcopy, pickle, hooks on the base layer, ``target_parameters``, devices. Each test is a regression test for an
item of issue 11 (found by PEFT's own test suite or by trying to break the patch)."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from helpers import batch_for, tiny_model, tiny_peft_model
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from torch import nn

import coto_kernels
from coto_kernels import checkpointing, functional
from coto_kernels.compile import gated_lora_linear
from coto_kernels.layers import CoToLayerMixin
from coto_kernels.patching import CONTROLLER_KEY

pytestmark = pytest.mark.usefixtures("one_thread")

Q_PROJ = "base_model.model.model.layers.0.self_attn.q_proj"


def patch_quietly(model, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return coto_kernels.patch(model, **options)


def lora_grads(model) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


def assert_same_grads(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, grad in got.items():
        assert (grad is None) == (want[name] is None), name
        if grad is not None:
            # fp32 summation order differs between backends (the native ops sum per-thread partials): the
            # absolute slack is relative to the gradient's scale, ~1e-7 measured, a wrong term is O(1).
            scale = want[name].abs().max().item()
            torch.testing.assert_close(grad, want[name], rtol=1e-5, atol=1e-6 * max(scale, 1.0), msg=name)


def coto_hooks(model) -> list[tuple[str, object]]:
    """Every hook or method override of ours left anywhere in ``model``."""
    found = []
    for name, module in model.named_modules():
        found += [(name, h) for h in module._forward_pre_hooks.values() if h is checkpointing.input_grad_pre_hook]
        found += [(name, h) for h in module._forward_pre_hooks.values()
                  if type(h).__name__ in ("TrainingGuard", "NewLayerWatch")]
        found += [(name, key) for key in module.__dict__ if key.startswith("_coto") or key == CONTROLLER_KEY]
        found += [(name, key) for key in ("enable_input_require_grads", "disable_input_require_grads",
                                          "merge_and_unload", "unload", "inject_adapter") if key in module.__dict__]
    return found


# -- the fused output is no view: in-place adds onto it --------------------------------------------------------------


@pytest.mark.parametrize("op", ["eager", "compile_op"])
def test_in_place_add_onto_the_fused_output(op):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(6, 8)
    lora_a, lora_b = torch.randn(3, 8, requires_grad=True), torch.randn(6, 3, requires_grad=True)
    extra = torch.randn(2, 5, 6)

    def run(fused: bool):
        for t in (x, lora_a, lora_b):
            t.grad = None
        if not fused:
            y = x @ weight.t() + 0.5 * (x @ lora_a.t() @ lora_b.t())
        elif op == "eager":
            y = functional.lora_linear(x, weight, None, lora_a, lora_b, scaling=0.5)
        else:
            y = gated_lora_linear(x, weight, None, lora_a, lora_b, None, gate=torch.tensor(True), scaling=0.5)
        y += extra  # what PEFT's layers and AdaLoRA do to a base layer's output
        y.mul_(y.detach().sign())
        y.sum().backward()
        return y.detach(), [t.grad.clone() for t in (x, lora_a, lora_b)]

    (y, grads), (y_ref, grads_ref) = run(True), run(False)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5)


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 16)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


ADALORA = AdaLoraConfig(target_modules=["lin0"], init_lora_weights=False, total_step=1)
LORA = LoraConfig(target_modules=["lin0"], init_lora_weights=False)


@pytest.mark.parametrize("first", ["lora", "adalora"])
def test_lora_and_adalora_nested_in_a_mixed_model(first):
    """PEFT's mixed model: the second adapter type's layer wraps the first's and adds onto its output in place."""
    configs = (LORA, ADALORA) if first == "lora" else (ADALORA, LORA)

    def build():
        torch.manual_seed(0)
        return get_peft_model(TwoLinear(), copy.deepcopy(configs[0]), adapter_name="a0", mixed=True)

    def finish(model):
        torch.manual_seed(1)
        model.add_adapter("a1", copy.deepcopy(configs[1]))
        model.set_adapter(["a0", "a1"])
        return model

    x = torch.randn(9, 10)
    vanilla = finish(build())
    patched = build()
    patch_quietly(patched, schedule="off", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        finish(patched)
    # the second layer took the name lin0; the gated layer it wraps moved to lin0.base_layer
    assert sorted(patched.coto_controller.layer_names) == ["base_model.model.lin0", "base_model.model.lin0.base_layer"]
    outputs = []
    for model in (vanilla, patched):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model(x)
        out.square().sum().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    assert_same_grads(lora_grads(patched), lora_grads(vanilla))


# -- target_parameters (PEFT's ParamWrapper) ------------------------------------------------------------------------


class WithParameterTarget(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        return self.linear(x)


def test_add_and_load_adapter_with_target_parameters_on_a_patched_model(tmp_path):
    torch.manual_seed(0)
    config = LoraConfig(target_modules=[], target_parameters=["linear.weight"], init_lora_weights=False)
    model = get_peft_model(WithParameterTarget(), config)
    patch_quietly(model, seed=0)
    model.add_adapter("other", LoraConfig(target_modules=[], target_parameters=["linear.weight"]))
    assert "other" in model.peft_config
    model.save_pretrained(tmp_path)

    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(WithParameterTarget(), tmp_path)
    patch_quietly(loaded, seed=0)
    loaded.load_adapter(tmp_path, adapter_name="other")
    assert "other" in loaded.peft_config
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x))


# -- PEFT's class names ---------------------------------------------------------------------------------------------


def test_repr_and_class_names_stay_peft_s():
    model = tiny_peft_model("llama")
    vanilla_repr = repr(model)
    patch_quietly(model, seed=0)
    assert repr(model) == vanilla_repr
    layer = model.get_submodule(Q_PROJ)
    assert type(layer).__name__ == "Linear" and type(layer).__qualname__ == "CoToLinear"


# -- merge_and_unload / unload leave a clean base model --------------------------------------------------------------


def enable_reentrant_checkpointing(model) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()


@pytest.mark.parametrize("method", ["merge_and_unload", "unload"])
def test_merge_and_unload_leave_a_clean_base_model_that_trains_a_new_lora(method):
    model = tiny_peft_model("llama", num_layers=4)
    enable_reentrant_checkpointing(model)
    controller = patch_quietly(model, total_steps=8, initial_p=0.2, seed=1)
    controller.set_override([False, True, False, True])  # what a patched run leaves behind: blocks switched off
    model.train()
    model(**batch_for("llama")).loss.backward()

    base = getattr(model, method)()
    assert coto_hooks(base) == []
    assert CONTROLLER_KEY not in model.__dict__
    assert not any(isinstance(m, CoToLayerMixin) for m in base.modules())
    assert type(base).enable_input_require_grads is not None and "enable_input_require_grads" not in base.__dict__

    fresh = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    enable_reentrant_checkpointing(fresh)
    fresh.train()
    fresh(**batch_for("llama")).loss.backward()
    grads = lora_grads(fresh)
    assert len(grads) == 16  # 4 blocks x 2 modules x (A, B)
    assert sorted(n for n, g in grads.items() if g is None) == []


# -- deepcopy and pickle ---------------------------------------------------------------------------------------------


def test_deepcopy_is_an_independent_patched_model():
    model = tiny_peft_model("llama", num_layers=4)
    enable_reentrant_checkpointing(model)
    controller = patch_quietly(model, total_steps=8, initial_p=0.2, seed=1)
    clone = copy.deepcopy(model)
    clone_controller = clone.coto_controller
    assert clone_controller is not controller
    # live for the global LoRA-FA step hook: its gated-off adapters are among the process-wide inactive ones
    clone_controller.set_override([False] * len(clone_controller.groups))
    live = {id(p) for p in coto_kernels.controller.inactive_adapter_parameters()}
    assert {id(p) for p in clone_controller.inactive_parameters()} <= live
    clone_controller.set_override(None)
    # the copy's controller gates the copy's layers, and only those
    clone_controller.set_override([False] * len(clone_controller.groups))
    assert clone.get_submodule(Q_PROJ).coto_override is False
    assert model.get_submodule(Q_PROJ).coto_override is None
    # the copy's checkpointing pre-hook reads the copy's layers: with the original's adapters all off and the
    # copy's all on, every LoRA tensor of the copy gets a gradient under reentrant checkpointing
    controller.set_override([False] * len(controller.groups))
    clone_controller.set_override([True] * len(clone_controller.groups))
    clone.train()
    clone(**batch_for("llama")).loss.backward()
    assert sorted(n for n, g in lora_grads(clone).items() if g is None) == []
    coto_kernels.unpatch(clone)
    assert coto_hooks(clone) == []
    assert coto_hooks(model) != []  # the original is still patched
    coto_kernels.unpatch(model)
    assert coto_hooks(model) == []


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_patched_model_pickles_and_stays_patched(how):
    model = tiny_peft_model("llama")
    controller = patch_quietly(model, total_steps=8, initial_p=0.2, seed=1)
    controller.step()
    if how == "pickle":
        loaded = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.get_submodule(Q_PROJ)) is type(model.get_submodule(Q_PROJ))
    assert loaded.coto_controller.gates == controller.gates
    model.train()
    loaded.train()
    batch = batch_for("llama")
    torch.testing.assert_close(loaded(**batch).loss, model(**batch).loss)
    loaded.coto_controller.step()
    controller.step()
    assert loaded.coto_controller.gates == controller.gates
    coto_kernels.unpatch(loaded)
    assert coto_hooks(loaded) == []


# -- adapters added after patch ---------------------------------------------------------------------------------------


def test_add_adapter_after_patch_gates_the_new_layers():
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    controller = patch_quietly(model, total_steps=8, initial_p=0.2, seed=1)
    before = set(controller.layer_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("extra", LoraConfig(r=2, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    added = set(controller.layer_names) - before
    assert added and all(name.endswith("k_proj") for name in added)  # q_proj was adapted already
    assert all(isinstance(model.get_submodule(name), CoToLayerMixin) for name in added)
    model.set_adapter("extra")
    model.train()
    controller.set_override({group: group.endswith(".1") for group in controller.groups})
    model(**batch_for("llama")).loss.backward()
    for name, grad in lora_grads(model).items():
        if ".extra." in name:
            assert (grad is not None) == (".layers.1." in name), name
    coto_kernels.unpatch(model)
    assert not any(isinstance(m, CoToLayerMixin) for m in model.modules())


def _plain_lora_module(targets: list[str], adapter_name: str = "default") -> nn.Module:
    """A plain (not PeftModel) module holding LoRA layers injected by ``peft.inject_adapter_in_model``."""
    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(8, 8), "k": nn.Linear(8, 8)}) for _ in range(3))
    model = nn.Sequential()
    model.layers = blocks
    model.forward = lambda x: _run_blocks(blocks, x)
    return inject_adapter_in_model(LoraConfig(r=2, target_modules=targets, init_lora_weights=False), model,
                                   adapter_name=adapter_name)


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block["k"](block["q"](x))
    return x


def test_inject_adapter_in_model_after_patch_gates_the_new_layers_at_the_next_step():
    model = _plain_lora_module(["q"])
    controller = patch_quietly(model, seed=0, schedule="off", granularity="layer")
    before = set(controller.layer_names)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["k"], init_lora_weights=False), model)
    model.train()
    model(torch.randn(4, 8)).sum().backward()  # first training forward after patch: the watch walks the model
    added = set(controller.layer_names) - before
    assert added == {f"layers.{i}.k" for i in range(3)}
    assert all(isinstance(model.get_submodule(name), CoToLayerMixin) for name in added)
    controller.set_override({group: group.endswith(".1") for group in controller.groups})
    for p in model.parameters():
        p.grad = None
    model(torch.randn(4, 8)).sum().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:  # the injected k layers follow their block's gate like the patched q layers
            assert (p.grad is not None) == name.startswith("layers.1."), name
    coto_kernels.unpatch(model)
    assert coto_hooks(model) == []
    assert not any(isinstance(m, CoToLayerMixin) for m in model.modules())


def test_new_layer_watch_walks_once_per_step():
    model = _plain_lora_module(["q"])
    controller = patch_quietly(model, seed=0, schedule="off", total_steps=4)
    model.train()
    model(torch.randn(2, 8))
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["k"]), model)
    model(torch.randn(2, 8))  # same step: not walked again
    assert not any(name.endswith(".k") for name in controller.layer_names)
    with torch.no_grad():
        model(torch.randn(2, 8))  # no grad: no walk either
    controller.step()
    model(torch.randn(2, 8))
    assert sum(name.endswith(".k") for name in controller.layer_names) == 3


def test_new_layer_watch_walks_only_after_a_module_is_registered(monkeypatch):
    """Transformers re-registers its decoder layers at every forward; only a first registration makes it walk."""
    model = tiny_peft_model("llama")
    controller = patch_quietly(model, seed=0, schedule="off")
    walks = []
    original = type(model).modules
    monkeypatch.setattr(type(model), "modules", lambda self, *a, **k: walks.append(self) or original(self, *a, **k))
    model.train()
    batch = batch_for("llama")
    for _ in range(3):
        model(**batch)
        controller.step()
    assert walks == [model]  # the first training forward after patch only
    nn.Sequential().add_module("fresh", nn.Linear(2, 2))  # a first registration, anywhere
    model(**batch)
    assert walks == [model, model]
    model(**batch)
    controller.step()
    model(**batch)
    assert walks == [model, model]
    copied = copy.deepcopy(model)
    walks.clear()
    copied(**batch)
    assert walks == [copied]  # a copy walks at its first check


def test_load_adapter_after_patch_gates_the_new_layers(tmp_path):
    other = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["gate_proj"], init_lora_weights=False))
    other.save_pretrained(tmp_path)
    model = tiny_peft_model("llama")
    controller = patch_quietly(model, seed=0, schedule="off")
    model.load_adapter(tmp_path, adapter_name="loaded")
    gated = [name for name in controller.layer_names if name.endswith("gate_proj")]
    assert len(gated) == 3
    model.set_adapter("loaded")
    reference = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["gate_proj"]))
    reference.load_adapter(tmp_path, adapter_name="loaded")
    reference.set_adapter("loaded")
    batch = batch_for("llama")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).logits, reference.eval()(**batch).logits)


# -- hooks on the base layer ----------------------------------------------------------------------------------------


def test_forward_hook_on_the_base_layer_runs_and_the_layer_is_named():
    model = tiny_peft_model("llama")
    vanilla = copy.deepcopy(model)
    patch_quietly(model, schedule="off", seed=0)
    captured = {}

    def capture(module, args, output):
        captured.setdefault(id(module), []).append(output.detach().clone())

    patched_base = model.get_submodule(Q_PROJ).base_layer
    vanilla_base = vanilla.get_submodule(Q_PROJ).base_layer
    patched_base.register_forward_hook(capture)
    vanilla_base.register_forward_hook(capture)
    batch = batch_for("llama")
    with pytest.warns(UserWarning, match=rf"{Q_PROJ} runs PEFT's unfused forward \(its base layer has forward hooks"):
        loss = model(**batch).loss
    torch.testing.assert_close(loss, vanilla(**batch).loss)
    torch.testing.assert_close(captured[id(patched_base)][0], captured[id(vanilla_base)][0])


def test_steering_hook_on_the_base_layer_takes_effect():
    model = tiny_peft_model("llama")
    vanilla = copy.deepcopy(model)
    patch_quietly(model, schedule="off", seed=0)
    for m in (model, vanilla):
        m.get_submodule(Q_PROJ).base_layer.register_forward_hook(lambda module, args, output: output * 0.0)
    batch = batch_for("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(model(**batch).logits, vanilla(**batch).logits)


def test_accelerate_cpu_offload_runs_through_peft_s_path():
    accelerate = pytest.importorskip("accelerate")
    model = tiny_peft_model("llama")
    vanilla = copy.deepcopy(model)
    batch = batch_for("llama")
    with torch.no_grad():
        expected = vanilla.eval()(**batch).logits
    patch_quietly(model, schedule="off", seed=0)
    accelerate.cpu_offload(model.base_model.model, execution_device=torch.device("cpu"))
    assert model.get_submodule(Q_PROJ).base_layer.weight.device.type == "meta"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            logits = model.eval()(**batch).logits
    torch.testing.assert_close(logits, expected)
    assert any("accelerate hook" in str(w.message) and Q_PROJ in str(w.message) for w in caught)


# -- backend and device ----------------------------------------------------------------------------------------------


def test_triton_backend_on_a_cpu_model_fails_at_patch_time(monkeypatch):
    if not functional.triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = tiny_peft_model("llama")
    with pytest.raises(ValueError, match=r"Triton needs CUDA tensors.*q_proj is on cpu"):
        coto_kernels.patch(model, backend="triton", seed=0)
    assert not any(isinstance(m, CoToLayerMixin) for m in model.modules())
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the CPU interpreter (tests)
    patch_quietly(model, backend="triton", seed=0)


def _lorafa_model_and_optimizer():
    from peft.optimizers import create_lorafa_optimizer

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("lin0", nn.Linear(10, 12))
    model.add_module("act", nn.ReLU())
    model.add_module("lin1", nn.Linear(12, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"]))
        controller = coto_kernels.patch(model, total_steps=10, seed=0)
        optimizer = create_lorafa_optimizer(model=model, r=4, lora_alpha=8, lr=1e-2)
    return model, controller, optimizer


def test_lorafa_optimizer_skips_gated_off_adapters():
    """PEFT's LoRA-FA optimizer reads every lora_B's gradient; under CoTo the gated-off pairs are hidden from its
    step: no crash, no update and no state for them, a normal AdamW-style update for the others."""
    model, controller, optimizer = _lorafa_model_and_optimizer()
    groups_before = [(list(g["params"]), list(g["names"])) for g in optimizer.param_groups]
    for gates in ([True, False], [False, True], [True, True]):
        controller.set_override(gates)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
        model(torch.randn(6, 10)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                on = gates[0] if ".lin0." in name else gates[1]
                assert (not torch.equal(param, before[name])) == on, name
    assert [(g["params"], g["names"]) for g in optimizer.param_groups] == groups_before
    # each pair's optimizer state advanced once per step it was on
    assert {name.split(".")[-2]: state["step"] for name, state in optimizer.state.items()} == {"lin0": 2, "lin1": 2}


@pytest.mark.parametrize("attached", [False, True])
def test_lorafa_gated_off_adapter_with_a_gradient_moves_only_without_attach_optimizer(attached):
    """A gated-off B that holds a gradient (set by hand, as PEFT's own LoRA-FA test does, or zeros) is updated like
    AdamW would update it, unless attach_optimizer clears it: then the pair is hidden, not crashed on."""
    model, controller, optimizer = _lorafa_model_and_optimizer()
    if attached:
        controller.attach_optimizer(optimizer)
    controller.set_override([False, True])  # lin0 off
    b0 = model.base_model.model.lin0.lora_B.default.weight
    b1 = model.base_model.model.lin1.lora_B.default.weight
    before = b0.detach().clone()
    b0.grad, b1.grad = torch.full_like(b0, 0.5), torch.full_like(b1, 0.5)
    optimizer.step()
    assert torch.equal(b0, before) == attached
    assert not torch.equal(b1, torch.zeros_like(b1))
