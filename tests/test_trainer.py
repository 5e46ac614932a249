"""The CoTo callback inside a real ``transformers.Trainer`` (tiny model, tiny synthetic dataset, CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import tiny_model, tiny_peft_model
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


def _assert_drives_the_schedule(log, controller, *, seed: int, steps: int, accumulation: int) -> None:
    """Each optimizer step's micro-batches ran with that step's documented gates; p ramped to 1 by the end."""
    train = [entry for entry in log if entry[0]]
    assert [step for _, step, _, _ in train] == [s for s in range(steps) for _ in range(accumulation)]
    assert controller.total_steps == steps and controller.global_step == steps and controller.p == 1.0
    for _, step, gates, layer_on in train:
        p = coto_kernels.activation_probability(step, steps)
        assert list(gates) == draw_gates(4, p, seed=seed, step=step)  # the documented sampler, nothing else
        assert layer_on == tuple(g for g in gates for _ in range(7))  # 7 adapted projections per block
    assert len({gates for _, _, gates, _ in train}) >= 2  # the gates do change between steps


def test_callback_redraws_per_optimizer_step_and_accumulation_shares_a_draw(tmp_path):
    model = tiny_peft_model("llama", num_layers=4)
    controller = coto_kernels.patch(model, seed=3)
    log = _record_forwards(model, controller)
    trainer = _train(tmp_path, model, controller)
    trainer.train()
    _assert_drives_the_schedule(log, controller, seed=3, steps=6, accumulation=2)
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


def test_resume_with_a_new_max_steps_re_ramps_p_against_the_new_total(tmp_path):
    model = tiny_peft_model("llama", num_layers=4)
    controller = coto_kernels.patch(model, seed=2)
    _train(tmp_path, model, controller, save_strategy="steps", save_steps=3, max_steps=6).train()
    resumed = tiny_peft_model("llama", num_layers=4)
    resumed_controller = coto_kernels.patch(resumed, seed=9)
    log = _record_forwards(resumed, resumed_controller)
    trainer = _train(tmp_path, resumed, resumed_controller, save_strategy="no", max_steps=12)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    steps = sorted({step for training, step, _, _ in log if training})
    assert steps == list(range(3, 12)) and resumed_controller.total_steps == 12
    for training, step, gates, _ in log:
        if training:  # the saved seed, continued from step 3, with p on the 12-step ramp
            assert list(gates) == draw_gates(4, coto_kernels.activation_probability(step, 12), seed=2, step=step)
    assert coto_kernels.activation_probability(4, 12) != coto_kernels.activation_probability(4, 6)


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


# -- one line: the callback patches the model the Trainer builds ------------------------------------------------


def test_one_line_callback_patches_the_trainers_model_and_drives_it(tmp_path):
    model = tiny_peft_model("llama", num_layers=4)  # not patched: the callback does it at on_init_end
    callback = coto_kernels.CoToCallback(seed=3, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_Tokens(), callbacks=[callback])
    controller = model.coto_controller
    assert callback.controller is controller and controller.seed == 3
    log = _record_forwards(model, controller)
    trainer.train()
    _assert_drives_the_schedule(log, controller, seed=3, steps=6, accumulation=2)


def test_callback_options_are_checked_at_construction_and_never_ignored(tmp_path):
    with pytest.raises(TypeError, match=r"\['sed'\]"):
        coto_kernels.CoToCallback(sed=3)
    with pytest.raises(ValueError, match="initial_p"):
        coto_kernels.CoToCallback(initial_p=2.0)
    model = tiny_peft_model("llama", num_layers=2)
    controller = coto_kernels.patch(model, seed=1)
    with pytest.raises(ValueError, match="either a controller"):
        coto_kernels.CoToCallback(controller, seed=2)
    with pytest.raises(RuntimeError, match="already patched"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, args=_args(tmp_path), train_dataset=_Tokens(),
                callbacks=[coto_kernels.CoToCallback(seed=2)])
    # without options it takes the controller it finds on the model
    callback = coto_kernels.CoToCallback()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, args=_args(tmp_path), train_dataset=_Tokens(), callbacks=[callback])
    assert callback.controller is controller


LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _offline_tokenizer():
    """A word-level tokenizer over the tiny models' 97 ids, built without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, 97)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def test_trl_sft_trainer_with_peft_config_gets_coto_from_one_callback(tmp_path):
    """TRL's SFTTrainer wraps the model in PEFT inside its constructor: the callback is the only way in."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from peft import LoraConfig

    generator = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(3, 97, (12,), generator=generator)) for _ in range(16)]
    lora = LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules=LLAMA_PROJECTIONS)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3,
                         report_to=[], logging_steps=100, save_strategy="no", use_cpu=True, dataloader_num_workers=0,
                         disable_tqdm=True, max_length=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(model=tiny_model("llama", num_layers=4), args=args, peft_config=lora,
                                 train_dataset=datasets.Dataset.from_dict({"text": texts}),
                                 processing_class=_offline_tokenizer(),
                                 callbacks=[coto_kernels.CoToCallback(seed=3)])
    controller = trainer.model.coto_controller  # patched at on_init_end, after TRL built the PeftModel
    log = _record_forwards(trainer.model, controller)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    _assert_drives_the_schedule(log, controller, seed=3, steps=4, accumulation=1)
