"""The one GPU check of the fused LoRA kernels: parity at full size, then forward+backward timings against PEFT.

    python bench/gpu_check.py                 # full grid, ~4-6 minutes on an H200
    python bench/gpu_check.py --grid small    # r = 16, M >= 8192 only (the target shapes), ~1-2 minutes
    TRITON_INTERPRET=1 python bench/gpu_check.py --quick   # CPU smoke test: tiny shapes, perf_counter timing

Variants timed per shape (bf16, forward + backward, the input requires grad, the base weight is frozen):

* ``base``  ``F.linear`` alone: the floor;
* ``peft``  ``peft.tuners.lora.layer.Linear`` (nonzero B);
* ``g1``    ``coto_kernels.functional.lora_linear`` with the gate on (backend ``triton``);
* ``g0``    the same with the gate off;
* ``g1c``   gate on with the base GEMMs forced onto cuBLAS (``lora_triton.CUBLAS_BELOW_M`` raised for the call): the
  low-rank term then goes through the kernel's add-into-output variant. Comparing ``g1`` with ``g1c`` per shape
  is the data for the fused-vs-cuBLAS dispatch threshold.

``base`` and ``g0`` do not depend on the LoRA dropout, so they are timed once per shape. The target shapes
(r = 16, M >= 8192) run first, and a time budget (``--budget-s``) stops the grid early with partial results rather
than overrunning the machine. Results: a Markdown table and a JSON (GPU, versions, date) written to
``bench/results/gpu_check-<date>.{md,json}`` and to ``$OUT`` when set.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if not torch.cuda.is_available():  # the interpreter must be chosen before triton.jit runs
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from coto_kernels.kernels import lora_triton  # noqa: E402
from coto_kernels.kernels.interface import GradRequest, LoraOptions  # noqa: E402

TARGETS = {  # (numerator, denominator): bound, at r = 16 and M >= 8192 (worst case over K, N and dropout)
    ("g1", "peft"): 0.72,
    ("g1", "base"): 1.06,
    ("g0", "base"): 1.01,
}


# --------------------------------------------------------------------------------------------------------------
# The op under test: the lead's autograd Function, or a local stand-in over the same host functions
# --------------------------------------------------------------------------------------------------------------
def _local_lora_linear() -> Callable:
    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, lora_a, lora_b, lora_bias, scaling, dropout_p, seed, gate, weight_is_kn):
            x2 = x.reshape(-1, x.shape[-1])
            y, s = lora_triton.lora_forward(x2, weight, weight_is_kn, bias, lora_a, lora_b, lora_bias, scaling, gate,
                                            dropout_p, seed)
            ctx.save_for_backward(x, weight, lora_a, lora_b, s)
            ctx.opts = (scaling, dropout_p, seed, gate, weight_is_kn)
            return y.view(*x.shape[:-1], -1)

        @staticmethod
        def backward(ctx, dy):
            x, weight, lora_a, lora_b, s = ctx.saved_tensors
            scaling, dropout_p, seed, gate, weight_is_kn = ctx.opts
            need = ctx.needs_input_grad
            dx, da, db, dbias, dlbias = lora_triton.lora_backward(
                dy.reshape(-1, dy.shape[-1]).contiguous(), x.reshape(-1, x.shape[-1]), weight, weight_is_kn,
                lora_a, lora_b, s, scaling, gate, dropout_p, seed, need[0], need[3] or need[4], need[2], need[5])
            return (dx.view(x.shape) if dx is not None else None, None, dbias, da, db, dlbias,
                    None, None, None, None, None)

    def lora_linear(x, weight, bias, lora_a, lora_b, lora_bias=None, *, scaling, dropout_p=0.0, gate=True,
                    weight_is_kn=False, seed=None, backend="triton"):
        seed = int(torch.randint(0, 2**31 - 1, (1,))) if seed is None else seed
        return _Fn.apply(x, weight, bias, lora_a, lora_b, lora_bias, scaling, dropout_p, seed, gate, weight_is_kn)

    return lora_linear


try:
    from coto_kernels.functional import lora_linear

    LORA_LINEAR_SOURCE = "coto_kernels.functional.lora_linear"
except ImportError as exc:  # the package is still being written: time the same kernels through a local Function
    lora_linear = _local_lora_linear()
    LORA_LINEAR_SOURCE = f"local autograd.Function (import failed: {exc})"


def peft_linear(base: torch.nn.Linear, r: int, p: float) -> torch.nn.Module:
    """A PEFT LoRA layer around ``base`` (frozen), lora_alpha = 2r, nonzero B."""
    from peft.tuners.lora.layer import Linear

    try:  # peft >= 0.18 takes the LoraConfig positionally
        from peft import LoraConfig

        layer = Linear(base, "default", LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p), r=r, lora_alpha=2 * r)
    except TypeError:
        layer = Linear(base, adapter_name="default", r=r, lora_alpha=2 * r, lora_dropout=p)
    base.weight.requires_grad_(False)
    if base.bias is not None:
        base.bias.requires_grad_(False)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    return layer


# --------------------------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------------------------
def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def parity_case(m: int, k: int, n: int, r: int, gate: bool, p: float, kn: bool, adapter_dtype: torch.dtype,
                device: str, dtype: torch.dtype = torch.bfloat16) -> dict:
    g = torch.Generator(device=device).manual_seed(m + k + n + r)

    def rnd(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dt)

    x, dy = rnd(m, k), rnd(m, n)
    w = rnd(k, n, scale=k**-0.5) if kn else rnd(n, k, scale=k**-0.5)
    a, b = rnd(r, k, dt=adapter_dtype, scale=k**-0.5), rnd(n, r, dt=adapter_dtype, scale=r**-0.5)
    bias, lbias = rnd(n), rnd(n, dt=adapter_dtype)
    scaling, seed = 2.0, 1234
    options = LoraOptions(scaling=scaling, dropout_p=p, seed=seed, gate=gate, weight_is_kn=kn)
    y, s = lora_triton.lora_forward(x, w, bias, a, b, lbias, options=options)
    dx, da, db, dbias, dlbias = lora_triton.lora_backward(dy, x, w, a, b, s, options=options,
                                                          need=GradRequest(True, True, True, True))
    x64, dy64, w64 = x.double(), dy.double(), (w.double().t() if kn else w.double())
    y_ref, dx_ref = x64 @ w64.t() + bias.double(), dy64 @ w64
    errs = {"y": _rel(y, y_ref) if not gate else None, "dx": _rel(dx, dx_ref) if not gate else None,
            "d_bias": _rel(dbias, dy64.sum(0))}
    if gate:
        keep = lora_triton.dropout_keep_mask(seed, (m, k), p, device).double() / (1 - p) if p > 0 else 1.0
        xd = x64 * keep
        s_ref = xd @ a.double().t()
        ds_ref = scaling * dy64 @ b.double()
        errs.update(
            y=_rel(y, y_ref + scaling * (s_ref @ b.double().t() + lbias.double())),
            dx=_rel(dx, dx_ref + keep * (ds_ref @ a.double())),
            s=_rel(s, s_ref), d_lora_a=_rel(da, ds_ref.t() @ xd), d_lora_b=_rel(db, scaling * dy64.t() @ s_ref),
            d_lora_bias=_rel(dlbias, scaling * dy64.sum(0)),
        )
    else:
        assert s is None and da is None and db is None and dlbias is None
    tol = 1.6e-2  # 2 bf16 ulps (2^-7 each is 7.8e-3) of the largest element
    errs = {key: v for key, v in errs.items() if v is not None}
    return dict(m=m, k=k, n=n, r=r, gate=gate, p=p, weight_is_kn=kn, adapters=str(adapter_dtype).split(".")[-1],
                max_err=max(errs.values()), worst=max(errs, key=errs.get), ok=max(errs.values()) < tol)


def run_parity(quick: bool, device: str) -> list[dict]:
    if quick:
        shapes = [(130, 72, 96, 8, False, torch.bfloat16), (37, 45, 29, 3, True, torch.float32)]
    else:
        shapes = [(4096, 4096, 4096, 16, False, torch.bfloat16), (8192, 4096, 14336, 64, False, torch.bfloat16),
                  (2048, 14336, 4096, 8, True, torch.float32), (48, 4096, 4096, 16, False, torch.bfloat16)]
    rows = []
    for m, k, n, r, kn, adt in shapes:
        for gate in (True, False):
            for p in ((0.0, 0.1) if gate else (0.0,)):
                rows.append(parity_case(m, k, n, r, gate, p, kn, adt, device))
                print(f"parity M={m} K={k} N={n} r={r} gate={int(gate)} p={p} kn={kn} adapters={rows[-1]['adapters']}:"
                      f" max rel err {rows[-1]['max_err']:.2e} ({rows[-1]['worst']}) "
                      f"{'ok' if rows[-1]['ok'] else 'FAIL'}", flush=True)
    return rows


# --------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------
def _timer(device: str, quick: bool) -> Callable[[Callable[[], None]], float]:
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


def _cublas_gemms(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` with lora_triton's base GEMMs dispatched to cuBLAS whatever M is (forward and backward)."""
    def run() -> None:
        saved = lora_triton.CUBLAS_BELOW_M
        lora_triton.CUBLAS_BELOW_M = 1 << 62
        try:
            fn()
        finally:
            lora_triton.CUBLAS_BELOW_M = saved
    return run


def time_shape(m: int, k: int, n: int, r: int, dropouts: tuple[float, ...], device: str, bench) -> list[dict]:
    dtype = torch.bfloat16
    torch.manual_seed(0)
    base = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, n, device=device, dtype=dtype)
    a = (torch.randn(r, k, device=device, dtype=dtype) * k**-0.5).requires_grad_(True)
    b = (torch.randn(n, r, device=device, dtype=dtype) * 0.02).requires_grad_(True)
    scaling = 2.0  # lora_alpha = 2r

    def step(forward: Callable[[], torch.Tensor], params: tuple[torch.Tensor, ...]) -> Callable[[], None]:
        def run() -> None:
            for t in params:
                t.grad = None
            forward().backward(dy)
        return run

    t_base = bench(step(lambda: F.linear(x, base.weight), (x,)))
    t_g0 = bench(step(lambda: lora_linear(x, base.weight, None, a, b, None, scaling=scaling, dropout_p=0.0,
                                          gate=False, backend="triton"), (x, a, b)))
    rows = []
    for p in dropouts:
        layer = peft_linear(base, r, p)
        layer.lora_A["default"].weight.data.copy_(a.detach())
        layer.lora_B["default"].weight.data.copy_(b.detach())
        peft_params = (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight)
        t_peft = bench(step(lambda layer=layer: layer(x), peft_params))
        ours_g1 = step(lambda p=p: lora_linear(x, base.weight, None, a, b, None, scaling=scaling, dropout_p=p,
                                               gate=True, backend="triton"), (x, a, b))
        t_g1 = bench(ours_g1)
        t_g1c = bench(_cublas_gemms(ours_g1))
        rows.append(dict(m=m, k=k, n=n, r=r, p=p, base=t_base, peft=t_peft, g1=t_g1, g0=t_g0, g1c=t_g1c,
                         g1_peft=t_g1 / t_peft, g1_base=t_g1 / t_base, g0_base=t_g0 / t_base, g1c_base=t_g1c / t_base))
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def grid(name: str) -> list[tuple[int, int, int, int]]:
    """(M, K, N, r), target shapes (r = 16, M >= 8192) first so a budget stop still answers the targets."""
    if name == "quick":
        return [(128, 64, 96, 8), (64, 96, 64, 16)]
    ms, kns, rs = (2048, 8192, 16384), ((4096, 4096), (4096, 14336), (14336, 4096)), (8, 16, 64)
    shapes = [(m, k, n, r) for r in rs for m in ms for k, n in kns]
    if name == "small":
        return [s for s in shapes if s[3] == 16 and s[0] >= 8192]
    return sorted(shapes, key=lambda s: not (s[3] == 16 and s[0] >= 8192))


def targets_summary(rows: list[dict]) -> list[str]:
    lines = []
    picked = [row for row in rows if row["r"] == 16 and row["m"] >= 8192]
    for (num, den), bound in TARGETS.items():
        key = f"{num}_{den}"
        if not picked:
            lines.append(f"- {num}/{den} <= {bound}: no target shapes measured")
            continue
        worst = max(picked, key=lambda row, key=key: row[key])
        verdict = "PASS" if worst[key] <= bound else "FAIL"
        lines.append(f"- ours({'gate1' if num == 'g1' else 'gate0'})/{'PEFT' if den == 'peft' else 'base'} <= {bound}"
                     f" at r=16, M>=8192: worst {worst[key]:.3f} (M={worst['m']} K={worst['k']} N={worst['n']} "
                     f"p={worst['p']}), over {len(picked)} cases: **{verdict}**")
    if picked:
        worst = max(picked, key=lambda row: row["g1c_base"])
        lines.append(f"- (info) gate1 with cuBLAS base GEMMs / base at r=16, M>=8192: worst {worst['g1c_base']:.3f}; "
                     f"fused faster than cuBLAS+add in {sum(w['g1'] < w['g1c'] for w in picked)}/{len(picked)} cases")
    return lines


def markdown(meta: dict, parity: list[dict], rows: list[dict]) -> str:
    out = [f"# gpu_check {meta['date']}", "",
           f"{meta['gpu']}; torch {meta['torch']}; triton {meta['triton']}; peft {meta['peft']}; "
           f"ours via {meta['lora_linear']}", "", "## Parity (bf16 x, max |err| / max |ref| vs float64)", "",
           "| M | K | N | r | gate | p | Conv1D | adapters | max err | worst | ok |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {c['m']} | {c['k']} | {c['n']} | {c['r']} | {int(c['gate'])} | {c['p']} | {c['weight_is_kn']} | "
            f"{c['adapters']} | {c['max_err']:.2e} | {c['worst']} | {'ok' if c['ok'] else 'FAIL'} |" for c in parity]
    out += ["", "## Forward + backward (ms, median)", "",
            "g1c: gate on with the base GEMMs on cuBLAS (unfused low-rank add), for the dispatch threshold.", "",
            "| M | K | N | r | p | base | PEFT | ours g1 | ours g0 | ours g1c | g1/PEFT | g1/base | g0/base "
            "| g1c/base |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {w['m']} | {w['k']} | {w['n']} | {w['r']} | {w['p']} | {w['base']:.3f} | {w['peft']:.3f} | "
            f"{w['g1']:.3f} | {w['g0']:.3f} | {w['g1c']:.3f} | {w['g1_peft']:.3f} | {w['g1_base']:.3f} | "
            f"{w['g0_base']:.3f} | {w['g1c_base']:.3f} |" for w in rows]
    out += ["", "## Targets", "", *targets_summary(rows)]
    if meta.get("stopped_early"):
        out += ["", f"Stopped early by the time budget after {len(rows)} rows."]
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and perf_counter timing (CPU smoke test)")
    parser.add_argument("--grid", choices=("full", "small"), default="full")
    parser.add_argument("--budget-s", type=float, default=330.0, help="stop timing new shapes after this long")
    parser.add_argument("--skip-parity", action="store_true")
    args = parser.parse_args()
    started = time.monotonic()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.quick:
        print("no GPU here: only --quick runs on the CPU (under TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    import peft

    meta = dict(
        date=dt.datetime.now().strftime("%Y-%m-%d_%H%M%S"),
        gpu=torch.cuda.get_device_name() if device == "cuda" else f"CPU interpreter ({platform.processor()})",
        torch=torch.__version__, triton=triton.__version__, peft=peft.__version__, cuda=torch.version.cuda,
        lora_linear=LORA_LINEAR_SOURCE, grid="quick" if args.quick else args.grid,
        cublas_below_m=lora_triton.CUBLAS_BELOW_M,
    )
    print(f"# {meta['gpu']} torch {meta['torch']} triton {meta['triton']} peft {meta['peft']}; ours via "
          f"{LORA_LINEAR_SOURCE}", flush=True)
    parity = [] if args.skip_parity else run_parity(args.quick, device)
    bench = _timer(device, args.quick)
    dropouts = (0.0, 0.1)
    rows: list[dict] = []
    meta["stopped_early"] = False
    for m, k, n, r in grid("quick" if args.quick else args.grid):
        if time.monotonic() - started > args.budget_s:
            meta["stopped_early"] = True
            print(f"time budget {args.budget_s:.0f}s reached: stopping the grid", flush=True)
            break
        for row in time_shape(m, k, n, r, dropouts, device, bench):
            rows.append(row)
            print(f"M={m} K={k} N={n} r={r} p={row['p']}: base {row['base']:.3f} peft {row['peft']:.3f} "
                  f"g1 {row['g1']:.3f} g0 {row['g0']:.3f} g1c {row['g1c']:.3f} ms | g1/peft {row['g1_peft']:.3f} "
                  f"g1/base {row['g1_base']:.3f} g0/base {row['g0_base']:.3f} g1c/base {row['g1c_base']:.3f}",
                  flush=True)
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    report = markdown(meta, parity, rows)
    print("\n" + report)
    stem = f"gpu_check-{meta['date']}" + ("-quick" if args.quick else "")
    payload = json.dumps(dict(meta=meta, parity=parity, timings=rows, targets=targets_summary(rows)), indent=2)
    dirs = [REPO / "bench" / "results"] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    for folder in dirs:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.md").write_text(report)
        (folder / f"{stem}.json").write_text(payload)
        print(f"wrote {folder / stem}.md/.json")
    return 0 if all(c["ok"] for c in parity) else 1


if __name__ == "__main__":
    sys.exit(main())
