"""The paper experiment's code path end to end: tiny BERT from a config, synthetic data, a few steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import paper_experiment as paper


@pytest.fixture(autouse=True)
def restore_threads():
    """The experiment sets torch's thread count (1 with --smoke); give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_paper_smoke_end_to_end(tmp_path):
    out = tmp_path / "paper"
    assert paper.main(["--smoke", "--out", str(out), "--quiet", "--steps", "4"]) == 0
    results = json.loads((out / "results.json").read_text())
    table = results["table"]
    assert set(table) == {"lora", "coto"}
    for row in table.values():
        assert {key for key, _ in paper.COLUMNS} <= set(row)
        assert all(0.0 <= cell["mean"] <= 1.0 for cell in row.values())
    assert results["runs"]["coto"]["0"]["mean_active_fraction"] < 1.0  # CoTo really gated adapters
    assert results["runs"]["lora"]["0"]["mean_active_fraction"] == 1.0
    for method in ("lora", "coto"):
        shap = results["shapley"][method]
        assert len(shap["values"]) == 12  # 6 blocks x (query, value)
        assert [lam for lam, _ in results["curve"][method]["fusion"]["points"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    report = (out / "results.md").read_text()
    assert "| Method | Full | Prune every other" in report and "| CoTo |" in report
    assert (out / "adapters" / "coto-seed1" / "adapter_model.safetensors").exists()
    # --reuse: adapters and evaluations come back from disk, same numbers
    assert paper.main(["--smoke", "--out", str(out), "--quiet", "--steps", "4", "--reuse"]) == 0
    assert json.loads((out / "results.json").read_text())["table"] == table


def test_missing_extra_names_the_pip_command():
    with pytest.raises(paper.MissingExtra, match="pip install --no-deps no-such-package==1.0"):
        paper.locate_package_file("no-such-package", "data/file.csv", "no-such-package==1.0")


def test_importing_the_library_or_the_experiment_changes_no_environment_variable():
    """The experiment goes offline in its ``main``; importing it, or any module of the library, sets nothing."""
    root = Path(__file__).resolve().parent.parent
    script = (
        "import importlib, os, pkgutil\n"
        "before = dict(os.environ)\n"
        "import coto_kernels\n"
        "for info in pkgutil.walk_packages(coto_kernels.__path__, 'coto_kernels.'):\n"
        "    importlib.import_module(info.name)\n"
        "import bench.bench_checkpointing, bench.paper_experiment\n"
        "changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}\n"
        "print(sorted(changed))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
