"""Compile every launch of the Triton backend for real GPU targets, without a GPU, and check its resources.

    python bench/kernels_check.py                  # the full grid; reuses docs/kernels_check.json where it matches
    python bench/kernels_check.py --grid quick --targets sm_90   # bf16, r 16, p 0/0.1: ~30 compiles
    python bench/kernels_check.py --native-only    # only csrc/: *.cu with nvcc, the CUDA binding's C++

How, without hard-coding the kernels:

1. **Record the launches.** For each scenario of the grid (dtype, rank r, dropout p, M regime, layer variant,
   deterministic mode) and each target GPU, the host functions of ``coto_kernels.kernels.lora_triton``
   (``lora_forward``, ``lora_backward``, ``dropout_keep_mask``; DoRA variants: ``dora_triton``'s
   ``dora_forward`` and ``dora_backward``) run on fake CUDA tensors
   (``FakeTensorMode``: shapes and strides, no data), with ``torch.cuda``'s device queries answering for the
   target (its SM count and shared memory), and with every ``JITFunction.run`` replaced by a recorder: no
   kernel executes. An ``Autotuner`` launch is expanded into one launch per config that survives the
   autotuner's own pruning (``prune_configs``: ``early_config_prune`` and ``perf_model``/``top_k``), each
   passed through the kernel's heuristics, exactly as tuning would launch them.
2. **Specialise as the JIT does.** Each recorded launch is bound with Triton's own binder
   (``create_function_from_signature`` + ``JITFunction._pack_args``) for the target's backend: tensors become
   ``*bf16``-style pointers (16-byte alignment from their storage offset), ints ``i32``/``i64`` with the
   divisibility-by-16 attribute, ints equal to 1 and None become constants, floats ``fp32``; the kernel's
   ``do_not_specialize`` lists apply. Identical (kernel, signature, constants, attributes, options, target)
   compiles are made once: the key is Triton's own compile-cache key (kernel source hash included).
3. **Compile and read the cubin** (``triton.compile`` down to the cubin with the ptxas the wheel bundles; a
   process pool of ``--jobs``): registers and stack from ``cuobjdump --dump-resource-usage``, spill bytes
   from the ``ptxas -v`` log of that very compile, shared memory from the compiled metadata (what Triton
   requests at launch), SASS from ``cuobjdump -sass``.
4. **Fail** (exit 1) on a compile error, on any spill or stack frame, on shared memory over the target's
   per-block opt-in limit (Triton raises OutOfResources at launch), on tensor memory over 512 columns
   (sm_100), and on more warps than the register file allows. Every recorded launch counts: the dispatch or
   the autotuner can select it, so what can never be launched must be pruned in the kernels, not excused
   here.
5. **Loop cost.** The main loop is the largest backward branch in the SASS that contains a tensor-core
   instruction. For kernels that stream one 2-D tile per iteration (exactly two ``BLOCK_*`` sizes, e.g.
   BLOCK_M x BLOCK_K of X in the S and dA passes), the cost per element is
   ``loop instructions x threads per program / (tile elements)``: the instructions a thread issues per
   element it owns. The S/dA passes with dropout at the issue's setting (16-bit X, r = 16, aligned) must
   stay <= 8 (issue 9): above it the compile fails; other ranks and shapes are reported. DoRA's dropout
   forward GEMM (two accumulators, the mask applied to each X tile) is measured on its K loop, the smallest loop
   holding an MMA, per element of the X tile: <= 12 for tiles of BLOCK_N >= 128 (``TWIN_LOOP_TARGET_PER_ELEMENT``).

Results go to ``docs/kernels_check.{md,json}``. The JSON doubles as a cache: a compile whose key (Triton's
cache key: Triton and ptxas versions, the kernel's source and line, specialisation, target, options) is already
in it is not redone, so an unchanged tree checks in about a minute (imports and recording); ``--recheck N``
recompiles N cached entries and fails if their numbers moved, ``--no-cache`` recompiles everything. A cold full
grid is ~750 compiles for sm_80 + sm_90 (1-3 s each): run ``make kernels-check`` to completion after changing
the kernels and commit the report. CI (``.ci/run``) passes ``--budget-s 300``: it compiles what is not cached,
the issue's setting first (bf16, sm_90), until the budget, and reports the rest as not checked (INCOMPLETE;
``--require-complete`` makes that fail). sm_100 builds with the installed Triton and is opt-in
(``--targets sm_80,sm_90,sm_100``: ~50% more compiles).

CUDA sources: every ``csrc/*.cu`` is compiled to an object for sm_80 and sm_90 with
``nvcc -Icsrc -Werror all-warnings -Xptxas -v,-warn-spills,-Werror``; spills and stack frames fail. The CUDA
ops' torch binding (``csrc/*.cpp`` including c10/cuda) is built by the host compiler with warnings as errors,
against torch's headers and the toolkit's, and loaded beside the CPU ops: a CPU torch suffices
(``check_cuda_bindings``), so a compile error or a registration that does not match its op's schema fails CI
instead of the GPU machine's build or import. Skipped, with a message, when there is no source or tool.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "kernels_check"
LOOP_TARGET_PER_ELEMENT = 8.0  # issue 9: SASS instructions per element of X in the S/dA loops, with dropout
# DoRA's dropout forward (issue 13): SASS instructions per element of the X tile in the fused GEMM's K loop, both
# MMAs and the mask included, for tiles of BLOCK_N >= 128 (the ones large token counts run; smaller tiles spread
# the loop's fixed cost over fewer elements). Pairing the mask per 32-bit word: 9.8 at 128x128x64 / 8 warps on
# sm_90; element by element it was 14.4.
TWIN_LOOP_TARGET_PER_ELEMENT = 12.0


# --------------------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU the kernels are compiled for, with the device properties the host code may ask about."""

    name: str
    capability: int
    device: str
    sm_count: int
    smem_per_block_optin: int  # cudaDevAttrMaxSharedMemoryPerBlockOptin: Triton's OutOfResources bound
    smem_per_sm: int
    regs_per_sm: int = 65536
    max_threads_per_block: int = 1024
    max_tmem_columns: int | None = None

    def device_properties(self) -> SimpleNamespace:
        """What ``torch.cuda.get_device_properties`` returns on such a GPU (the fields host code reads)."""
        return SimpleNamespace(
            name=f"{self.device} (compile-check stand-in)", major=self.capability // 10, minor=self.capability % 10,
            multi_processor_count=self.sm_count, total_memory=80 * 2**30, warp_size=32,
            shared_memory_per_block=48 * 1024, shared_memory_per_block_optin=self.smem_per_block_optin,
            shared_memory_per_multiprocessor=self.smem_per_sm, regs_per_multiprocessor=self.regs_per_sm,
            max_threads_per_multi_processor=2048, L2_cache_size=50 * 2**20, is_integrated=False,
        )


# Per-block opt-in shared memory from the CUDA C++ Programming Guide's per-compute-capability table: 8.0: 163 KB,
# 9.0 and 10.0: 227 KB (= cudaDevAttrMaxSharedMemoryPerBlockOptin 166912 on an A100, 232448 on an H100).
TARGETS = {
    "sm_80": Target("sm_80", 80, "A100", 108, 166912, 167936),
    "sm_90": Target("sm_90", 90, "H100/H200", 132, 232448, 233472),
    "sm_100": Target("sm_100", 100, "B200", 148, 232448, 233472, max_tmem_columns=512),
}


# --------------------------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------------------------
DTYPES = ("bf16", "fp16", "fp32-tf32", "fp32-ieee")
RANKS = (8, 16, 64, 128, 256)
DROPOUTS = (0.0, 0.1)
# (name, M): the small-M regime runs the base GEMM on cuBLAS; 1024 and 16384 rows differ in split counts.
M_REGIMES = (("small-M", 48), ("M=1024", 1024), ("M=16384", 16384))


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One call of the host functions: what the recorded launches are labelled with in the table."""

    dtype: str = "bf16"
    r: int = 16
    p: float = 0.0
    regime: str = "M=1024"
    m: int = 1024
    k: int = 4096
    n: int = 4096
    variant: str = "linear"  # which layer options (see VARIANTS)
    deterministic: bool = False
    seed: int = 1234

    @property
    def label(self) -> str:
        det = " det" if self.deterministic else ""
        return f"{self.dtype} r{self.r} p{self.p:g} {self.regime} {self.variant}{det}"


# Layer options beyond the plain nn.Linear (bf16, r 16, p 0.1, M 1024 only): each flips host-side choices.
VARIANTS = {
    "linear": {},
    "conv1d": dict(weight_is_kn=True),
    "biases": dict(bias=True, lora_bias=True, need_dbias=True),
    "frozen-input": dict(need_dx=False),
    "fp32-adapters": dict(adapter_dtype="fp32"),
    "odd-shape": dict(m=1000, k=4100, n=4100),
    "seed%16==0": dict(seed=1232),
    "M=1": dict(m=1),
    "lm-head-128k": dict(m=16384, n=131072),  # M x N > 2**31: offsets need 64 bits
    # DoRA through dora_triton; without a base bias and dropout the output Y is saved for the magnitude gradient,
    # with either the GEMM also stores Z (STORE_Z); dropout adds the GEMMs' second accumulator (DORA_DROPOUT)
    "dora": dict(dora=True),
    "dora-biases": dict(dora=True, bias=True, lora_bias=True, need_dbias=True),
    # GPT-2's Conv1D layout, lora_bias on a bias-free base: Y saved, the zero-magnitude kernel reads lora_bias
    "dora-conv1d-lora-bias": dict(dora=True, weight_is_kn=True, lora_bias=True),
    "dora-odd-shape": dict(dora=True, m=1000, k=4100, n=4100),  # unaligned rows: the pointer loop, masked loads
}
_SHAPE_KEYS = ("m", "k", "n", "seed")
# DoRA variants on the default shape (crossed with dtypes, dropouts and M regimes in the full grid)
DORA_VARIANTS = tuple(name for name, opts in VARIANTS.items()
                      if opts.get("dora") and not any(key in opts for key in _SHAPE_KEYS))


def scenarios(grid: str) -> list[Scenario]:
    """The scenarios of ``grid``: ``full`` is the product of DTYPES x RANKS x DROPOUTS x M_REGIMES x
    deterministic on/off, plus each variant once; ``quick`` is bf16, r 16, p 0 and 0.1."""
    if grid == "quick":
        return ([Scenario(p=p, regime=name, m=m) for p in DROPOUTS for name, m in M_REGIMES]
                + [Scenario(variant="dora", p=p) for p in DROPOUTS])
    out = [Scenario(dtype=d, r=r, p=p, regime=name, m=m, deterministic=det)
           for d, r, p, (name, m), det in itertools.product(DTYPES, RANKS, DROPOUTS, M_REGIMES, (False, True))]
    # DoRA (issue 13): 16-bit, r 16, every dropout, M regime, deterministic on/off, with and without biases
    out += [Scenario(dtype=d, variant=v, p=p, regime=name, m=m, deterministic=det)
            for d, v, p, (name, m), det in itertools.product(("bf16", "fp16"), DORA_VARIANTS, DROPOUTS, M_REGIMES,
                                                             (False, True))]
    for variant, opts in VARIANTS.items():
        if variant == "linear" or variant in DORA_VARIANTS:
            continue
        shape = {key: opts[key] for key in _SHAPE_KEYS if key in opts}
        out.append(Scenario(p=0.1, variant=variant, regime=f"M={shape.get('m', 1024)}", **shape))
    return out


# --------------------------------------------------------------------------------------------------------------
# Recording launches
# --------------------------------------------------------------------------------------------------------------
class PointerStandIn:
    """What a recorded tensor argument becomes: its dtype and whether its address is 16-byte aligned.

    The CUDA caching allocator hands out 512-byte-aligned blocks, so a tensor's alignment is that of its
    storage offset. Triton's specialisation reads ``dtype`` and ``data_ptr()``, nothing else.
    """

    def __init__(self, dtype, aligned: bool) -> None:
        self.dtype = dtype
        self._ptr = 0 if aligned else 8

    def data_ptr(self) -> int:
        return self._ptr


@dataclasses.dataclass
class Launch:
    kernel: Any  # the triton JITFunction
    args: tuple
    kwargs: dict
    scenario: Scenario
    phase: str


def _stand_in(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return PointerStandIn(value.dtype, value.storage_offset() * value.element_size() % 16 == 0)
    return value


@contextlib.contextmanager
def fake_cuda_device(target: Target) -> Iterator[None]:
    """torch.cuda's device queries answer for ``target`` (no driver is touched)."""
    import torch

    props = target.device_properties()
    with contextlib.ExitStack() as stack:
        for name, value in dict(
            is_available=lambda: True, device_count=lambda: 1, current_device=lambda: 0,
            get_device_properties=lambda *a, **k: props, get_device_name=lambda *a, **k: props.name,
            get_device_capability=lambda *a, **k: (props.major, props.minor),
        ).items():
            stack.enter_context(mock.patch.object(torch.cuda, name, value))
        from torch._subclasses import fake_tensor

        if hasattr(fake_tensor, "init_gpu_context"):  # torch <= 2.11 makes a real CUDA tensor once is_available()
            stack.enter_context(mock.patch.object(fake_tensor, "init_gpu_context", lambda device: None))
        yield


@contextlib.contextmanager
def recording_launches(sink: list[Launch], context: dict) -> Iterator[None]:
    """Every Triton launch appends a Launch to ``sink`` instead of running; autotuned launches are expanded."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def record(kernel, *args, grid, warmup, **kwargs):
        sink.append(Launch(kernel, tuple(_stand_in(a) for a in args), {k: _stand_in(v) for k, v in kwargs.items()},
                           context["scenario"], context["phase"]))

    def expand(tuner, *args, **kwargs):
        tuner.nargs = dict(zip(tuner.arg_names, args))
        try:
            configs = tuner.prune_configs(kwargs)
            for config in configs:
                tuner.fn.run(*args, **kwargs, **config.all_kwargs())
        finally:
            tuner.nargs = None

    with mock.patch.object(JITFunction, "run", record), mock.patch.object(Autotuner, "run", expand):
        yield


def _clear_caches(module) -> None:
    """Forget what the backend memoised about the previous (fake) device, e.g. its SM count."""
    for value in vars(module).values():
        if callable(getattr(value, "cache_clear", None)):
            value.cache_clear()


def _run_scenario(backend, scenario: Scenario, context: dict) -> None:
    import torch

    from coto_kernels.kernels.interface import GradRequest, LoraOptions

    opts = VARIANTS[scenario.variant]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(scenario.dtype, torch.float32)
    adapter_dtype = torch.float32 if opts.get("adapter_dtype") == "fp32" else dtype
    m, k, n, r = scenario.m, scenario.k, scenario.n, scenario.r
    kn = opts.get("weight_is_kn", False)

    def empty(*shape, dt=dtype):
        return torch.empty(*shape, device="cuda", dtype=dt)

    x, dy = empty(m, k), empty(m, n)
    weight = empty(k, n) if kn else empty(n, k)
    bias = empty(n) if opts.get("bias") else None
    lora_a, lora_b = empty(r, k, dt=adapter_dtype), empty(n, r, dt=adapter_dtype)
    lora_bias = empty(n, dt=adapter_dtype) if opts.get("lora_bias") else None
    options = LoraOptions(scaling=2.0, dropout_p=scenario.p, seed=scenario.seed, gate=True, weight_is_kn=kn)
    need = GradRequest(dx=opts.get("need_dx", True), dlora=True, dbias=opts.get("need_dbias", False),
                       dlora_bias=lora_bias is not None)
    if opts.get("dora"):
        _run_dora(x, dy, weight, bias, lora_a, lora_b, lora_bias, options, need, context)
        return
    context["phase"] = "fwd"
    _, s = backend.lora_forward(x, weight, bias, lora_a, lora_b, lora_bias, options=options)
    context["phase"] = "bwd"
    backend.lora_backward(dy, x, weight, lora_a, lora_b, s, options=options, need=need)
    if scenario.p > 0 and scenario.variant == "linear" and scenario.dtype == "bf16" and scenario.r == 16:
        context["phase"] = "mask"
        backend.dropout_keep_mask(scenario.seed, (m, k), scenario.p, x.device)


def _run_dora(x, dy, weight, bias, lora_a, lora_b, lora_bias, options, need, context: dict) -> None:
    """The launches of ``dora_triton``'s forward and backward (Z stored when there is a base bias)."""
    import torch

    from coto_kernels.kernels import dora_triton

    magnitude = torch.empty(weight.shape[1] if options.weight_is_kn else weight.shape[0], device="cuda",
                            dtype=torch.float32)
    context["phase"] = "fwd"
    norm = dora_triton.dora_row_norm(weight, lora_a, lora_b, lora_bias, scaling=options.scaling,
                                     weight_is_kn=options.weight_is_kn)
    y, s, z = dora_triton.dora_forward(x, weight, bias, lora_a, lora_b, lora_bias, magnitude, norm,
                                       options=options, save_z=True)
    context["phase"] = "bwd"
    dora_triton.dora_backward(dy, x, y if z is None else None, weight, bias, lora_a, lora_b, lora_bias,
                              magnitude, norm, s, z, options=options, need=need, need_magnitude=True)


@contextlib.contextmanager
def _torch_switches(scenario: Scenario) -> Iterator[None]:
    import torch

    tf32 = torch.backends.cuda.matmul.allow_tf32
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.backends.cuda.matmul.allow_tf32 = scenario.dtype != "fp32-ieee"
    torch.use_deterministic_algorithms(scenario.deterministic)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.use_deterministic_algorithms(deterministic)


_FAKE_MODE: list = []


def _fake_mode():
    """One FakeTensorMode for every recording: fake tensors a backend memoises stay valid in later scenarios."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not _FAKE_MODE:
        _FAKE_MODE.append(FakeTensorMode())
    return _FAKE_MODE[0]


def record_launches(backend, grid: list[Scenario], target: Target) -> list[Launch]:
    """The launches ``backend``'s host functions make for each scenario on ``target`` (nothing runs)."""
    launches: list[Launch] = []
    context: dict = {}
    _clear_caches(backend)
    with fake_cuda_device(target), recording_launches(launches, context), warnings.catch_warnings():
        # Host code may test a tensor's address for alignment; a fake tensor's reads as 0 (aligned), as the
        # caching allocator's 512-byte blocks are.
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        for scenario in grid:
            context["scenario"] = scenario
            with _torch_switches(scenario), _fake_mode():
                try:
                    _run_scenario(backend, scenario, context)
                except Exception as error:
                    raise RuntimeError(f"host functions failed for {scenario.label} on {target.name}: "
                                       f"{type(error).__name__}: {error}") from error
    _clear_caches(backend)
    return launches


# --------------------------------------------------------------------------------------------------------------
# Specialisation into compile jobs
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CompileJob:
    kernel: Any
    target: Target
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    key: str
    config: dict  # declared tl.constexpr parameters + num_warps/num_stages (what the table shows)
    specialized: list[str]  # runtime ints/None the JIT turned into constants
    uses: list[tuple[Scenario, str]] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return self.kernel.__name__


def _constant_repr(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value).replace("triton.language.", "")


def specialize(launch: Launch, target: Target, backend_cache: dict) -> CompileJob:
    """The compile that the JIT would make for ``launch`` on ``target``."""
    from triton.compiler import ASTSource, make_backend
    from triton.compiler.compiler import get_cache_key
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    if target.name not in backend_cache:
        from triton._C.libtriton import get_cache_invalidating_env_vars
        from triton.backends.compiler import GPUTarget

        backend = make_backend(GPUTarget("cuda", target.capability, 32))
        backend_cache[target.name] = (backend, get_cache_invalidating_env_vars())
    backend, env_vars = backend_cache[target.name]
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    key = hashlib.sha256(get_cache_key(ASTSource(fn, signature, constexprs, attrs), backend, options,
                                       env_vars).encode()).hexdigest()
    names = fn.arg_names
    config, specialized = {}, []
    for (index, *_), value in sorted(constexprs.items()):
        if fn.params[index].is_constexpr:
            config[names[index]] = _constant_repr(value)
        else:
            specialized.append(f"{names[index]}={value}")
    config.update(num_warps=options.num_warps, num_stages=options.num_stages)
    return CompileJob(fn, target, signature, constexprs, attrs, options.__dict__, key, config, specialized)


def build_jobs(launches_by_target: dict[str, list[Launch]]) -> list[CompileJob]:
    """One job per distinct compile, in first-seen order, each listing the scenarios that launch it."""
    jobs: dict[str, CompileJob] = {}
    backend_cache: dict = {}
    for target_name, launches in launches_by_target.items():
        for launch in launches:
            job = specialize(launch, TARGETS[target_name], backend_cache)
            job = jobs.setdefault(job.key, job)
            if (launch.scenario, launch.phase) not in job.uses:
                job.uses.append((launch.scenario, launch.phase))
    return list(jobs.values())


# --------------------------------------------------------------------------------------------------------------
# Parsing tool output (pure functions, unit-tested on captured text)
# --------------------------------------------------------------------------------------------------------------
_RESOURCE_FUNCTION = re.compile(r"^\s*Function\s+([^:\s]+)\s*:\s*$")
_RESOURCE_FIELD = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump --dump-resource-usage`` output -> {function: {"REG": .., "STACK": .., "SHARED": .., ...}}."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        match = _RESOURCE_FUNCTION.match(line)
        if match:
            current = match.group(1)
            out[current] = {}
        elif current is not None and _RESOURCE_FIELD.search(line):
            out[current].update({key: int(value) for key, value in _RESOURCE_FIELD.findall(line)})
    return out


_PTXAS_ENTRY = re.compile(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(text: str) -> dict[str, dict[str, int]]:
    """``ptxas -v`` output -> {function: {"stack_frame", "spill_stores", "spill_loads", "registers", "smem"}}.

    ptxas prints one block per function (entry functions and any non-inlined device functions):
    "Function properties for F" followed by the frame line, then "Used N registers, ... M bytes smem".
    """
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        entry = _PTXAS_ENTRY.search(line)
        if entry:
            current = entry.group(1)
            out.setdefault(current, {})
            continue
        if current is None:
            continue
        frame = _PTXAS_FRAME.search(line)
        if frame:
            out[current].update(zip(("stack_frame", "spill_stores", "spill_loads"), map(int, frame.groups())))
        used = _PTXAS_USED.search(line)
        if used:
            out[current]["registers"] = int(used.group(1))
            smem = _PTXAS_SMEM.search(line)
            out[current]["smem"] = int(smem.group(1)) if smem else 0
    return out


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with modifiers, e.g. "LDGSTS.E.BYPASS.128"
    branch_target: int | None  # for BRA with an absolute target


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"^\s*(?:`\(([^)]+)\)|(0x[0-9a-f]+))")
_LABEL = re.compile(r"^\s*(\.L_\w+):")
_MMA = re.compile(r"^(HGMMA|HMMA|IMMA|QGMMA|IGMMA|BGMMA|UTCHMMA|UTCQMMA|UTCIMMA|UTCMMA|DMMA)\b")


def parse_sass(text: str, function: str | None = None) -> list[Instruction]:
    """Instructions of one function in ``cuobjdump -sass`` or ``nvdisasm`` output (the first if unnamed).

    Branch targets are absolute addresses (cuobjdump) or labels (nvdisasm), both resolved to addresses.
    """
    lines = text.splitlines()
    start, end = 0, len(lines)
    headers = [i for i, line in enumerate(lines) if re.match(r"^\s*(Function :|\.text\.)", line.strip())
               or line.strip().startswith("Function :")]
    if headers:
        names = [re.sub(r"^(Function :|\.text\.)", "", lines[i].strip()).strip().rstrip(":") for i in headers]
        pick = names.index(function) if function in names else 0
        start = headers[pick]
        end = headers[pick + 1] if pick + 1 < len(headers) else len(lines)
    labels: dict[str, int] = {}
    raw: list[tuple[int, str, str]] = []
    pending: list[str] = []
    for line in lines[start:end]:
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        match = _SASS_LINE.match(line)
        if not match:
            continue
        address = int(match.group(1), 16)
        for name in pending:
            labels[name] = address
        pending = []
        raw.append((address, match.group(2), match.group(3)))
    out = []
    for address, opcode, operands in raw:
        target = None
        if opcode.split(".")[0] == "BRA":
            ref = _BRANCH_TARGET.match(operands)
            if ref:
                target = labels.get(ref.group(1)) if ref.group(1) else int(ref.group(2), 16)
        out.append(Instruction(address, opcode, target))
    return out


@dataclasses.dataclass(frozen=True)
class Loop:
    start: int  # address of the first instruction of the body (the branch target)
    end: int  # address of the backward branch
    instructions: int
    mma: int  # tensor-core instructions in the body


def find_loops(instructions: list[Instruction]) -> list[Loop]:
    """Every backward branch (target before the branch) is a loop; a branch to itself (the exit trap) is not."""
    loops = []
    for branch in instructions:
        if branch.branch_target is None or branch.branch_target >= branch.address:
            continue
        body = [i for i in instructions if branch.branch_target <= i.address <= branch.address]
        loops.append(Loop(branch.branch_target, branch.address, len(body),
                          sum(bool(_MMA.match(i.opcode)) for i in body)))
    return loops


def inner_mma_loop(instructions: list[Instruction]) -> Loop | None:
    """The smallest loop holding a tensor-core instruction (a GEMM's K loop; ``main_loop`` finds its tile loop)."""
    with_mma = [loop for loop in find_loops(instructions) if loop.mma]
    return min(with_mma, key=lambda loop: loop.instructions) if with_mma else None


def main_loop(instructions: list[Instruction]) -> Loop | None:
    """The largest loop holding a tensor-core instruction; else the largest loop; None without loops."""
    loops = find_loops(instructions)
    with_mma = [loop for loop in loops if loop.mma]
    pool = with_mma or loops
    return max(pool, key=lambda loop: loop.instructions) if pool else None


def streamed_tile_elements(config: dict) -> int | None:
    """Elements of the one 2-D tile a skinny kernel streams per loop iteration: the product of its two
    ``BLOCK_*`` sizes (BLOCK_M x BLOCK_K of X, BLOCK_M x BLOCK_N of dY). None for a GEMM (three sizes)."""
    blocks = [value for name, value in config.items() if name.startswith("BLOCK_") and isinstance(value, int)]
    return blocks[0] * blocks[1] if len(blocks) == 2 else None


def per_element(loop_instructions: int, num_warps: int, tile_elements: int) -> float:
    """Instructions a thread issues per element it owns: body x threads per program / elements per iteration."""
    return loop_instructions * 32 * num_warps / tile_elements


def max_warps_for_registers(registers: int, regs_per_sm: int = 65536) -> int:
    """Warps per program the register file allows (per-warp allocation in units of 256 registers)."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    return regs_per_sm // per_warp


# --------------------------------------------------------------------------------------------------------------
# Compiling (worker processes)
# --------------------------------------------------------------------------------------------------------------
_JOBS: list[CompileJob] = []  # set before the pool forks; workers receive indexes


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def compile_and_inspect(index: int) -> dict:
    """Compile job ``index`` and read its resources; never raises (an error goes into the result)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    job = _JOBS[index]
    knobs.nvidia.dump_ptxas_log = True  # Triton prints the log of its own `ptxas -v` run
    knobs.compilation.always_compile = True
    started = time.perf_counter()
    log = io.StringIO()
    result: dict[str, Any] = {}
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(job.kernel, job.signature, job.constexprs, job.attrs),
                                    target=GPUTarget("cuda", job.target.capability, 32), options=job.options)
    except Exception as error:  # a compile error is a finding, reported with the start of its message
        message = f"{type(error).__name__}: {error}".strip().splitlines()
        return dict(error=" | ".join(message[:6])[:600], compile_s=time.perf_counter() - started)
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage_text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                                    capture_output=True, text=True, check=True).stdout
        sass_text = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)],
                                   capture_output=True, text=True, check=True).stdout
    name = kernel.metadata.name
    usage = parse_resource_usage(usage_text).get(name, {})
    ptxas = parse_ptxas_log(log.getvalue()).get(name, {})
    instructions = parse_sass(sass_text, name)
    loop = main_loop(instructions)
    inner = inner_mma_loop(instructions)
    result.update(
        regs=usage.get("REG"), stack=usage.get("STACK"), local=usage.get("LOCAL"), static_smem=usage.get("SHARED"),
        spill_stores=ptxas.get("spill_stores"), spill_loads=ptxas.get("spill_loads"),
        stack_frame=ptxas.get("stack_frame"), smem=kernel.metadata.shared,
        tmem=getattr(kernel.metadata, "tmem_size", 0) or 0, sass=len(instructions),
        mma=sum(bool(_MMA.match(i.opcode)) for i in instructions),
        loop_instructions=loop.instructions if loop else None, loop_mma=loop.mma if loop else None,
        inner_loop_instructions=inner.instructions if inner else None,
        compile_s=time.perf_counter() - started,
    )
    if usage.get("REG") is None or ptxas.get("spill_stores") is None:
        result["error"] = "could not read the resource usage (cuobjdump) or the ptxas -v log"
    return result


def _target_loop_cost(job: CompileJob, result: dict) -> float | None:
    """Loop cost of an S/dA pass with dropout used at the issue's setting (16-bit X, r = 16, an aligned
    ``linear`` layer), the launches the <= 8 target is for; None for every other compile. Other ranks and odd
    shapes are reported in the table: larger ranks add MMA and side-operand work per element of X (r = 256:
    ~23 on sm_90), unaligned rows load word by word (~11-16), and r = 8 pads its side tile to 16 (~8.8)."""
    tile = streamed_tile_elements(job.config)
    loop = result.get("loop_instructions")
    if not (job.config.get("LORA_DROPOUT") and tile and loop and job.name == "_lora_x_pass_kernel"):
        return None
    if not any(s.r == 16 and s.variant == "linear" and s.dtype in ("bf16", "fp16") for s, _ in job.uses):
        return None
    return per_element(loop, job.config["num_warps"], tile)


def twin_loop_cost(job: CompileJob, result: dict) -> float | None:
    """SASS instructions per element of the X tile in the K loop of DoRA's dropout forward GEMM (DORA_DROPOUT with
    the column scale); None for every other compile."""
    config = job.config
    inner = result.get("inner_loop_instructions")
    if not (config.get("DORA_DROPOUT") and config.get("HAS_COL_SCALE")) or job.name != "_fused_gemm_kernel":
        return None
    return per_element(inner, config["num_warps"], config["BLOCK_M"] * config["BLOCK_K"]) if inner else None


def _twin_loop_target_applies(job: CompileJob) -> bool:
    """The setting TWIN_LOOP_TARGET_PER_ELEMENT is for: 16-bit DoRA at r = 16, aligned, BLOCK_N >= 128."""
    return (job.config.get("EVEN_K") and job.config.get("BLOCK_N", 0) >= 128
            and any(s.r == 16 and s.dtype in ("bf16", "fp16") and s.variant.startswith("dora") for s, _ in job.uses))


def problems(job: CompileJob, result: dict) -> list[str]:
    """Why this compile fails the check (empty when it passes)."""
    if result.get("error"):
        return [f"compile error: {result['error']}"]
    found = []
    if result["spill_stores"] or result["spill_loads"]:
        found.append(f"spills ({result['spill_stores']} B stores, {result['spill_loads']} B loads)")
    if result["stack"] or result["stack_frame"] or result["local"]:
        found.append(f"stack {max(result['stack'] or 0, result['stack_frame'] or 0)} B, local {result['local']} B")
    if result["smem"] > job.target.smem_per_block_optin:
        found.append(f"shared memory {result['smem']} B > {job.target.smem_per_block_optin} B ({job.target.name})")
    if job.target.max_tmem_columns and result["tmem"] > job.target.max_tmem_columns:
        found.append(f"tensor memory {result['tmem']} columns > {job.target.max_tmem_columns}")
    cost = _target_loop_cost(job, result)
    if cost is not None and cost > LOOP_TARGET_PER_ELEMENT:
        found.append(f"S/dA loop {cost:.2f} SASS instructions per element > {LOOP_TARGET_PER_ELEMENT:g}")
    twin = twin_loop_cost(job, result)
    if twin is not None and twin > TWIN_LOOP_TARGET_PER_ELEMENT and _twin_loop_target_applies(job):
        found.append(f"DoRA dropout K loop {twin:.2f} SASS instructions per element of X > "
                     f"{TWIN_LOOP_TARGET_PER_ELEMENT:g}")
    warps = job.config["num_warps"]
    if warps > max_warps_for_registers(result["regs"], job.target.regs_per_sm):
        found.append(f"{warps} warps x {result['regs']} registers exceed the register file")
    return found


def run_jobs(indexes: list[int], workers: int, on_result: Callable[[int, dict], None],
             deadline: float | None = None) -> list[int]:
    """Compile ``indexes`` on ``workers`` processes; returns those left unstarted when ``deadline`` passed."""
    def late() -> bool:
        return deadline is not None and time.monotonic() > deadline

    if workers <= 1 or len(indexes) <= 1:
        for position, index in enumerate(indexes):
            if late():
                return indexes[position:]
            on_result(index, compile_and_inspect(index))
        return []
    context = multiprocessing.get_context("fork")  # workers inherit _JOBS (kernels and dtypes are not picklable)
    left: list[int] = []
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {pool.submit(compile_and_inspect, index): index for index in indexes}
        for future in concurrent.futures.as_completed(futures):
            if future.cancelled():
                continue
            on_result(futures[future], future.result())
            if late() and not left:
                left = [index for f, index in futures.items() if f.cancel()]
    return sorted(left)


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------
_RESOURCE_KEYS = ("regs", "stack", "stack_frame", "local", "spill_stores", "spill_loads", "smem", "static_smem",
                  "tmem", "sass", "mma", "loop_instructions", "loop_mma", "inner_loop_instructions", "error")


def _uses_summary(uses: list[tuple[Scenario, str]]) -> dict:
    def values(attr):
        seen = []
        for scenario, _ in uses:
            value = getattr(scenario, attr)
            if value not in seen:
                seen.append(value)
        return seen

    return dict(phases=sorted({phase for _, phase in uses}), dtypes=values("dtype"), ranks=values("r"),
                dropouts=values("p"), regimes=values("regime"), variants=values("variant"),
                deterministic=values("deterministic"))


def row_for(job: CompileJob, result: dict) -> dict:
    row = dict(key=job.key, kernel=job.name, target=job.target.name, config=job.config,
               specialized=job.specialized, uses=_uses_summary(job.uses),
               **{key: result.get(key) for key in _RESOURCE_KEYS if result.get(key) is not None})
    tile = streamed_tile_elements(job.config)
    if tile and row.get("loop_instructions"):
        row["loop_per_element"] = round(per_element(row["loop_instructions"], job.config["num_warps"], tile), 2)
    twin = twin_loop_cost(job, result)
    if twin is not None:
        row["twin_loop_per_element"] = round(twin, 2)
    row["smem_limit"] = job.target.smem_per_block_optin
    row["problems"] = problems(job, result)
    return row


def _fmt_list(values: list) -> str:
    return "/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _config_text(config: dict) -> str:
    skip = {"CDT", "DOT_PRECISION"}
    return " ".join(f"{k}={v}" for k, v in config.items() if k not in skip)


def markdown(meta: dict, rows: list[dict], native: list[dict]) -> str:
    failed = [row for row in rows if row["problems"]]
    verdict = ("FAIL" if failed or any(n["problems"] for n in native)
               else "INCOMPLETE" if meta.get("unchecked") else "PASS")
    out = ["# Kernel compile check", "",
           "Generated by `make kernels-check` (`bench/kernels_check.py`); do not edit. Every launch the Triton "
           "backend's host functions make over the grid below, compiled for each target with the Triton wheel's "
           "ptxas (no GPU): registers and stack from `cuobjdump --dump-resource-usage`, spills from `ptxas -v`, "
           "shared memory from the compiled metadata (limit: the per-block opt-in maximum).", "",
           f"- Triton {meta['triton']}; targets {', '.join(meta['targets'])}; grid `{meta['grid']}` "
           f"({meta['scenarios']} scenarios, {meta['launches']} launches recorded, {len(rows)} distinct compiles)",
           f"- Result: **{verdict}** ({len(failed)} failing compiles, {meta.get('unchecked', 0)} not compiled yet)",
           ""]
    if failed:
        out += ["## Failures", "", "| kernel | target | config | used by | problems |", "|---|---|---|---|---|"]
        for row in failed:
            uses = row["uses"]
            out.append(f"| {row['kernel']} | {row['target']} | {_config_text(row['config'])} | "
                       f"{_fmt_list(uses['dtypes'])} r{_fmt_list(uses['ranks'])} p{_fmt_list(uses['dropouts'])} "
                       f"{_fmt_list(uses['phases'])} | {'; '.join(row['problems'])} |")
        out.append("")
    out += ["## Loop cost (SASS instructions per element of the streamed tile)", "",
            "Main loop = the largest backward branch holding a tensor-core instruction; per element = loop "
            "instructions x threads per program / (the two BLOCK_* sizes). The S and dA passes with dropout "
            f"used at r = 16 on an aligned 16-bit layer fail the check above {LOOP_TARGET_PER_ELEMENT:g}.", "",
            "| kernel | target | dropout | dtype | loop instructions | per element (min-max over r) |",
            "|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if "loop_per_element" in row:
            dropout = row["config"].get("LORA_DROPOUT")
            for dtype in row["uses"]["dtypes"]:
                groups.setdefault((row["kernel"], row["target"], dropout, dtype), []).append(row)
    for (kernel, target, dropout, dtype), group in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        per = [row["loop_per_element"] for row in group]
        loops = [row["loop_instructions"] for row in group]
        out.append(f"| {kernel} | {target} | {dropout if dropout is not None else '-'} | {dtype} | "
                   f"{min(loops)}-{max(loops)} | {min(per):.2f}-{max(per):.2f} |")
    twins = sorted((row for row in rows if "twin_loop_per_element" in row),
                   key=lambda row: (row["target"], -row["config"]["BLOCK_N"], -row["config"]["BLOCK_M"]))
    if twins:
        out += ["", "DoRA's dropout forward GEMM (DORA_DROPOUT): its K loop (the smallest loop holding an MMA) per "
                "element of the X tile, both MMAs and the mask included; tiles with BLOCK_N >= 128 of a 16-bit "
                f"r = 16 layer fail above {TWIN_LOOP_TARGET_PER_ELEMENT:g}.", "",
                "| target | dtype | tile (M x N x K / warps) | biases | EVEN_K | K-loop instructions "
                "| per element of X |",
                "|---|---|---|---|---|---|---|"]
        for row in twins:
            c = row["config"]
            out.append(f"| {row['target']} | {c['CDT']} | {c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} / "
                       f"{c['num_warps']} | {'yes' if c.get('HAS_BIAS') or c.get('HAS_LORA_BIAS') else 'no'} | "
                       f"{c.get('EVEN_K')} | {row['inner_loop_instructions']} | {row['twin_loop_per_element']:.2f} |")
    out += ["", "## Per kernel", "",
            "| kernel | target | compiles | max regs | max stack | spilling | max smem / limit | failing |",
            "|---|---|---|---|---|---|---|---|"]
    by_kernel: dict[tuple, list[dict]] = {}
    for row in rows:
        by_kernel.setdefault((row["kernel"], row["target"]), []).append(row)
    for (kernel, target), group in sorted(by_kernel.items()):
        ok = [row for row in group if "regs" in row]
        out.append(f"| {kernel} | {target} | {len(group)} | {max((r['regs'] for r in ok), default='-')} | "
                   f"{max((r.get('stack', 0) for r in ok), default='-')} | "
                   f"{sum(bool(r.get('spill_stores') or r.get('spill_loads')) for r in ok)} | "
                   f"{max((r['smem'] for r in ok), default='-')} / {group[0]['smem_limit']} | "
                   f"{sum(bool(r['problems']) for r in group)} |")
    if native:
        out += ["", "## CUDA sources (nvcc)", "", "| file | target | regs | stack | spills | problems |",
                "|---|---|---|---|---|---|"]
        for item in native:
            out.append(f"| {item['file']} | {item['target']} | {item.get('regs', '-')} | {item.get('stack', '-')} | "
                       f"{item.get('spills', '-')} | {'; '.join(item['problems']) or 'ok'}"
                       + (f" (loads; CUDA kernels for {', '.join(item['cuda_ops'])})" if "cuda_ops" in item else "")
                       + " |")
    out += ["", "## Every compile", "",
            "| kernel | target | config | used by | regs | stack | spill st/ld | smem | SASS | loop | /elem | ok |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        uses = row["uses"]
        used = (f"{_fmt_list(uses['phases'])}: {_fmt_list(uses['dtypes'])} r{_fmt_list(uses['ranks'])} "
                f"p{_fmt_list(uses['dropouts'])} {_fmt_list(uses['regimes'])}"
                + (f" {_fmt_list(uses['variants'])}" if uses["variants"] != ["linear"] else "")
                + (" det" if uses["deterministic"] == [True] else ""))
        out.append(f"| {row['kernel']} | {row['target']} | {_config_text(row['config'])} | {used} | "
                   f"{row.get('regs', '-')} | {row.get('stack', '-')} | {row.get('spill_stores', '-')}/"
                   f"{row.get('spill_loads', '-')} | {row.get('smem', '-')} | {row.get('sass', '-')} | "
                   f"{row.get('loop_instructions', '-')} | {row.get('loop_per_element', '-')} | "
                   f"{'FAIL' if row['problems'] else 'ok'} |")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------------------
# CUDA sources
# --------------------------------------------------------------------------------------------------------------
NVCC_TARGETS = (("sm_80", "-gencode=arch=compute_80,code=sm_80"), ("sm_90", "-gencode=arch=compute_90,code=sm_90"))


def nvcc_command(nvcc: str, source: Path, output: Path, gencode: str) -> list[str]:
    return [nvcc, "-c", "-std=c++17", "-O3", f"-I{source.parent}", "-Werror", "all-warnings",
            "-Xptxas", "-v,-warn-spills,-Werror", gencode, str(source), "-o", str(output)]


def check_native(csrc: Path = REPO / "csrc") -> list[dict]:
    """Compile every ``csrc/*.cu`` for sm_80 and sm_90; [] (with a message) when there is nothing to do."""
    sources = sorted(csrc.glob("*.cu"))
    if not sources:
        print(f"native: no {csrc.relative_to(REPO) if csrc.is_relative_to(REPO) else csrc}/*.cu yet: skipped")
        return []
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("native: nvcc not found on PATH: skipped")
        return []
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for source, (target, gencode) in itertools.product(sources, NVCC_TARGETS):
            command = nvcc_command(nvcc, source, Path(folder) / f"{source.stem}.{target}.o", gencode)
            done = subprocess.run(command, capture_output=True, text=True)
            log = done.stdout + done.stderr
            item: dict[str, Any] = dict(file=str(source.relative_to(REPO)) if source.is_relative_to(REPO)
                                        else str(source), target=target, problems=[])
            if done.returncode != 0:
                tail = [line for line in log.splitlines() if "error" in line.lower()] or log.splitlines()[-5:]
                item["problems"].append("nvcc failed: " + " | ".join(tail[:6])[:600])
            functions = parse_ptxas_log(log)
            item["regs"] = max((f.get("registers", 0) for f in functions.values()), default=0)
            item["stack"] = max((f.get("stack_frame", 0) for f in functions.values()), default=0)
            item["spills"] = sum(f.get("spill_stores", 0) + f.get("spill_loads", 0) for f in functions.values())
            if item["spills"] or item["stack"]:
                item["problems"].append(f"spills {item['spills']} B / stack {item['stack']} B")
            print(f"native: {item['file']} {target}: {len(functions)} kernels, max {item['regs']} registers, "
                  f"{'; '.join(item['problems']) or 'ok'}", flush=True)
            results.append(item)
    return results


def nvcc_include_dirs(nvcc: str) -> list[str]:
    """The CUDA toolkit's include folders, as nvcc itself passes them to the host compiler (``-v --dryrun``)."""
    done = subprocess.run([nvcc, "-v", "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True)
    folders = []
    for line in done.stderr.splitlines():
        key, _, value = line.removeprefix("#$ ").partition("=")
        if key in ("INCLUDES", "SYSTEM_INCLUDES"):
            words = [word.strip('"') for word in value.split()]
            folders += [word.removeprefix("-I") for word in words if word and word != "-isystem"]
    return folders


def binding_command(cxx: str, source: Path, include_dirs: list[str], library: Path) -> list[str]:
    """Build a torch binding as a shared library as setup.py compiles it (C++20), warnings as errors in csrc's own
    code; -O0, since only its types and its registrations are checked. Links torch's CPU libraries only."""
    from torch.utils.cpp_extension import library_paths

    system = [flag for folder in include_dirs for flag in ("-isystem", folder)]
    libs = [f"-L{folder}" for folder in library_paths()]
    return [cxx, "-shared", "-fPIC", "-O0", "-std=c++20", "-Wall", "-Wextra", "-Werror", *system,
            f"-I{source.parent}", str(source), *libs, "-lc10", "-ltorch_cpu", "-o", str(library)]


def torch_cuda_include_dirs(folder: Path) -> list[str]:
    """torch's include folders, plus a stand-in for the one generated header its CPU wheels leave out.

    ``c10/cuda/impl/cuda_cmake_macros.h`` is written by torch's CMake build and ships only with CUDA wheels; its
    one definition says c10_cuda is a shared library, which is what those wheels build."""
    from torch.utils.cpp_extension import include_paths

    dirs = list(include_paths())
    if not any((Path(d) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for d in dirs):
        stub = folder / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        dirs.insert(0, str(folder))
    return dirs


@functools.cache
def _symbols(nm: str, *args: str) -> frozenset[str]:
    done = subprocess.run([nm, *args], capture_output=True, text=True, check=True)
    return frozenset(line.split()[-1] for line in done.stdout.splitlines() if line.split())


def stand_in_library(nm: str, cc: str, library: Path, folder: Path) -> Path:
    """A library defining every symbol ``library`` needs that torch's CPU libraries lack (c10_cuda's, cudart's,
    the CUDA kernels' C interface), as inert 64-byte objects: enough for the dynamic linker to load it, never called.
    """
    from torch.utils.cpp_extension import library_paths

    torch_lib = Path(library_paths()[0])
    provided = _symbols(nm, "-D", "--defined-only", str(torch_lib / "libc10.so"), str(torch_lib / "libtorch_cpu.so"))
    undefined = subprocess.run([nm, "-u", str(library)], capture_output=True, text=True, check=True).stdout
    needed = sorted({words[1] for words in map(str.split, undefined.splitlines())
                     if len(words) == 2 and words[0] == "U" and "@" not in words[1]} - provided)
    source = folder / "stand_ins.c"
    source.write_text("".join(f'char coto_stand_in_{i}[64] __asm__("{name}");\n' for i, name in enumerate(needed)))
    out = folder / "libstand_ins.so"
    subprocess.run([cc, "-shared", "-fPIC", str(source), "-o", str(out)], check=True, capture_output=True)
    return out


# Loads the CPU ops (their schemas), then the binding: torch checks each m.impl's C++ signature against its schema
# while the library loads, and a mismatch aborts the process (an exception in a static initialiser), hence a child.
_LOAD_PROBE = """
import ctypes, json, sys, torch
import coto_kernels.kernels.lora_native
ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)
torch.ops.load_library(sys.argv[2])
ops = [name for name in torch._C._dispatch_get_all_op_names() if name.startswith("coto_kernels_native::")]
print(json.dumps(sorted(op.split("::")[1] for op in ops if torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"))))
"""


def _child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def load_cuda_binding(library: Path, stand_ins: Path) -> tuple[list[str] | None, str]:
    """(the ops the binding gave CUDA kernels, "") when it loads into torch beside the CPU ops, else (None, why)."""
    done = subprocess.run([sys.executable, "-c", _LOAD_PROBE, str(stand_ins), str(library)], capture_output=True,
                          text=True, env=_child_env(), cwd=REPO)
    if done.returncode == 0:
        return json.loads(done.stdout.splitlines()[-1]), ""
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("frame #")]
    return None, " | ".join(lines[:8])[:600]


def native_cpu_ops_importable() -> bool:
    return subprocess.run([sys.executable, "-c", "import coto_kernels.kernels.lora_native"], capture_output=True,
                          env=_child_env(), cwd=REPO).returncode == 0


def check_cuda_bindings(csrc: Path = REPO / "csrc") -> list[dict]:
    """Build every ``csrc/*.cpp`` that includes c10/cuda (the CUDA ops' torch binding) and load it into torch.

    The binding is otherwise compiled only where torch has CUDA (on a lent GPU machine), so a mistake in it would
    first show there, where a registration whose C++ signature does not match the op's schema aborts the process
    that imports coto_kernels. Neither needs a CUDA torch to be found: it is compiled against torch's headers, the
    toolkit's and the stand-in of ``torch_cuda_include_dirs``, linked against torch's CPU libraries, and loaded
    (in a child process, after the CPU ops) with the CUDA symbols it needs defined by ``stand_in_library``."""
    sources = [path for path in sorted(csrc.glob("*.cpp")) if "<c10/cuda/" in path.read_text()]
    names = ("nvcc", os.environ.get("CXX", "c++"), os.environ.get("CC", "cc"), "nm")
    tools = [shutil.which(name) for name in names]
    if not sources or None in tools:
        print(f"native: CUDA binding check skipped (sources: {len(sources)}; tools: {dict(zip(names, tools))})")
        return []
    nvcc, cxx, cc, nm = tools
    loadable = native_cpu_ops_importable()
    if not loadable:
        print("native: the CPU ops are not built, so the CUDA binding is compiled but not loaded")
    results = []
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        include_dirs = torch_cuda_include_dirs(folder) + nvcc_include_dirs(nvcc)
        for source in sources:
            library = folder / f"{source.stem}.so"
            done = subprocess.run(binding_command(cxx, source, include_dirs, library), capture_output=True, text=True)
            item: dict[str, Any] = dict(file=str(source.relative_to(REPO)) if source.is_relative_to(REPO)
                                        else str(source), target="host C++", problems=[])
            if done.returncode != 0:
                errors = [line for line in done.stderr.splitlines() if "error" in line]
                shown = errors[:6] or done.stderr.splitlines()[-5:]
                item["problems"].append("C++ build failed: " + " | ".join(shown)[:600])
            elif loadable:
                ops, why = load_cuda_binding(library, stand_in_library(nm, cc, library, folder))
                if ops is None:
                    item["problems"].append(f"does not load into torch: {why}")
                else:
                    item["cuda_ops"] = ops
            print(f"native: {item['file']} (host C++, CUDA binding): "
                  f"{'; '.join(item['problems']) or 'ok'}" + (f", CUDA kernels for {item['cuda_ops']}"
                                                               if "cuda_ops" in item else ""), flush=True)
            results.append(item)
    return results


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------
def supported_targets(names: list[str]) -> list[str]:
    """The requested targets the installed Triton can build for (sm_100 needs a Blackwell-capable ptxas)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    out = []
    for name in names:
        try:
            backend = make_backend(GPUTarget("cuda", TARGETS[name].capability, 32))
            backend.hash()  # runs the target's ptxas --version
            out.append(name)
        except Exception as error:
            print(f"target {name}: not supported by Triton {_triton_version()} here ({error}); skipped")
    return out


def _triton_version() -> str:
    import triton

    return triton.__version__


def load_cache(path: Path) -> dict[str, dict]:
    """Rows of a previous report by compile key (an unreadable or missing report is an empty cache)."""
    if not path.exists():
        return {}
    try:
        return {row["key"]: row for row in json.loads(path.read_text())["compiles"] if "key" in row}
    except (ValueError, KeyError, TypeError):
        return {}


def priority(job: CompileJob) -> tuple:
    """Compile order: the issue's setting first (bf16, r 16, nn.Linear; sm_90 then sm_80), then by dtype, so a
    run stopped by its budget has checked what matters most."""
    issue_setting = any(s.dtype == "bf16" and s.r == 16 and s.variant == "linear" for s, _ in job.uses)
    first_dtype = min(DTYPES.index(scenario.dtype) for scenario, _ in job.uses)
    return not issue_setting, first_dtype, ("sm_90", "sm_80", "sm_100").index(job.target.name), job.name


def write_report(out: Path, meta: dict, jobs: list[CompileJob], results: dict[int, dict],
                 native: list[dict]) -> list[dict]:
    """Write OUT.json (also the cache) and OUT.md from the compiles done so far; returns the rows."""
    rows = [row_for(job, results[index]) for index, job in enumerate(jobs) if index in results]
    meta = dict(meta, unchecked=len(jobs) - len(rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, compiles=rows, native=native), indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(meta, rows, native))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=("full", "quick"), default="full")
    parser.add_argument("--targets", default="sm_80,sm_90", help="comma-separated (sm_80, sm_90, sm_100); "
                        "those the installed Triton cannot build are skipped")
    parser.add_argument("--only", default=None, help="only kernels whose name contains this")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes")
    parser.add_argument("--out", type=Path, default=DOCS, help="writes OUT.md and OUT.json")
    parser.add_argument("--no-cache", action="store_true", help="recompile what the previous OUT.json has")
    parser.add_argument("--recheck", type=int, default=2, help="recompile N cached compiles; fail if they moved")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop compiling after this long (progress is kept in OUT.json)")
    parser.add_argument("--require-complete", action="store_true",
                        help="fail when some compile is neither cached nor checked (after --budget-s)")
    parser.add_argument("--native-only", action="store_true",
                        help="only check csrc/ (the .cu files and the CUDA binding)")
    parser.add_argument("--dry-run", action="store_true", help="record and count the compiles, compile nothing")
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.native_only:
        return 1 if any(item["problems"] for item in check_native() + check_cuda_bindings()) else 0

    os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions, GPU tile configs
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    cache_dir = tempfile.mkdtemp(prefix="kernels_check_triton_")
    os.environ["TRITON_CACHE_DIR"] = cache_dir  # Triton's own cache: kept out of the user's
    from coto_kernels.kernels import lora_triton as backend

    if getattr(backend, "INTERPRET", False):
        print("lora_triton was imported under TRITON_INTERPRET=1; run this script in a fresh process", file=sys.stderr)
        return 2
    targets = supported_targets([name.strip() for name in args.targets.split(",") if name.strip()])
    grid = scenarios(args.grid)
    launches = {name: record_launches(backend, grid, TARGETS[name]) for name in targets}
    if args.only:
        launches = {name: [la for la in items if args.only in la.kernel.__name__] for name, items in launches.items()}
    jobs = build_jobs(launches)
    n_launches = sum(map(len, launches.values()))
    print(f"recorded {n_launches} launches over {len(grid)} scenarios x {len(targets)} targets "
          f"({time.monotonic() - started:.1f} s): {len(jobs)} distinct compiles", flush=True)

    if args.dry_run:
        counts: dict[tuple[str, str], int] = {}
        for job in jobs:
            counts[job.name, job.target.name] = counts.get((job.name, job.target.name), 0) + 1
        for (name, target), count in sorted(counts.items()):
            print(f"  {name} {target}: {count}")
        return 0
    json_path = args.out.with_suffix(".json")
    cache = {} if args.no_cache else load_cache(json_path)
    results: dict[int, dict] = {}
    for index, job in enumerate(jobs):
        if job.key in cache:
            results[index] = {key: cache[job.key].get(key) for key in _RESOURCE_KEYS}
    todo = sorted((i for i in range(len(jobs)) if i not in results), key=lambda i: priority(jobs[i]))
    recheck = random.sample(sorted(results), min(max(args.recheck, 0), len(results)))  # a fresh spot check each run
    print(f"{len(results)} compiles reused from {json_path.name}, {len(todo)} to compile, "
          f"{len(recheck)} rechecked", flush=True)

    meta = dict(triton=_triton_version(), targets=targets, grid=args.grid + (f" --only {args.only}" if args.only
                                                                            else ""),
                scenarios=len(grid), launches=n_launches)
    _JOBS[:] = jobs
    moved: list[str] = []
    progress = dict(done=0, saved=time.monotonic())

    def on_result(index: int, result: dict) -> None:
        job = jobs[index]
        if index in results:  # a recheck of a cached compile
            old = {k: results[index].get(k) for k in ("regs", "stack", "spill_stores", "smem", "sass")}
            new = {k: result.get(k) for k in old}
            if old != new:
                moved.append(f"{job.name} {job.target.name} {_config_text(job.config)}: cached {old}, now {new}")
        results[index] = result
        progress["done"] += 1
        print(f"[{progress['done']}/{len(todo) + len(recheck)}] {job.name} {job.target.name} "
              f"{_config_text(job.config)}: regs {result.get('regs')} smem {result.get('smem')} "
              f"({result.get('compile_s', 0):.1f} s) {'; '.join(problems(job, result)) or 'ok'}", flush=True)
        if time.monotonic() - progress["saved"] > 60:  # keep progress if the run is stopped
            write_report(args.out, meta, jobs, results, [])
            progress["saved"] = time.monotonic()

    deadline = started + args.budget_s if args.budget_s is not None else None
    unchecked = run_jobs(recheck + todo, args.jobs, on_result, deadline)
    shutil.rmtree(cache_dir, ignore_errors=True)
    native = check_native() + check_cuda_bindings()
    rows = write_report(args.out, meta, jobs, results, native)
    failing = [row for row in rows if row["problems"]]
    for row in failing:
        print(f"FAIL {row['kernel']} {row['target']} {_config_text(row['config'])}: {'; '.join(row['problems'])}")
    for line in moved:
        print(f"FAIL cached result does not reproduce: {line}")
    if unchecked:
        print(f"{'FAIL' if args.require_complete else 'WARNING'}: {len(unchecked)} compiles not checked within "
              f"--budget-s {args.budget_s:g} (the report says INCOMPLETE); run `make kernels-check` to completion "
              f"(it resumes from {json_path.name}) and commit {args.out.name}.*")
    native_failed = any(item["problems"] for item in native)
    ok = not (failing or moved or native_failed or (unchecked and args.require_complete))
    print(f"kernels-check: {'PASS' if ok else 'FAIL'} ({len(rows)} compiles, {len(failing)} failing, "
          f"{len(unchecked)} unchecked; {time.monotonic() - started:.0f} s); wrote {args.out}.md/.json")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
