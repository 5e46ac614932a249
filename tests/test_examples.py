"""The README's launch lines for examples/train_ddp.py, run as written: one process, and accelerate launch with two
CPU processes (torchrun with two processes is run by test_distributed.py)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "train_ddp.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], out, timeout: int = 240) -> str:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([*cmd, "--steps", "3", "--output-dir", str(out)], env=env, cwd=out, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_example_runs_in_one_process(tmp_path):
    stdout = _run([sys.executable, EXAMPLE, "--cpu"], tmp_path)
    assert "CoTo after 3 steps on 1 processes" in stdout


@pytest.mark.slow
def test_example_runs_on_two_cpu_processes_through_accelerate_launch(tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate is not installed")
    # the README's line, plus what `accelerate config` would otherwise supply (no config file in CI)
    stdout = _run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                   EXAMPLE, "--cpu"], tmp_path)
    assert "CoTo after 3 steps on 2 processes" in stdout
