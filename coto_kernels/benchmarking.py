"""What every benchmark shares: the environment it ran in, device timing, a CPU memory proxy, and one report
writer (JSON + Markdown + optional PNG plots).

Used by ``coto-bench`` (``coto_kernels.bench``) and by the scripts under ``bench/`` (which may import the library,
never the reverse). matplotlib is optional: without it reports are written without their plots.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

PLOT_DPI = 120


def utc_timestamp() -> str:
    """Now, ISO 8601 in UTC to the second (the ``date`` of a report)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def file_stamp(timestamp: str) -> str:
    """``utc_timestamp()`` made safe for a file name: 2026-11-29T065356Z."""
    return timestamp.replace(":", "").replace("+0000", "Z")


def environment() -> dict[str, str]:
    """Versions of Python and of the libraries a result depends on (triton when installed)."""
    import peft
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__, "peft": peft.__version__,
                "transformers": transformers.__version__}
    try:
        import triton
    except ImportError:
        return versions
    versions["triton"] = triton.__version__
    return versions


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU with the thread count torch uses (timings depend on both)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else the architecture: VMs of one name differ in CPU."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {platform.machine()}"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a host timer measures the work itself (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def saved_activation_meter(model: torch.nn.Module) -> Iterator[list[int]]:
    """Count bytes autograd saves for backward (unique storages, parameters excluded): the CPU memory proxy.

    Yields a one-element list whose value is the running total in bytes.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            total[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; cells are written with ``str`` (format numbers before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


Plot = Callable[[Any], Any]
"""Draws one figure: called with ``matplotlib.pyplot``, returns the figure (or None to skip the plot)."""


def save_plot(draw: Plot, path: str | Path) -> Path | None:
    """Draw and save one PNG; None when matplotlib is missing or ``draw`` returned no figure."""
    plt = pyplot()
    if plt is None:
        return None
    fig = draw(plt)
    if fig is None:
        return None
    path = Path(path)
    fig.savefig(path, dpi=PLOT_DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def write_json(data: object, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def write_report(out_dir: str | Path, stem: str, report: object, markdown: str,
                 plots: Mapping[str, Plot] | None = None) -> list[Path]:
    """Write ``<stem>.json`` (``report``), ``<stem>.md`` (``markdown``) and one PNG per entry of ``plots`` (file
    name -> drawing function) into ``out_dir``; returns the paths written (plots skipped without matplotlib)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [write_json(report, out / f"{stem}.json"), out / f"{stem}.md"]
    paths[1].write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    for name, draw in (plots or {}).items():
        path = save_plot(draw, out / name)
        if path is not None:
            paths.append(path)
    return paths
