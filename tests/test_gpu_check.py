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
        assert all(row[name] > 0 for name in ("base", "peft", "g1", "g0", "torch"))
        assert row["g1/peft"] == pytest.approx(row["g1"] / row["peft"])
    assert {r["mode"] for r in data["end_to_end"]["results"]} == {"vanilla", "coto-p1", "coto-schedule"}
    assert [t["verdict"] for t in data["targets"]] == ["n/a (quick)"] * 4
    markdown = report.with_suffix(".md").read_text()
    assert "## Targets" in markdown and "## End to end" in markdown and "quick smoke run" in markdown
