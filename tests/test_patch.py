"""``coto_kernels.patch`` on real Hugging Face architectures: parity with PEFT, gating, fallbacks, errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import ARCHS, batch_for, read_adapter_config, tiny_peft_model
from peft import LoraConfig, PeftModel, get_peft_model

import coto_kernels
from coto_kernels import functional
from coto_kernels.layers import CoToLayerMixin, CoToLinear


def lora_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def blocks_of(model):
    return model.get_submodule("base_model.model.model.layers")


@pytest.fixture
def count_fused(monkeypatch):
    calls = []
    original = functional.GatedLoRAFunction.apply

    def apply(*args):
        calls.append(args[9])  # the gate argument
        return original(*args)

    monkeypatch.setattr(functional.GatedLoRAFunction, "apply", apply)
    return calls


@pytest.mark.parametrize("arch", ARCHS)
def test_parity_with_peft_at_p1(arch, count_fused):
    ref = tiny_peft_model(arch)
    ours = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer of these models must take the fused path
        controller = coto_kernels.patch(ours, schedule="off", seed=0)
    assert all(controller.gates)
    batch = batch_for(arch)
    ref_loss = ref(**batch).loss
    ref_loss.backward()
    loss = ours(**batch).loss
    loss.backward()
    n_layers = sum(isinstance(m, CoToLayerMixin) for m in ours.modules())
    assert len(count_fused) == n_layers > 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    ref_grads, grads = lora_grads(ref), lora_grads(ours)
    assert ref_grads.keys() == grads.keys()
    for name, grad in grads.items():
        if ref_grads[name] is None:  # e.g. a classifier head the loss does not reach
            assert grad is None, name
            continue
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-5 * max(scale, 1e-3), msg=name)


def test_dropout_rate_and_determinism_under_manual_seed():
    p = 0.25
    model = tiny_peft_model("llama", dropout=p)
    coto_kernels.patch(model, schedule="off", seed=0)
    batch = batch_for("llama")
    torch.manual_seed(3)
    a = model(**batch).loss
    torch.manual_seed(3)
    b = model(**batch).loss
    torch.manual_seed(4)
    c = model(**batch).loss
    assert a == b and a != c
    # the seed each layer draws regenerates a keep-mask at rate 1 - p
    seed = functional.new_dropout_seed()
    keep = coto_kernels.kernels.lora_torch.dropout_keep_mask(seed, (4000, 64), p, "cpu")
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01


def test_gated_off_layer_is_exactly_the_base_layer():
    model = tiny_peft_model("llama")
    controller = coto_kernels.patch(model, seed=0)
    controller.set_override([False, True, True])
    layer = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    x = torch.randn(2, 5, 32)
    assert torch.equal(layer(x), layer.base_layer(x))
    assert not torch.equal(model.get_submodule("base_model.model.model.layers.1.self_attn.q_proj")(x),
                           layer.base_layer(x))


def test_gate_off_gives_no_gradient_and_truncates_backward(count_fused):
    model = tiny_peft_model("llama", num_layers=4)
    controller = coto_kernels.patch(model, seed=0)
    controller.set_override([False, False, True, False])  # only block 2 on
    inputs_need_grad = {}
    for i, block in enumerate(blocks_of(model)):
        block.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: inputs_need_grad.__setitem__(i, args[0].requires_grad), with_kwargs=True
        )
    model(**batch_for("llama")).loss.backward()
    assert count_fused == [True] * 7  # no LoRA op ran in the gated-off layers
    for name, grad in lora_grads(model).items():
        in_block_2 = ".layers.2." in name
        assert (grad is not None) == in_block_2, name
    # blocks 0-2 see inputs that need no grad: autograd records nothing there and stops at block 2
    assert inputs_need_grad == {0: False, 1: False, 2: False, 3: True}


def test_eval_uses_all_adapters_whatever_the_gates():
    model = tiny_peft_model("llama")
    reference = copy.deepcopy(model).eval()
    controller = coto_kernels.patch(model, seed=0, initial_p=0.0)
    assert sum(controller.gates) == 1
    batch = batch_for("llama")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits)
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, reference(**batch).logits)


def test_steps_redraw_the_gates_of_the_layers():
    model = tiny_peft_model("llama", num_layers=6)
    controller = coto_kernels.patch(model, seed=1, total_steps=20)
    seen = set()
    for _ in range(20):
        layer_gates = [blocks_of(model)[i].mlp.up_proj.coto_gate for i in range(6)]
        assert layer_gates == controller.gates
        seen.add(tuple(controller.gates))
        controller.step()
    assert len(seen) > 5 and controller.p == 1.0 and all(controller.gates)


def test_unfused_variants_warn_once_and_stay_gated_and_correct():
    ref = tiny_peft_model("llama", init_lora_weights="mica")  # a LoRA variant without a fused path (not DoRA)
    ours = copy.deepcopy(ref)
    with pytest.warns(UserWarning, match=r"unfused forward: .*layers\.0\.self_attn\.q_proj \(LoRA variant MiCA"):
        controller = coto_kernels.patch(ours, schedule="off", seed=0)
    batch = batch_for("llama")
    torch.testing.assert_close(ours(**batch).loss, ref(**batch).loss)
    controller.set_override([True, False, True])
    layer = ours.get_submodule("base_model.model.model.layers.1.mlp.down_proj")
    x = torch.randn(2, 3, 48)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_mixed_adapter_batches_fall_back_with_a_warning():
    model = tiny_peft_model("llama")
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    coto_kernels.patch(model, schedule="off", seed=0)
    layer = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    x = torch.randn(2, 3, 32)
    with pytest.warns(UserWarning, match="extra forward arguments"):
        out = layer(x, adapter_names=["default", "other"])
    assert out.shape == (2, 3, 32)


def test_constant_schedule_is_plain_fused_lora():
    model = tiny_peft_model("llama")
    controller = coto_kernels.patch(model, initial_p=1.0, final_p=1.0, total_steps=5, seed=0)
    for _ in range(5):
        assert all(controller.gates)
        controller.step()


def test_bad_input_gets_clear_errors():
    from helpers import tiny_model

    with pytest.raises(ValueError, match="no PEFT LoRA layers"):
        coto_kernels.patch(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="no PEFT LoRA layers"):
        coto_kernels.patch(tiny_model("llama"))
    model = tiny_peft_model("llama")
    with pytest.raises(ValueError, match="initial_p"):
        coto_kernels.patch(model, initial_p=2.0)
    with pytest.raises(ValueError, match="backend"):
        coto_kernels.patch(model, backend="cuda")
    assert not any(isinstance(m, CoToLayerMixin) for m in model.modules())  # failed patches change nothing
    coto_kernels.patch(model, seed=0)
    with pytest.raises(RuntimeError, match="already patched"):
        coto_kernels.patch(model)
    with pytest.raises(RuntimeError, match="already patched"):
        coto_kernels.patch(model.base_model.model)
    with pytest.raises(RuntimeError, match="not patched"):
        coto_kernels.unpatch(tiny_peft_model("llama"))


def test_unpatch_restores_peft_exactly():
    model = tiny_peft_model("llama")
    reference = copy.deepcopy(model)
    classes = {n: type(m) for n, m in model.named_modules()}
    coto_kernels.patch(model, seed=0, initial_p=0.0)
    assert isinstance(model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj"), CoToLinear)
    coto_kernels.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert "coto_controller" not in model.__dict__
    batch = batch_for("llama")
    torch.testing.assert_close(model(**batch).loss, reference(**batch).loss)
    coto_kernels.patch(model, seed=0)  # patchable again


def test_saved_adapter_is_byte_identical_to_vanilla_peft_and_loads_there(tmp_path):
    model = tiny_peft_model("llama")
    vanilla = copy.deepcopy(model)
    coto_kernels.patch(model, seed=0)
    model.save_pretrained(tmp_path / "coto")
    vanilla.save_pretrained(tmp_path / "vanilla")
    weights = "adapter_model.safetensors"
    assert (tmp_path / "coto" / weights).read_bytes() == (tmp_path / "vanilla" / weights).read_bytes()
    assert read_adapter_config(tmp_path / "coto") == read_adapter_config(tmp_path / "vanilla")
    from helpers import tiny_model

    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "coto").eval()
    batch = batch_for("llama")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, vanilla.eval()(**batch).logits)


def test_model_holding_lora_layers_without_peftmodel_wrapper():
    from helpers import tiny_model

    base = tiny_model("llama")
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    inner = peft_model.base_model.model  # plain transformers model holding LoRA layers
    controller = coto_kernels.patch(inner, seed=0)
    assert controller.groups == ["model.layers.0", "model.layers.1", "model.layers.2"]


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_keeps_truncation_and_gradients(reentrant):
    model = tiny_peft_model("llama", num_layers=4)
    plain = copy.deepcopy(model)
    controller = coto_kernels.patch(model, seed=0)
    coto_kernels.patch(plain, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    gates = [False, True, False, True]
    controller.set_override(gates)
    plain.coto_controller.set_override(gates)
    embed_out_requires_grad = []  # block 0 is off, so its input is the embedding output as transformers left it
    blocks_of(model)[0].register_forward_pre_hook(
        lambda mod, args: embed_out_requires_grad.append(args[0].requires_grad)
    )
    batch = batch_for("llama")
    model(**batch).loss.backward()
    plain(**batch).loss.backward()
    assert embed_out_requires_grad == [False]  # no forced input grad at the embeddings: truncation kept
    reference = lora_grads(plain)
    for name, grad in lora_grads(model).items():
        if reference[name] is None:
            assert grad is None, name
        else:
            torch.testing.assert_close(grad, reference[name], rtol=1e-5, atol=1e-7, msg=name)
    assert sum(g is not None for g in reference.values()) == 2 * 7 * 2  # 2 blocks on, A and B
    coto_kernels.unpatch(model)  # the embedding hook transformers asked for comes back
    model(**batch)
    assert embed_out_requires_grad[-1] is True


def test_autocast_matches_peft_under_autocast():
    ref = tiny_peft_model("llama")
    ours = copy.deepcopy(ref)
    coto_kernels.patch(ours, schedule="off", seed=0)
    batch = batch_for("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss = ref(**batch).loss
        loss = ours(**batch).loss
    ref_loss.backward()
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=0)
    ref_grads = lora_grads(ref)
    for name, grad in lora_grads(ours).items():
        assert grad.dtype == torch.float32  # fp32 adapters keep fp32 gradients
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grad, ref_grads[name], rtol=0.1, atol=0.05 * scale, msg=name)


def test_multihead_attention_adapter_switches_with_its_nested_out_proj():
    """PEFT's MultiheadAttention LoRA holds a nested lora.Linear for out_proj: one gate for both, so every gate
    draw that leaves a group on gives a loss with a gradient, and exactly the on adapters get one."""
    import itertools

    class AttentionThenLinear(torch.nn.Module):  # PEFT's ModelMha
        def __init__(self):
            super().__init__()
            self.mha = torch.nn.MultiheadAttention(10, 2)
            self.lin0 = torch.nn.Linear(10, 2)

        def forward(self, x):
            return self.lin0(self.mha(x, x, x)[0]).log_softmax(-1)

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(AttentionThenLinear(), LoraConfig(target_modules=["mha", "lin0"],
                                                                 init_lora_weights=False))
        controller = coto_kernels.patch(model, total_steps=10, seed=0)
    assert controller.groups == ["base_model.model.lin0", "base_model.model.mha"]
    for gates in itertools.product([False, True], repeat=2):
        if not any(gates):
            continue
        controller.set_override(list(gates))
        model(torch.randn(5, 10)).sum().backward()
        for name, param in model.named_parameters():
            if param.requires_grad:
                on = gates[0] if ".lin0." in name else gates[1]
                assert (param.grad is not None) == on, name
        model.zero_grad(set_to_none=True)
