"""Two ways of running the same patched model, and the floor, timed step by step in one process.

``coto-bench`` runs its modes in rounds of several steps; on the 2-core VMs its ratios move by 5-7 points from one
run to the next, more than most changes. This A/B interleaves single training steps of

- ``a``: the model patched with ``PATCH_A`` options (default: ``fuse_siblings=True``),
- ``b``: the same initial model patched with ``PATCH_B`` (default: ``fuse_siblings=False``),
- ``floor``: the frozen-base limit of ``coto-bench`` (adapters disabled, input gradients through every block),

on the same batch, all at p = 1, and reports each median and its ratio to the floor's. Before timing, it checks
that ``a`` and ``b`` give the same loss and gradients on one step (after a forward that lets sibling groups form).

    python -m bench.side_by_side                      # small preset, dropout 0.05, 16 rounds
    python -m bench.side_by_side --lora-dropout 0 --rounds 20
    python -m bench.side_by_side --dora --lora-dropout 0
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import coto_kernels
from coto_kernels.bench import PRESETS, Runner, add_lora, build_model

PATCH_A = dict(fuse_siblings=True)
PATCH_B = dict(fuse_siblings=False)


def _patched_runner(base: torch.nn.Module, seed: int, **options) -> Runner:
    runner = Runner("vanilla", base, 1, "auto", seed)  # a plain PEFT copy, patched here with the options under test
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        coto_kernels.patch(runner.model, seed=seed, schedule="off", **options)
    runner.mode = "coto-p1"
    return runner


def _check_same_step(a: Runner, b: Runner, batch: dict[str, torch.Tensor]) -> float:
    """Largest gradient difference between ``a`` and ``b`` over one step (same dropout seeds)."""
    for runner in (a, b):
        with torch.no_grad():
            runner.loss(batch)  # sibling groups form on a first forward
        torch.manual_seed(1)
        runner.loss(batch).backward()
    grads_b = dict(b.model.named_parameters())
    difference = max((p.grad - grads_b[n].grad).abs().max().item()
                     for n, p in a.model.named_parameters() if p.grad is not None)
    for runner in (a, b):
        runner.optimizer.zero_grad(set_to_none=True)
    return difference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dora", action="store_true", help="DoRA adapters (use_dora=True) instead of LoRA")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    base = add_lora(build_model(preset, torch.device("cpu"), torch.float32, args.seed), args.rank, args.lora_dropout,
                    dora=args.dora)
    runners = {"a": _patched_runner(base, args.seed, **PATCH_A), "b": _patched_runner(base, args.seed, **PATCH_B),
               "floor": Runner("floor", base, 1, "auto", args.seed)}
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, preset["vocab"], (preset["batch"], preset["seq"]), generator=generator)
    batch = dict(input_ids=ids, labels=ids)
    print(f"max |grad a - grad b| after one step: {_check_same_step(runners['a'], runners['b'], batch):.3g}")
    for runner in runners.values():
        for _ in range(2):
            runner.train_step(batch)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner.train_step(batch)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    adapter = "DoRA" if args.dora else "LoRA"
    print(f"a = {PATCH_A}, b = {PATCH_B}; {args.preset}, {adapter}, dropout {args.lora_dropout}, {args.rounds} rounds")
    for name, median in medians.items():
        print(f"{name:6s} median step {median:.4f} s   / floor {median / medians['floor']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
