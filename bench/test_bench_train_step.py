"""pytest-benchmark cases: one training step of vanilla PEFT LoRA vs CoTo-patched LoRA (``make bench-pytest``).

The same comparisons as ``coto-bench``, on its ``tiny`` preset by default (``COTO_BENCH_PRESET=small`` for the
CPU-sized model). Compare the medians of one run: ``pytest bench --benchmark-only --benchmark-group-by=param``.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from coto_kernels.bench import MODES, PRESETS, Runner, add_lora, build_model

PRESET = os.environ.get("COTO_BENCH_PRESET", "tiny")


@pytest.fixture(scope="module")
def base_and_batch():
    preset = PRESETS[PRESET]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = add_lora(build_model(preset, device, dtype, seed=0), rank=16, dropout=0.05)
    ids = torch.randint(0, preset["vocab"], (preset["batch"], preset["seq"]), device=device)
    return base, {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("mode", MODES)
def test_train_step(benchmark, base_and_batch, mode):
    base, batch = base_and_batch
    runner = Runner(mode, base, total_steps=20, backend="auto", seed=0)
    benchmark.group = f"train step ({PRESET})"
    benchmark.pedantic(runner.train_step, args=(batch,), rounds=10, warmup_rounds=1)
