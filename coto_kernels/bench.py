"""``coto-bench``: vanilla PEFT LoRA against CoTo-patched LoRA, side by side, on a built-in Llama-style model.

The model is built from a config (random weights, nothing downloaded). Every mode trains its own copy of the
same initial model with fused AdamW (``torch.optim.AdamW(fused=True)``, the Hugging Face ``Trainer``'s default
optimizer ``adamw_torch_fused``) on the same random token batches; the modes run interleaved in rounds so that
drift on a noisy machine hits them all alike, and every ratio comes from this one run.

Modes: ``vanilla`` (PEFT as is), ``coto-p1`` (patched, every adapter on: the fused kernels alone),
``coto-p0.5`` and ``coto-p0.1`` (constant p), ``coto-schedule`` (the full CoTo schedule, p rising from 0.1 to
1 over the first 75% of this mode's steps, so its mean covers a whole run), ``floor`` (the frozen-base limit: the
same PEFT model with its adapters disabled and input gradients on, so the frozen-base forward and the dX backward
run through every block and no LoRA math at all; every mode is also reported as a multiple of it).

    python -m coto_kernels.bench                     # default preset "small": 1-3 minutes on 2 CPU cores
    python -m coto_kernels.bench --dora              # the same with PEFT DoRA adapters (use_dora=True)
    python -m coto_kernels.bench --preset medium --device cuda
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .benchmarking import (
    device_name,
    environment,
    file_stamp,
    markdown_table,
    saved_activation_meter,
    synchronize,
    utc_timestamp,
)
from .benchmarking import write_report as write_report_files
from .functional import BACKENDS

PRESETS: dict[str, dict[str, int]] = {
    # name: hidden, intermediate, layers, heads, vocab, seq, batch, rounds, steps per round
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=2, vocab=128, seq=32, batch=2, rounds=2, steps=2),
    "small": dict(hidden=512, intermediate=1376, layers=8, heads=8, vocab=1024, seq=256, batch=2, rounds=5, steps=4),
    "medium": dict(hidden=1024, intermediate=2816, layers=8, heads=16, vocab=4096, seq=512, batch=4, rounds=4,
                   steps=5),
    "large": dict(hidden=2048, intermediate=5632, layers=16, heads=16, vocab=32000, seq=1024, batch=8, rounds=5,
                  steps=10),
}
MODES = ("vanilla", "coto-p1", "coto-p0.5", "coto-p0.1", "coto-schedule", "floor")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModeResult:
    mode: str
    median_step_s: float
    mean_step_s: float
    tokens_per_s: float
    throughput_vs_vanilla: float
    step_vs_floor: float
    """Mean step time / the floor mode's (1.0 = no cost over the frozen base; nan without a floor run)."""
    mean_active_fraction: float
    memory_mb: float


def build_model(preset: dict[str, int], device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=preset["vocab"], hidden_size=preset["hidden"], intermediate_size=preset["intermediate"],
        num_hidden_layers=preset["layers"], num_attention_heads=preset["heads"],
        num_key_value_heads=preset["heads"], max_position_embeddings=preset["seq"],
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype)


def add_lora(model: torch.nn.Module, rank: int, dropout: float, dora: bool = False) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=TARGET_MODULES,
                        task_type="CAUSAL_LM", use_dora=dora)
    return get_peft_model(model, config)


def _mode_schedule(mode: str, total_steps: int) -> dict:
    if mode == "coto-p1":
        return dict(schedule="off")
    if mode == "coto-schedule":
        return dict(total_steps=total_steps)
    p = float(mode.removeprefix("coto-p"))
    return dict(schedule=lambda step, total: p, initial_p=p)


class Runner:
    """One mode: its own model copy, optimizer and (for CoTo modes) controller."""

    def __init__(self, mode: str, base: torch.nn.Module, total_steps: int, backend: str, seed: int) -> None:
        import coto_kernels

        self.mode = mode
        self.model = copy.deepcopy(base)
        self.model.train()
        self.controller = None
        if mode == "floor":
            self.model.enable_input_require_grads()  # dX through every block, as under gradient checkpointing
        elif mode != "vanilla":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.controller = coto_kernels.patch(self.model, seed=seed, backend=backend,
                                                     **_mode_schedule(mode, total_steps))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)  # the Trainer's default optimizer
        self.step_times: list[float] = []
        self.active: list[float] = []

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of this mode (the floor runs the frozen base: adapters disabled)."""
        with self.model.disable_adapter() if self.mode == "floor" else nullcontext():
            return self.model(**batch).loss

    def train_step(self, batch: dict[str, torch.Tensor]) -> None:
        loss = self.loss(batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.controller is not None:
            self.active.append(sum(self.controller.gates) / len(self.controller.gates))
            self.controller.step()
        else:
            self.active.append(0.0 if self.mode == "floor" else 1.0)


def measure_memory(runner: Runner, batch: dict[str, torch.Tensor], device: torch.device) -> float:
    """Peak CUDA memory of one step (GPU) or bytes saved for backward (CPU), in MB."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        runner.train_step(batch)
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    with saved_activation_meter(runner.model) as total:
        loss = runner.loss(batch)
    loss.backward()
    runner.model.zero_grad(set_to_none=True)
    return total[0] / 2**20


def _progress(total: int) -> Callable[[str], None]:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        done = [0]

        def advance(label: str) -> None:
            done[0] += 1
            print(f"\r[{done[0]}/{total}] {label:<16}", end="" if done[0] < total else "\n", file=sys.stderr)

        return advance
    bar = tqdm(total=total, unit="step", file=sys.stderr)

    def advance(label: str) -> None:
        bar.set_description(label)
        bar.update(1)
        if bar.n >= total:
            bar.close()

    return advance


def run(
    preset_name: str = "small",
    *,
    modes: tuple[str, ...] = MODES,
    device: str = "auto",
    dtype: str = "auto",
    rank: int = 16,
    lora_dropout: float = 0.05,
    rounds: int | None = None,
    steps: int | None = None,
    warmup: int = 1,
    backend: str = "auto",
    seed: int = 0,
    dora: bool = False,
) -> dict:
    """Run the benchmark and return the report (a JSON-serialisable dict)."""
    preset = dict(PRESETS[preset_name])
    rounds = rounds or preset["rounds"]
    steps = steps or preset["steps"]
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    torch_dtype = {"auto": torch.bfloat16 if dev.type == "cuda" else torch.float32, "float32": torch.float32,
                   "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = add_lora(build_model(preset, dev, torch_dtype, seed), rank, lora_dropout, dora)
    total_steps = rounds * steps
    runners = [Runner(mode, base, total_steps, backend, seed) for mode in modes]
    del base
    generator = torch.Generator().manual_seed(seed)

    def make_batch() -> dict[str, torch.Tensor]:
        ids = torch.randint(0, preset["vocab"], (preset["batch"], preset["seq"]), generator=generator).to(dev)
        return {"input_ids": ids, "labels": ids}

    advance = _progress(len(runners) * (warmup + total_steps))
    for runner in runners:  # warm-up: allocator, kernel caches; memory figures from a separate meter below
        for _ in range(warmup):
            runner.train_step(make_batch())
            advance(runner.mode)
        runner.active.clear()
        if runner.controller is not None:
            runner.controller.set_step(0)
    for _ in range(rounds):
        batches = [make_batch() for _ in range(steps)]
        for runner in runners:
            for batch in batches:
                synchronize(dev)
                start = time.perf_counter()
                runner.train_step(batch)
                synchronize(dev)
                runner.step_times.append(time.perf_counter() - start)
                advance(runner.mode)
    memory = {r.mode: measure_memory(r, make_batch(), dev) for r in runners}
    tokens = preset["batch"] * preset["seq"]
    vanilla_mean = next((statistics.fmean(r.step_times) for r in runners if r.mode == "vanilla"), None)
    floor_mean = next((statistics.fmean(r.step_times) for r in runners if r.mode == "floor"), None)
    results = [
        ModeResult(
            mode=r.mode,
            median_step_s=statistics.median(r.step_times),
            mean_step_s=statistics.fmean(r.step_times),
            tokens_per_s=tokens / statistics.fmean(r.step_times),
            throughput_vs_vanilla=(vanilla_mean / statistics.fmean(r.step_times)) if vanilla_mean else float("nan"),
            step_vs_floor=(statistics.fmean(r.step_times) / floor_mean) if floor_mean else float("nan"),
            mean_active_fraction=statistics.fmean(r.active),
            memory_mb=memory[r.mode],
        )
        for r in runners
    ]
    return {
        "date": utc_timestamp(),
        "device": device_name(dev),
        "memory_metric": "peak CUDA memory per step" if dev.type == "cuda" else "bytes saved for backward",
        "versions": environment(),
        "preset": preset_name,
        "config": {**preset, "rounds": rounds, "steps": steps, "rank": rank, "lora_dropout": lora_dropout, "dora": dora,
                   "dtype": str(torch_dtype), "backend": backend, "targets": TARGET_MODULES},
        "results": [asdict(r) for r in results],
        "step_times": {r.mode: r.step_times for r in runners},
    }


def to_markdown(report: dict) -> str:
    cfg = report["config"]
    header = ["mode", "median step (s)", "mean step (s)", "tokens/s", "throughput vs vanilla", "step / floor",
              "mean active fraction", f"{report['memory_metric']} (MB)"]
    rows = [[r["mode"], f"{r['median_step_s']:.3f}", f"{r['mean_step_s']:.3f}", f"{r['tokens_per_s']:.0f}",
             f"{r['throughput_vs_vanilla']:.2f}x", f"{r.get('step_vs_floor', float('nan')):.2f}",
             f"{r['mean_active_fraction']:.2f}", f"{r['memory_mb']:.0f}"]
            for r in report["results"]]
    lines = [
        f"# coto-bench, preset `{report['preset']}`",
        "",
        f"{report['date']} on {report['device']}; " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        f"Llama-style model: hidden {cfg['hidden']}, {cfg['layers']} layers, seq {cfg['seq']}, batch {cfg['batch']}, "
        f"{cfg['dtype']}; {'DoRA' if cfg.get('dora') else 'LoRA'} r={cfg['rank']}, dropout {cfg['lora_dropout']} "
        f"on all 7 projections; "
        f"{cfg['rounds']} interleaved rounds x {cfg['steps']} steps per mode; fused AdamW.",
        "",
        markdown_table(header, rows),
    ]
    return "\n".join(lines) + "\n"


def plot_throughput(report: dict) -> Callable:
    """The bar chart of throughput vs vanilla per mode (a ``benchmarking.Plot``)."""

    def draw(plt):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar([r["mode"] for r in report["results"]], [r["throughput_vs_vanilla"] for r in report["results"]],
               color="#4c72b0")
        ax.axhline(1.0, color="grey", lw=1, ls="--")
        ax.set_ylabel("throughput vs vanilla PEFT")
        ax.set_title(f"coto-bench ({report['preset']}, {report['device']})", fontsize=9)
        return fig

    return draw


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """Write JSON, Markdown and (with matplotlib) a PNG; return the paths."""
    kind = "-dora" if report["config"].get("dora") else ""
    stem = f"bench-{report['preset']}{kind}-{file_stamp(report['date'])}"
    return write_report_files(out_dir, stem, report, to_markdown(report), {f"{stem}.png": plot_throughput(report)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coto-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--steps", type=int, help="timed steps per mode per round")
    parser.add_argument("--backend", default="auto", choices=list(BACKENDS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dora", action="store_true", help="DoRA adapters (PEFT use_dora=True) instead of LoRA")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}")
    report = run(args.preset, modes=modes, device=args.device, dtype=args.dtype, rank=args.rank,
                 lora_dropout=args.lora_dropout, rounds=args.rounds, steps=args.steps, backend=args.backend,
                 seed=args.seed, dora=args.dora)
    print(to_markdown(report))
    for path in write_report(report, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
