"""bench/gpu_check.py --quick: the GPU check script itself runs end to end on the CPU interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # a fresh process: imports, the parity collection, the interpreter, three tiny training runs
def test_gpu_check_quick_runs_and_reports(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.pop("OUT", None)
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--quick", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (report,) = tmp_path.glob("gpu_check-*-quick.json")
    data = json.loads(report.read_text())
    assert data["meta"]["quick"] and data["parity"]["failed"] == 0 and data["parity"]["errors"] == 0
    assert len(data["layer"]) == 4 and {row["p"] for row in data["layer"]} == {0.0, 0.05}
    for row in data["layer"]:
        assert all(row[name] > 0 for name in ("base", "peft", "g1", "g0", "torch", "dora", "peft-dora"))
        assert row["g1/peft"] == pytest.approx(row["g1"] / row["peft"])
        assert row["dora/g1"] == pytest.approx(row["dora"] / row["g1"])
    parts = data["dora_parts"]
    assert all(parts[name] > 0 for name in ("norm", "dy-lora", "dy-dora", "dx-lora", "dx-dora", "dx-g", "g-write"))
    assert {r["mode"] for r in data["end_to_end"]["results"]} == {"vanilla", "coto-p1", "coto-schedule"}
    assert [t["verdict"] for t in data["targets"]] == ["n/a (quick)"] * 5
    markdown = report.with_suffix(".md").read_text()
    assert "## Targets" in markdown and "## End to end" in markdown and "quick smoke run" in markdown
    assert "## DoRA over LoRA by part" in markdown


def _load_gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_targets_take_the_worst_target_shape_and_apply_each_bound():
    gpu_check = _load_gpu_check()

    def row(m, p, g1, peft, base=1.0, g0=1.0, dora=1.0):
        return {"m": m, "r": 16, "p": p, "g1/peft": g1 / peft, "g1/base": g1 / base, "g0/base": g0 / base,
                "dora/g1": dora / g1}

    rows = [row(2048, 0.0, 5.0, 1.0),  # M < 8192: not a target shape, ignored however bad
            row(8192, 0.0, 1.05, 1.40, dora=1.19), row(16384, 0.0, 1.10, 1.40, g0=1.02, dora=1.21),
            row(8192, 0.05, 1.11, 1.50, dora=2.5), row(16384, 0.05, 1.13, 1.50, dora=2.5)]
    table = {(t["target"], t["dropout"]): t for t in gpu_check.targets_table(rows, quick=False)}
    peft0 = table["ours (gate on) / PEFT", 0.0]
    assert peft0["worst"] == pytest.approx(1.10 / 1.40) and peft0["verdict"] == "PASS"  # 0.786 <= 0.80
    peft5 = table["ours (gate on) / PEFT", 0.05]
    assert peft5["worst"] == pytest.approx(1.13 / 1.50) and peft5["verdict"] == "FAIL"  # 0.753 > 0.75
    base = table["ours (gate on) / frozen base", "any"]
    assert base["worst"] == pytest.approx(1.13) and base["at"] == "M=16384 p=0.05" and base["verdict"] == "FAIL"
    gate_off = table["ours (gate off) / frozen base", "any"]
    assert gate_off["worst"] == pytest.approx(1.02) and gate_off["verdict"] == "FAIL"
    dora = table["fused DoRA (gate on) / ours (gate on)", 0.0]  # dropout rows (two base products) not bounded
    assert dora["worst"] == pytest.approx(1.19 / 1.05) and dora["at"] == "M=8192 p=0.0" and dora["verdict"] == "PASS"
    assert all(t["verdict"] == "-" for t in gpu_check.targets_table(rows[:1], quick=False))


def test_a_native_import_that_dies_switches_the_cuda_kernels_off(monkeypatch):
    """A binding whose registrations do not match aborts the importing process; gpu_check sees it in a child and
    sets the env switch for itself and its children, so the rest of the check runs."""
    gpu_check = _load_gpu_check()
    monkeypatch.delenv("COTO_KERNELS_NATIVE_CUDA", raising=False)
    assert gpu_check.guard_native_import() is None and "COTO_KERNELS_NATIVE_CUDA" not in os.environ

    died = subprocess.CompletedProcess([], -6, "", "terminate called after throwing an instance of 'c10::Error'\n"
                                       "  what():  \nMismatch in kernel C++ signatures\nframe #0: ...\n")
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda *args, **kwargs: died)
    why = gpu_check.guard_native_import()
    assert "signal 6" in why and "Mismatch in kernel C++ signatures" in why and "frame #" not in why
    assert os.environ["COTO_KERNELS_NATIVE_CUDA"] == "0"
