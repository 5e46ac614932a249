"""The one GPU check: full-size parity (the ``gpu``-marked tests), layer timings and an end-to-end training step.

    python bench/gpu_check.py            # on a GPU: <= 8 minutes on a cold Triton cache (make gpu-check)
    python bench/gpu_check.py --quick    # on the CPU under TRITON_INTERPRET=1: tiny shapes, < 1 minute

Run with the package importable (``make gpu-check`` uses the project's venv; elsewhere ``PYTHONPATH=.``).

1. **Parity**: ``pytest -m gpu tests/test_gpu_parity.py`` (full-size shapes against the float64 reference of
   ``tests/reference.py``); the counts go into the report and a failure fails the run.
2. **Layer timings** (bf16, r = 16, K = N = 4096, M in {2048, 8192, 16384}, LoRA dropout 0 and 0.05; forward +
   backward, the input requires grad, the base weight is frozen; ``triton.testing.do_bench`` medians, all
   variants of a shape timed one after the other in this one process):

   * ``base``   ``F.linear`` alone: the frozen base, the floor;
   * ``peft``   ``peft.tuners.lora.layer.Linear`` (nonzero B);
   * ``g1``     ``coto_kernels.functional.lora_linear(backend="triton")``, gate on;
   * ``g0``     the same, gate off;
   * ``torch``  ``lora_linear(backend="torch")``: cuBLAS base GEMMs + the torch backend's in-place low-rank add;
   * ``g1c``    gate on with the base GEMMs on cuBLAS and the low-rank term added by the Triton kernel
     (``cublas_below_m`` above M), when ``lora_linear`` takes that argument;
   * ``native`` ``lora_linear(backend="native")``, when that backend is built here;
   * ``dora``   ``dora_linear(backend="triton")`` (fused DoRA, gate on; with dropout the two-accumulator GEMMs);
   * ``peft-dora`` PEFT's DoRA layer (``use_dora=True``) around the same base.

   Then ``dora_parts``: fused DoRA's extra launches timed alone at the first target shape (row norm, dY pass
   with the column scale and dm's sums, dX GEMM with the scale in its K loop vs LoRA's loop on a stored G).

3. **End-to-end**: ``coto_kernels.bench.run`` on its ``medium`` preset in bf16 (vanilla PEFT, patched p = 1, the
   full CoTo schedule; interleaved rounds), so one run gives the layer table and the end-to-end saving to set
   beside the CoTo authors' 7.2% (LoRA, LLaMA-2-7B).

The final table gives PASS/FAIL per target of issue 9 (r = 16, M >= 8192): ours/PEFT <= 0.80 at dropout 0 and
<= 0.75 at dropout 0.05, ours/base <= 1.12, gate-off/base <= 1.01; and of issue 13: fused DoRA / fused LoRA
<= 1.15 at dropout 0 (with dropout DoRA's formula has two base products, so ~2x is its floor: reported only).
Results (GPU, versions, date, figures) go to ``bench/results/gpu_check-<date>.{md,json}`` and to ``$OUT`` when
it is set.
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if not torch.cuda.is_available():  # --quick: the interpreter must be chosen before Triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from coto_kernels.functional import lora_linear  # noqa: E402
from coto_kernels.functional_dora import dora_linear  # noqa: E402
from coto_kernels.kernels import KERNEL_BACKENDS, native_cuda_status  # noqa: E402

# (variant, reference, dropout or None for any): bound; at r = 16 and M >= 8192, worst case over the shapes.
TARGETS = (
    ("g1", "peft", 0.0, 0.80),
    ("g1", "peft", 0.05, 0.75),
    ("g1", "base", None, 1.12),
    ("g0", "base", None, 1.01),
    ("dora", "g1", 0.0, 1.15),
)
AUTHORS_SAVING = 0.072  # CoTo paper: LoRA 7h38 -> 7h05 on LLaMA-2-7B (one A6000)
LABELS = {"g1": "ours (gate on)", "g0": "ours (gate off)", "peft": "PEFT", "base": "frozen base",
          "dora": "fused DoRA (gate on)"}


# --------------------------------------------------------------------------------------------------------------
# Parity: the gpu-marked tests
# --------------------------------------------------------------------------------------------------------------
def run_parity(timeout_s: float) -> dict:
    """Run ``pytest -m gpu`` on the parity tests in a child process; counts from its JUnit XML."""
    with tempfile.TemporaryDirectory() as folder:
        junit = Path(folder) / "parity.xml"
        # --noconftest: the parity tests need no fixture, and conftest's model helpers cost seconds to import
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--noconftest",
                   str(REPO / "tests" / "test_gpu_parity.py"), f"--junitxml={junit}"]
        started = time.monotonic()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
        except subprocess.TimeoutExpired:
            return dict(ok=False, passed=0, failed=0, skipped=0, errors=1, seconds=timeout_s,
                        failures=[f"parity tests timed out after {timeout_s:.0f} s"])
        counts = dict(passed=0, failed=0, skipped=0, errors=0)
        failures = []
        if junit.exists():
            for case in ET.parse(junit).getroot().iter("testcase"):
                outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), None)
                key = {"failure": "failed", "error": "errors", "skipped": "skipped", None: "passed"}[outcome]
                counts[key] += 1
                if outcome in ("failure", "error"):
                    message = next(child for child in case if child.tag == outcome).get("message", "")
                    failures.append(f"{case.get('name')}: {message.splitlines()[0] if message else outcome}"[:300])
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
        print(f"parity: {tail[0]}", flush=True)
        if done.returncode not in (0, 5) and not failures:  # 5 = nothing collected
            failures.append(f"pytest exited {done.returncode}: {tail[0]}")
        return dict(ok=not failures, seconds=round(time.monotonic() - started, 1), failures=failures, **counts)


# --------------------------------------------------------------------------------------------------------------
# Layer timings
# --------------------------------------------------------------------------------------------------------------
def make_timer(device: str, quick: bool) -> Callable[[Callable[[], None]], float]:
    """Median milliseconds of ``fn``: ``do_bench`` (CUDA events) on a GPU, perf_counter medians otherwise."""
    if device == "cuda" and not quick:
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_time(fn: Callable[[], None], reps: int = 3) -> float:
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[len(times) // 2]

    return cpu_time


def peft_linear(base: torch.nn.Linear, r: int, p: float, use_dora: bool = False) -> torch.nn.Module:
    """A PEFT LoRA (or DoRA) layer around ``base`` (frozen), lora_alpha = 2r."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear

    try:  # peft >= 0.18 takes the LoraConfig positionally
        layer = Linear(base, "default", LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, use_dora=use_dora), r=r,
                       lora_alpha=2 * r)
    except TypeError:
        layer = Linear(base, adapter_name="default", r=r, lora_alpha=2 * r, lora_dropout=p, use_dora=use_dora)
    base.requires_grad_(False)
    return layer


def _takes_cublas_below_m() -> bool:
    return "cublas_below_m" in inspect.signature(lora_linear).parameters


def variants(device: str) -> list[str]:
    """Variants timed here besides ``base``/``peft``: g1 and g0 always, the others where available."""
    names = ["g1", "g0", "torch"]
    if _takes_cublas_below_m():
        names.append("g1c")
    if "native" in KERNEL_BACKENDS and device == "cuda" and native_cuda_status() is None:
        names.append("native")
    return names


def time_shape(m: int, k: int, n: int, r: int, dropouts: tuple[float, ...], device: str, bench) -> list[dict]:
    """One row per dropout: median ms of every variant for forward + backward at (M, K, N, r), bf16."""
    dtype = torch.bfloat16
    torch.manual_seed(0)
    base = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, n, device=device, dtype=dtype)
    a = (torch.randn(r, k, device=device, dtype=dtype) * k**-0.5).requires_grad_(True)
    b = (torch.randn(n, r, device=device, dtype=dtype) * 0.02).requires_grad_(True)
    scaling = 2.0  # lora_alpha = 2r
    names = variants(device)

    def step(forward: Callable[[], torch.Tensor], params: tuple[torch.Tensor, ...]) -> Callable[[], None]:
        def run() -> None:
            for t in params:
                t.grad = None
            forward().backward(dy)
        return run

    def ours(p: float, gate: bool = True, backend: str = "triton", **extra) -> Callable[[], None]:
        return step(lambda: lora_linear(x, base.weight, None, a, b, None, scaling=scaling, dropout_p=p, gate=gate,
                                        backend=backend, **extra), (x, a, b))

    magnitude = torch.linalg.norm(base.weight.float(), dim=1).requires_grad_(True)  # PEFT's init: fp32 ||W||

    def fused_dora(p: float) -> Callable[[], None]:
        return step(lambda: dora_linear(x, base.weight, None, a, b, None, magnitude, scaling=scaling, dropout_p=p,
                                        backend="triton"), (x, a, b, magnitude))

    def peft(p: float, use_dora: bool = False) -> Callable[[], None]:
        """PEFT's layer around the same base with our A and B, stepping its trainable parameters and x."""
        layer = peft_linear(base, r, p, use_dora=use_dora)
        layer.lora_A["default"].weight.data.copy_(a.detach())
        layer.lora_B["default"].weight.data.copy_(b.detach())
        return step(lambda: layer(x), (x, *(q for q in layer.parameters() if q.requires_grad)))

    shared = dict(base=bench(step(lambda: F.linear(x, base.weight), (x,))))
    if "g0" in names:
        shared["g0"] = bench(ours(0.0, gate=False))
    rows = []
    for p in dropouts:
        row = dict(m=m, k=k, n=n, r=r, p=p, **shared)
        row["peft"] = bench(peft(p))
        row["g1"] = bench(ours(p))
        row["torch"] = bench(ours(p, backend="torch"))
        if "g1c" in names:
            row["g1c"] = bench(ours(p, cublas_below_m=m + 1))
        if "native" in names:
            row["native"] = bench(ours(p, backend="native"))
        row["dora"] = bench(fused_dora(p))
        row["peft-dora"] = bench(peft(p, use_dora=True))
        for name in ("g1", "g0", "torch", "g1c", "native"):
            if name in row:
                row[f"{name}/base"] = row[name] / row["base"]
        row["g1/peft"] = row["g1"] / row["peft"]
        row["dora/g1"] = row["dora"] / row["g1"]
        row["dora/peft-dora"] = row["dora"] / row["peft-dora"]
        rows.append(row)
        print("  ".join([f"M={m} K={k} N={n} r={r} p={p}:"] + [f"{key} {value:.3f}" for key, value in row.items()
                                                                 if key not in ("m", "k", "n", "r", "p")]),
              flush=True)
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def dora_parts(m: int, k: int, n: int, r: int, device: str, bench) -> dict:
    """Where fused DoRA's time over fused LoRA goes (bf16, dropout 0), each launcher timed alone (ms):

    * ``norm``: ``dora_triton.dora_row_norm`` (W A'^T pass, Gram, ``_row_norm_kernel``), once per step and layer;
    * ``dy-lora`` / ``dy-dora``: the dY pass without / with the column scale and sum_rows(dY * Y) (dm's numerator);
    * ``dx-lora``: LoRA's dX GEMM (dY W + dS A); ``dx-dora``: DoRA's, each dY tile scaled by c in the K loop
      (A_COL_SCALE); ``dx-g``: LoRA's loop on a precomputed G = c dY; ``g-write``: ``torch.mul(dY, c, out=G)``, an
      upper bound on what writing G from the dY pass (which reads dY anyway) would add.

    ``dx-dora`` - ``dx-g`` against ``g-write`` says whether G in memory would beat the scale in the K loop."""
    from coto_kernels.kernels import dora_triton, lora_triton
    from coto_kernels.kernels.interface import GradRequest

    dtype = torch.bfloat16
    torch.manual_seed(0)
    weight = torch.randn(n, k, device=device, dtype=dtype) * k**-0.5
    a = torch.randn(r, k, device=device, dtype=dtype) * k**-0.5
    b = torch.randn(n, r, device=device, dtype=dtype) * 0.02
    dy, y = (torch.randn(m, n, device=device, dtype=dtype) for _ in range(2))
    s = torch.randn(m, r, device=device, dtype=torch.float32)
    c = torch.rand(n, device=device, dtype=torch.float32) + 0.5
    ds = torch.randn(m, r, device=device, dtype=torch.float32)
    g = dy * c.to(dtype)
    need = GradRequest(dx=True, dlora=True)

    def dx(a_op: torch.Tensor, a_scale: torch.Tensor | None) -> torch.Tensor:
        return lora_triton.launch_gemm(
            a=a_op, b=weight, b_strides=(weight.stride(0), weight.stride(1)), out_features=k, bias=None,
            lowrank_s=ds, lowrank_l=a, l_strides=(a.stride(0), a.stride(1)), lora_scale=1.0, lora_bias=None,
            dropout=lora_triton.NO_DROPOUT, cublas_below_m=0, cublas_base=lambda: a_op @ weight, a_scale=a_scale)

    same = dx(dy, c), dx(g, None)  # the two dX forms compute one thing (up to G's rounding to bf16)
    error = ((same[0].float() - same[1].float()).norm() / same[1].float().norm()).item()
    if error > 2e-2:
        raise AssertionError(f"dora_parts: dX with the scale in the K loop and on a stored G differ ({error:.3g})")
    parts = dict(
        m=m, k=k, n=n, r=r,
        norm=bench(lambda: dora_triton.dora_row_norm(weight, a, b, None, scaling=2.0, weight_is_kn=False)),
        **{"dy-lora": bench(lambda: lora_triton.launch_dy_reductions(dy, b, s, 2.0, need, dtype))},
        **{"dy-dora": bench(lambda: lora_triton.launch_dy_reductions(dy, b, s, 2.0, need, dtype, col_scale=c,
                                                                     saved=y))},
        **{"dx-lora": bench(lambda: dx(dy, None)), "dx-dora": bench(lambda: dx(dy, c)),
           "dx-g": bench(lambda: dx(g, None)), "g-write": bench(lambda: torch.mul(dy, c.to(dtype), out=g))},
    )
    print("DoRA parts: " + "  ".join(f"{key} {value:.3f}" if isinstance(value, float) else f"{key}={value}"
                                     for key, value in parts.items()), flush=True)
    if device == "cuda":
        torch.cuda.empty_cache()
    return parts


def layer_grid(quick: bool) -> list[tuple[int, int, int, int]]:
    """(M, K, N, r): the issue's grid, target shapes (M >= 8192) first so a budget stop still answers them."""
    if quick:
        return [(64, 64, 48, 8), (96, 48, 64, 8)]
    return [(8192, 4096, 4096, 16), (16384, 4096, 4096, 16), (2048, 4096, 4096, 16)]


def target_rows(rows: list[dict], quick: bool) -> list[dict]:
    return rows if quick else [row for row in rows if row["r"] == 16 and row["m"] >= 8192]


def targets_table(rows: list[dict], quick: bool) -> list[dict]:
    """Each target with its worst measured ratio over the target shapes, and PASS/FAIL."""
    picked = target_rows(rows, quick)
    out = []
    for variant, reference, dropout, bound in TARGETS:
        key = f"{variant}/{reference}"
        cases = [row for row in picked if key in row and (dropout is None or row["p"] == dropout)]
        worst = max(cases, key=lambda row, key=key: row[key]) if cases else None
        out.append(dict(target=f"{LABELS[variant]} / {LABELS[reference]}", dropout="any" if dropout is None
                        else dropout, bound=bound, worst=worst[key] if worst else None,
                        at=f"M={worst['m']} p={worst['p']}" if worst else "-",
                        verdict="-" if worst is None else "n/a (quick)" if quick
                        else "PASS" if worst[key] <= bound else "FAIL"))
    return out


# --------------------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------------------
def run_end_to_end(quick: bool, device: str) -> dict:
    """coto-bench's medium preset in bf16: vanilla PEFT, patched p = 1, the full CoTo schedule."""
    from coto_kernels import bench

    if quick:
        report = bench.run("tiny", modes=("vanilla", "coto-p1", "coto-schedule"), device=device, dtype="float32",
                           rounds=1, steps=2, warmup=1, backend="torch")
    else:
        report = bench.run("medium", modes=("vanilla", "coto-p1", "coto-schedule"), device=device,
                           dtype="bfloat16", backend="triton")
    by_mode = {r["mode"]: r for r in report["results"]}
    vanilla = by_mode["vanilla"]["mean_step_s"]
    saving = {mode: 1.0 - by_mode[mode]["mean_step_s"] / vanilla for mode in by_mode}
    print("end-to-end: " + ", ".join(f"{mode} {r['mean_step_s'] * 1e3:.1f} ms (saves {saving[mode]:+.1%})"
                                     for mode, r in by_mode.items()), flush=True)
    return dict(preset=report["preset"], config=report["config"], results=report["results"], saving=saving)


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------
def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(meta: dict, parity: dict | None, rows: list[dict], targets: list[dict], e2e: dict | None,
             parts: dict | None = None) -> str:
    out = [f"# gpu_check {meta['date']}", "",
           f"{meta['gpu']}; torch {meta['torch']} (CUDA {meta['cuda']}); triton {meta['triton']}; "
           f"peft {meta['peft']}; transformers {meta['transformers']}" + (" — **quick smoke run, not a measurement**"
                                                                         if meta["quick"] else ""), "",
           f"Native CUDA backend: {meta.get('native_cuda', '-')}.", ""]
    if parity is not None:
        out += ["## Parity (`pytest -m gpu tests/test_gpu_parity.py`)", "",
                f"{parity['passed']} passed, {parity['failed']} failed, {parity['errors']} errors, "
                f"{parity['skipped']} skipped ({parity['seconds']} s): **{'ok' if parity['ok'] else 'FAIL'}**", ""]
        out += [f"- {line}" for line in parity["failures"]]
        out.append("")
    columns = [c for c in ("base", "peft", "g1", "g0", "torch", "g1c", "native", "dora", "peft-dora", "g1/peft",
                           "g1/base", "g0/base", "torch/base", "g1c/base", "native/base", "dora/g1", "dora/peft-dora")
               if any(c in row for row in rows)]
    out += ["## Layer: forward + backward (ms, median; ratios per row)", "",
            "g1/g0: ours gate on/off (Triton); torch: cuBLAS base + the torch backend's in-place low-rank add; "
            "g1c: cuBLAS base + the Triton low-rank add; native: the csrc backend; dora: fused DoRA (Triton); "
            "peft-dora: PEFT's DoRA layer.", "",
            "| M | K | N | r | p | " + " | ".join(columns) + " |", "|---" * (5 + len(columns)) + "|"]
    out += ["| " + " | ".join(_fmt(row.get(c, "-")) for c in ("m", "k", "n", "r", "p", *columns)) + " |"
            for row in rows]
    if parts is not None:
        timed = [key for key in parts if key not in ("m", "k", "n", "r")]
        out += ["", f"## DoRA over LoRA by part (ms; M={parts['m']} K={parts['k']} N={parts['n']} r={parts['r']}, "
                "bf16, dropout 0; `dora_parts` in bench/gpu_check.py)", "",
                "| " + " | ".join(timed) + " |", "|---" * len(timed) + "|",
                "| " + " | ".join(_fmt(parts[key]) for key in timed) + " |", "",
                f"Scale in the dX K loop costs {_fmt(parts['dx-dora'] - parts['dx-g'])} ms over LoRA's loop on a "
                f"stored G; writing G costs at most {_fmt(parts['g-write'])} ms."]
    if e2e is not None:
        cfg = e2e["config"]
        out += ["", f"## End to end: coto-bench `{e2e['preset']}` ({cfg['dtype']}, r {cfg['rank']}, LoRA dropout "
                f"{cfg['lora_dropout']}, {cfg['rounds']} x {cfg['steps']} steps per mode, interleaved)", "",
                "| mode | mean step (ms) | throughput vs vanilla | mean active fraction | time saved |",
                "|---|---|---|---|---|"]
        out += [f"| {r['mode']} | {r['mean_step_s'] * 1e3:.1f} | {r['throughput_vs_vanilla']:.3f}x | "
                f"{r['mean_active_fraction']:.2f} | {e2e['saving'][r['mode']]:+.1%} |" for r in e2e["results"]]
        if "coto-schedule" in e2e["saving"]:
            out += ["", f"Full CoTo schedule vs vanilla PEFT: {e2e['saving']['coto-schedule']:.1%} of the step time "
                    f"saved (the authors report {AUTHORS_SAVING:.1%} for LoRA)."]
    out += ["", "## Targets (issues 9 and 13; r = 16, M >= 8192, worst case)", "",
            "| target | dropout | bound | worst | at | verdict |", "|---|---|---|---|---|---|"]
    out += [f"| {t['target']} | {t['dropout']} | <= {t['bound']} | {_fmt(t['worst']) if t['worst'] else '-'} | "
            f"{t['at']} | **{t['verdict']}** |" for t in targets]
    if meta.get("stopped"):
        out += ["", f"Stopped early: {meta['stopped']}."]
    return "\n".join(out) + "\n"


def guard_native_import() -> str | None:
    """Import the native backend in a child first: a CUDA binding whose registrations do not match the CPU ops'
    schemas aborts the importing process (kernels-check loads it beside them on the CPU, but with CPU torch's
    headers). If the child dies, the CUDA kernels stay unloaded here and in every child (their env switch), so the
    rest of the check still runs; returns what happened, or None when the import is clean."""
    done = subprocess.run([sys.executable, "-c", "import coto_kernels.kernels.lora_native"], capture_output=True,
                          text=True, cwd=REPO)
    if done.returncode >= 0:
        return None
    os.environ["COTO_KERNELS_NATIVE_CUDA"] = "0"
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("frame #")]
    return f"importing the native backend died (signal {-done.returncode}): {' | '.join(lines[:6])[:500]}"


def metadata(device: str, quick: bool) -> dict:
    import peft
    import transformers
    import triton

    return dict(
        date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ"),
        gpu=torch.cuda.get_device_name() if device == "cuda" else f"CPU interpreter ({platform.machine()})",
        torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__, peft=peft.__version__,
        transformers=transformers.__version__, quick=quick, backends=list(KERNEL_BACKENDS),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU interpreter (smoke test)")
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="whole-run budget: parity gets at most half; a layer shape starts only with 30 s "
                             "left, the end-to-end step (its own compiles: ~2-3 min cold) only with 180 s left")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    started = time.monotonic()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.quick:
        print("no GPU here: only --quick runs on the CPU (under TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    meta = metadata(device, args.quick)
    print(f"# gpu_check on {meta['gpu']}: torch {meta['torch']}, triton {meta['triton']}, peft {meta['peft']}",
          flush=True)
    meta["native_cuda"] = guard_native_import() or native_cuda_status() or "built and loaded"
    print(f"native CUDA: {meta['native_cuda']}", flush=True)

    def over_budget(what: str, needs_s: float) -> bool:
        left = args.budget_s - (time.monotonic() - started)
        if left < needs_s and not args.quick:
            meta["stopped"] = f"{left:.0f} s of the {args.budget_s:.0f} s budget left, {what} needs ~{needs_s:.0f} s"
            print(meta["stopped"], flush=True)
            return True
        return False

    parity = None if args.skip_parity else run_parity(timeout_s=max(60.0, args.budget_s / 2))
    bench = make_timer(device, args.quick)
    rows: list[dict] = []
    for m, k, n, r in layer_grid(args.quick):
        if over_budget(f"layer M={m}", 30.0):
            break
        rows += time_shape(m, k, n, r, (0.0, 0.05), device, bench)
    parts = None
    if not over_budget("the DoRA parts", 20.0):
        parts = dora_parts(*layer_grid(args.quick)[0], device, bench)
    e2e = None
    if not args.skip_e2e and not over_budget("the end-to-end step", 180.0):
        e2e = run_end_to_end(args.quick, device)
    targets = targets_table(rows, args.quick)
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    report = markdown(meta, parity, rows, targets, e2e, parts)
    print("\n" + report, flush=True)
    stem = f"gpu_check-{meta['date']}" + ("-quick" if args.quick else "")
    payload = json.dumps(dict(meta=meta, parity=parity, layer=rows, dora_parts=parts, targets=targets,
                              end_to_end=e2e), indent=1)
    for folder in [args.out] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else []):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.md").write_text(report)
        (folder / f"{stem}.json").write_text(payload + "\n")
        print(f"wrote {folder / stem}.md/.json")
    return 0 if parity is None or parity["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
