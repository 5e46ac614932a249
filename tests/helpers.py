"""Shared test helpers: tiny Hugging Face models built from configs (random weights, no downloads) and batches.

Imported by the tests as ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``); fixtures that use
them live in ``conftest.py``.
"""

from __future__ import annotations

import warnings

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    RobertaConfig,
)

ARCHS = ("llama", "qwen2", "mistral", "gpt2", "bert", "roberta")

_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "value"],
}


def tiny_model(arch: str, num_layers: int = 3, seed: int = 0, init_std: float = 0.02) -> torch.nn.Module:
    """A randomly initialised model of ``arch`` small enough for a CPU test.

    ``init_std`` is the config's ``initializer_range``: the default 0.02 gives near-zero logits (loss ~ ln V
    whatever the adapters do); a training test raises it so that the loss depends on the weights.
    """
    torch.manual_seed(seed)
    common = dict(vocab_size=97, num_hidden_layers=num_layers, num_attention_heads=2, initializer_range=init_std)
    decoder = dict(hidden_size=32, intermediate_size=48, num_key_value_heads=1, max_position_embeddings=64)
    if arch == "llama":
        return AutoModelForCausalLM.from_config(LlamaConfig(**common, **decoder))
    if arch == "qwen2":
        return AutoModelForCausalLM.from_config(Qwen2Config(**common, **decoder))
    if arch == "mistral":
        return AutoModelForCausalLM.from_config(MistralConfig(**common, **decoder, sliding_window=None))
    if arch == "gpt2":
        config = GPT2Config(vocab_size=97, bos_token_id=0, eos_token_id=0, n_layer=num_layers, n_head=2, n_embd=32,
                            n_positions=64, initializer_range=init_std, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return AutoModelForCausalLM.from_config(config)
    encoder = dict(hidden_size=32, intermediate_size=48, max_position_embeddings=64, num_labels=3,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    if arch == "bert":
        return AutoModelForSequenceClassification.from_config(BertConfig(**common, **encoder))
    if arch == "roberta":
        return AutoModelForSequenceClassification.from_config(
            RobertaConfig(**common, **encoder, pad_token_id=1, bos_token_id=0, eos_token_id=2)
        )
    raise ValueError(arch)


def tiny_peft_model(arch: str = "llama", *, num_layers: int = 3, r: int = 4, dropout: float = 0.0, seed: int = 0,
                    init_std: float = 0.02, **lora_kwargs) -> torch.nn.Module:
    """``tiny_model`` wrapped in PEFT LoRA with nonzero B, so every gradient path is exercised."""
    model = tiny_model(arch, num_layers, seed, init_std)
    task = "SEQ_CLS" if arch in ("bert", "roberta") else "CAUSAL_LM"
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=_TARGETS[arch],
                        task_type=task, **lora_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out notice for GPT-2
        peft_model = get_peft_model(model, config)
    torch.manual_seed(seed + 1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # PEFT initialises B to zero; make the update nonzero
            torch.nn.init.normal_(param, std=0.1)
    return peft_model


def batch_for(arch: str, batch: int = 2, seq: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (batch, seq), generator=generator)
    if arch in ("bert", "roberta"):
        return {"input_ids": ids, "labels": torch.randint(0, 3, (batch,), generator=generator)}
    return {"input_ids": ids, "labels": ids.clone()}


def read_adapter_config(folder) -> dict:
    """``adapter_config.json`` of a saved adapter, ``target_modules`` sorted: PEFT writes them from a set, whose
    order varies with the hash seed, so two identical configs can differ byte for byte."""
    import json
    from pathlib import Path

    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    return config


def assert_trainable_grads_match(model: torch.nn.Module, ref: torch.nn.Module, *, rtol: float = 1e-4,
                                 atol: float = 1e-6) -> None:
    """Every trainable parameter of ``model`` has ``ref``'s gradient (None where ``ref``'s is None)."""
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if ref_grads[name] is None:
            assert param.grad is None, name
        else:
            torch.testing.assert_close(param.grad, ref_grads[name], rtol=rtol, atol=atol, msg=name)


def check_patch_matches_peft(arch: str, backend: str, device: str = "cpu") -> None:
    """``patch(backend=...)`` against vanilla PEFT: loss and every trainable gradient with all adapters on; then
    with block 0 gated off its adapters get no gradient."""
    import copy

    import coto_kernels

    ref = tiny_peft_model(arch, num_layers=2).to(device)
    ours = copy.deepcopy(ref)
    controller = coto_kernels.patch(ours, backend=backend, seed=0, initial_p=0.0)
    controller.set_override([True, True])
    batch = {k: v.to(device) for k, v in batch_for(arch, batch=2, seq=5).items()}
    ref_loss = ref(**batch).loss
    ref_loss.backward()
    loss = ours(**batch).loss
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert_trainable_grads_match(ours, ref)
    ours.zero_grad(set_to_none=True)
    controller.set_override([False, True])
    ours(**batch).loss.backward()
    assert all(p.grad is None for n, p in ours.named_parameters() if ".0." in n and "lora_" in n)
