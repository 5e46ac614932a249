"""The CoTo callback inside a real ``transformers.Trainer`` (tiny model, tiny synthetic dataset, CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import tiny_peft_model
from transformers import Trainer, TrainingArguments

import coto_kernels
from coto_kernels import draw_gates


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, seq: int = 8) -> None:
        self.ids = torch.randint(3, 97, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(tmp_path, **overrides) -> TrainingArguments:
    options = dict(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2,
                   gradient_accumulation_steps=2, learning_rate=1e-3, report_to=[], logging_steps=100,
                   save_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    options.update(overrides)
    return TrainingArguments(**options)


def _record_forwards(model, controller):
    """(global step, gates, every layer on?) for each training forward, i.e. each micro-batch."""
    log = []

    def hook(module, args, kwargs):
        layers = [m for m in module.modules() if hasattr(m, "coto_is_on")]
        log.append((module.training, controller.global_step, tuple(controller.gates),
                    tuple(m.coto_is_on() for m in layers)))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return log


def _train(tmp_path, model, controller, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=model, args=_args(tmp_path, **overrides), train_dataset=_Tokens(),
                          eval_dataset=_Tokens(8), callbacks=[controller.callback()])
    return trainer


def test_callback_redraws_per_optimizer_step_and_accumulation_shares_a_draw(tmp_path):
    model = tiny_peft_model("llama", num_layers=4)
    controller = coto_kernels.patch(model, seed=3)
    log = _record_forwards(model, controller)
    trainer = _train(tmp_path, model, controller)
    trainer.train()
    train = [entry for entry in log if entry[0]]
    assert [step for _, step, _, _ in train] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert controller.total_steps == 6 and controller.global_step == 6
    for _, step, gates, layer_on in train:
        p = coto_kernels.activation_probability(step, 6)
        assert list(gates) == draw_gates(4, p, seed=3, step=step)  # the documented sampler, nothing else
        assert layer_on == tuple(g for g in gates for _ in range(7))  # 7 adapted projections per block
    assert train[0][2] != train[2][2] or train[2][2] != train[4][2]  # the gates do change between steps
    # evaluation: model.eval(), every adapter on, whatever the gates
    trainer.evaluate()
    evaluation = [entry for entry in log if not entry[0]]
    assert evaluation and all(all(layer_on) for _, _, _, layer_on in evaluation)


def test_gated_off_adapters_get_no_update_in_the_trainer(tmp_path):
    model = tiny_peft_model("llama", num_layers=4)
    controller = coto_kernels.patch(model, seed=0, initial_p=0.0, schedule=lambda step, total: 0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    gates = list(controller.gates)
    trainer = _train(tmp_path, model, controller, max_steps=1, gradient_accumulation_steps=1, weight_decay=0.1)
    trainer.train()
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    on_block = gates.index(True)
    assert changed and all(f".layers.{on_block}." in n for n in changed)


def test_resume_from_checkpoint_continues_the_same_schedule(tmp_path):
    model = tiny_peft_model("llama", num_layers=4)
    torch.manual_seed(11)
    controller = coto_kernels.patch(model)  # unseeded: the seed must come back from the checkpoint
    log = _record_forwards(model, controller)
    _train(tmp_path, model, controller, save_strategy="steps", save_steps=3).train()
    uninterrupted = [(step, gates) for training, step, gates, _ in log if training and step >= 3]

    resumed_model = tiny_peft_model("llama", num_layers=4)
    torch.manual_seed(12)
    resumed_controller = coto_kernels.patch(resumed_model)
    assert resumed_controller.seed != controller.seed
    resumed_log = _record_forwards(resumed_model, resumed_controller)
    trainer = _train(tmp_path, resumed_model, resumed_controller, save_strategy="steps", save_steps=3)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert resumed_controller.seed == controller.seed
    assert [(step, gates) for training, step, gates, _ in resumed_log if training] == uninterrupted


@pytest.mark.parametrize("restore", [True, False])
def test_restore_callback_states_option_keeps_working(tmp_path, restore):
    model = tiny_peft_model("llama", num_layers=2)
    controller = coto_kernels.patch(model, seed=5)
    _train(tmp_path, model, controller, save_strategy="steps", save_steps=3, max_steps=3).train()
    resumed = tiny_peft_model("llama", num_layers=2)
    resumed_controller = coto_kernels.patch(resumed, seed=6)
    trainer = _train(tmp_path, resumed, resumed_controller, save_strategy="no", max_steps=5,
                     restore_callback_states_from_checkpoint=restore)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert resumed_controller.seed == 5 and resumed_controller.global_step == 5
