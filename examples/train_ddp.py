"""CoTo with the Transformers Trainer on several processes (DDP), e.g. 2 CPU processes with gloo:

    python examples/train_ddp.py --cpu                                      # one process, tiny model
    torchrun --nproc-per-node 2 examples/train_ddp.py --cpu                 # 2 CPU processes, gloo
    accelerate launch --multi_gpu --num_processes 2 examples/train_ddp.py --cpu   # the same through accelerate
    torchrun --nproc-per-node 8 examples/train_ddp.py --model meta-llama/Llama-3.2-1B --bf16
    accelerate launch --multi_gpu --num_processes 8 examples/train_ddp.py --model meta-llama/Llama-3.2-1B --bf16

``accelerate launch --cpu`` starts ONE process whatever ``--num_processes`` says (accelerate runs several CPU
processes only through mpirun); ``--multi_gpu`` launches through torchrun, which works for CPU processes too
when the script asks for the CPU (``--cpu`` here: ``TrainingArguments(use_cpu=True)``, gloo).

Without ``--model`` a tiny Llama is built from a config (random weights, nothing downloaded) and trained on
random tokens. The recipe is the same for any PEFT LoRA model:

    controller = coto_kernels.patch(peft_model, seed=0)              # before the Trainer wraps it in DDP
    trainer = Trainer(model=peft_model, args=args, callbacks=[controller.callback()], ...)

The Trainer builds DDP with ``find_unused_parameters=True`` for a PeftModel by default, which is what CoTo
needs (a gated-off adapter is an unused parameter); the callback raises at construction if it would not be.
"""

from __future__ import annotations

import argparse
import gc
import os
import warnings

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

import coto_kernels


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int) -> None:
        self.ids = torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build(model_name: str | None) -> tuple[torch.nn.Module, int]:
    if model_name:
        model = AutoModelForCausalLM.from_pretrained(model_name, dtype=torch.bfloat16)
        return model, model.config.vocab_size
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config), config.vocab_size


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a Hugging Face causal LM (default: a tiny random Llama)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2, help="per-device batch size")
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU (gloo)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--output-dir", default="coto-ddp-example")
    return parser.parse_args()


def train(args: argparse.Namespace, world_size: int) -> tuple[torch.Tensor, str]:
    """Trains with CoTo; returns the flattened adapter weights and a line on the run."""
    model, vocab = build(args.model)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    # patch BEFORE the Trainer wraps the model; seed=None would take rank 0's seed once the process group exists
    controller = coto_kernels.patch(model, seed=0)
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=1e-3, weight_decay=0.01, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=args.cpu,
        # gloo for CPU processes; only under a launcher (one process has no process group to give a backend to)
        ddp_backend="gloo" if args.cpu and world_size > 1 else None, bf16=args.bf16, dataloader_num_workers=0,
        **({"gradient_checkpointing": True} if args.gradient_checkpointing else {}),
        # ddp_find_unused_parameters=True is the Trainer's default for a PeftModel; set it explicitly if you
        # pass a transformers model with adapters added through model.add_adapter and gradient checkpointing.
        ddp_find_unused_parameters=True,
    )
    data = RandomTokens(n=args.steps * args.batch * world_size, seq=args.seq, vocab=vocab)
    trainer = Trainer(model=model, args=training_args, train_dataset=data,
                      callbacks=[controller.callback(check_gates_every=1)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.train()
    lora = torch.cat([p.detach().float().flatten() for n, p in model.named_parameters() if "lora_" in n])
    return lora, f"CoTo after {trainer.state.global_step} steps on {world_size} processes: {controller}"


def main() -> None:
    args = parse_args()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    lora, summary = train(args, world_size)
    if dist.is_initialized():
        # The Trainer's DDP wrapper must be freed while the process group lives: left to interpreter exit, gloo's
        # threads abort the process now and then ("terminate called without an active exception", ~1 run in 6
        # on 2 CPU processes), and destroying the group first hangs as often. train() has returned; collect its
        # cycles, then check and shut down on every rank together.
        gc.collect()
        # every rank holds the same adapter weights (DDP), and CoTo drew the same gates on every rank (checked above)
        gathered = [torch.empty_like(lora) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, lora)
        assert all(torch.equal(g, gathered[0]) for g in gathered), "ranks ended with different adapter weights"
        dist.barrier()
        dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary)
        print(f"adapter checksum {float(lora.double().sum()):.10f}")


if __name__ == "__main__":
    main()
