"""What gradient checkpointing costs and saves with CoTo, per checkpointing mode and gate pattern.

For each checkpointing mode (``none``, ``reentrant``, ``non-reentrant``) and gate pattern (all blocks on, top
half, top block, bottom block only) it times one forward + backward of a CoTo-patched Llama-style model and
reports:

- ``blocks in backward``: blocks whose output is part of the autograd graph. CoTo's truncation keeps the blocks
  below the lowest active adapter out of it, so they neither run backward nor (checkpointed) recompute;
- ``held MB``: peak CUDA memory on a GPU; on the CPU, bytes autograd keeps for backward after the forward;
- for reentrant checkpointing also ``forced input grads``: what PEFT/Transformers' ``enable_input_require_grads``
  (which reentrant checkpointing needs, and which ``patch`` replaces by per-block hooks) would do: every block
  back in the graph.

    OMP_NUM_THREADS=1 python -m bench.bench_checkpointing  # preset "small": ~1 min on a shared CPU core
    python -m bench.bench_checkpointing --preset medium --device cuda --out results
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import coto_kernels
from coto_kernels import benchmarking
from coto_kernels.bench import add_lora, build_model

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden=32, intermediate=64, layers=4, heads=2, vocab=64, seq=16, batch=1, repeats=1),
    "small": dict(hidden=192, intermediate=512, layers=6, heads=4, vocab=256, seq=128, batch=2, repeats=2),
    "medium": dict(hidden=1024, intermediate=2816, layers=8, heads=16, vocab=4096, seq=512, batch=4, repeats=5),
}
CHECKPOINTING = ("none", "reentrant", "non-reentrant")


def gate_patterns(layers: int) -> dict[str, list[bool]]:
    """Named gate patterns over ``layers`` blocks."""
    return {
        "all on": [True] * layers,
        "top half": [i >= layers // 2 for i in range(layers)],
        "top block": [i == layers - 1 for i in range(layers)],
        "bottom block": [i == 0 for i in range(layers)],
    }


@dataclass
class Row:
    checkpointing: str
    gates: str
    input_grads: str
    median_step_s: float
    blocks_in_backward: int
    held_mb: float


def _blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.get_submodule("base_model.model.model.layers")


def _measure(model, controller, gates, batch, device, repeats: int) -> tuple[float, int, float]:
    controller.set_override(gates)
    in_graph: list[bool] = []
    hooks = [b.register_forward_hook(lambda m, a, out: in_graph.append(
        (out[0] if isinstance(out, tuple) else out).requires_grad)) for b in _blocks(model)]
    times = []
    for i in range(repeats + 1):  # the first is a warm-up
        in_graph.clear()
        benchmarking.synchronize(device)
        start = time.perf_counter()
        model(**batch).loss.backward()
        benchmarking.synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    blocks = sum(in_graph)
    for h in hooks:
        h.remove()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        model(**batch).loss.backward()
        benchmarking.synchronize(device)
        held = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        with benchmarking.saved_activation_meter(model) as total:
            loss = model(**batch).loss
        loss.backward()
        held = total[0] / 2**20
    model.zero_grad(set_to_none=True)
    return statistics.median(times), blocks, held


def checkpointing_benchmark(preset: str | dict = "small", device: str = "cpu", dtype: torch.dtype = torch.float32,
                            seed: int = 0, modes=CHECKPOINTING, verbose: bool = False) -> list[Row]:
    """Run the table described in the module docstring; returns one ``Row`` per measurement."""
    config = PRESETS[preset] if isinstance(preset, str) else preset
    dev = torch.device(device)
    base = add_lora(build_model(config, dev, dtype, seed), rank=16, dropout=0.0)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config["vocab"], (config["batch"], config["seq"]), generator=generator).to(dev)
    batch = {"input_ids": ids, "labels": ids}
    rows = []
    for mode in modes:
        variants = ["coto"] + (["forced"] if mode == "reentrant" else [])
        for input_grads in variants:
            model = copy.deepcopy(base)
            model.train()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                controller = coto_kernels.patch(model, seed=seed, schedule="off")
                if mode != "none":
                    model.gradient_checkpointing_enable(
                        gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
            if input_grads == "forced":  # what enable_input_require_grads does when CoTo does not take it over
                model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
            for name, gates in gate_patterns(config["layers"]).items():
                step_s, blocks, held = _measure(model, controller, gates, batch, dev, config["repeats"])
                rows.append(Row(mode, name, input_grads, step_s, blocks, held))
                if verbose:
                    print(f"{mode:>13} | {name:>12} | {input_grads:>6} | {step_s:.3f} s | {blocks} blocks | "
                          f"{held:.1f} MB", file=sys.stderr, flush=True)
            del model
    return rows


def to_markdown(rows: list[Row], device: str) -> str:
    memory = "peak CUDA MB" if device.startswith("cuda") else "MB held for backward"
    return benchmarking.markdown_table(
        ["checkpointing", "gates", "input grads", "step s", "blocks in backward", memory],
        [[r.checkpointing, r.gates, r.input_grads, f"{r.median_step_s:.3f}", r.blocks_in_backward, f"{r.held_mb:.1f}"]
         for r in rows],
    )


def write_files(args: argparse.Namespace, rows: list[Row], table: str) -> list[Path]:
    """checkpointing-<preset>-<date>.json / .md in ``args.out`` (the writer every benchmark uses)."""
    date = benchmarking.utc_timestamp()
    device = benchmarking.device_name(torch.device(args.device))
    report = {"date": date, "device": device, "versions": benchmarking.environment(), "preset": args.preset,
              "config": {**PRESETS[args.preset], "dtype": args.dtype}, "rows": [asdict(r) for r in rows]}
    title = f"# Gradient checkpointing with CoTo, preset `{args.preset}`\n\n{date} on {device}\n\n"
    stem = f"checkpointing-{args.preset}-{benchmarking.file_stamp(date)}"
    return benchmarking.write_report(args.out, stem, report, title + table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_checkpointing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--modes", nargs="+", choices=CHECKPOINTING, default=list(CHECKPOINTING))
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a markdown table")
    parser.add_argument("--out", type=Path, help="also write checkpointing-<preset>-<date>.json / .md here")
    args = parser.parse_args(argv)
    rows = checkpointing_benchmark(args.preset, args.device, getattr(torch, args.dtype), modes=args.modes,
                                   verbose=True)
    table = to_markdown(rows, args.device)
    print(json.dumps([asdict(r) for r in rows], indent=1) if args.json else table)
    if args.out is not None:
        for path in write_files(args, rows, table):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
