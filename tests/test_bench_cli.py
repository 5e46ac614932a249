"""The benchmark CLI runs end to end on the tiny preset and writes its report."""

from __future__ import annotations

import json
import os

import torch

from bench import side_by_side
from coto_kernels import bench
from coto_kernels.benchmarking import device_name


def test_bench_cli_writes_json_markdown(tmp_path, capsys):
    assert bench.main(["--preset", "tiny", "--rounds", "1", "--steps", "2", "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("bench-tiny-*.json")
    report = json.loads(json_path.read_text())
    modes = [r["mode"] for r in report["results"]]
    assert modes == list(bench.MODES)
    by_mode = {r["mode"]: r for r in report["results"]}
    assert by_mode["vanilla"]["throughput_vs_vanilla"] == 1.0
    assert by_mode["coto-p1"]["mean_active_fraction"] == 1.0
    assert by_mode["coto-p0.1"]["mean_active_fraction"] < 1.0
    assert by_mode["floor"]["step_vs_floor"] == 1.0 and by_mode["floor"]["mean_active_fraction"] == 0.0
    assert by_mode["vanilla"]["step_vs_floor"] > 0.0
    # the floor's memory pass runs the frozen base too (it measured vanilla PEFT's forward before)
    assert by_mode["floor"]["memory_mb"] < by_mode["coto-p1"]["memory_mb"] < by_mode["vanilla"]["memory_mb"]
    assert all(len(times) == 2 for times in report["step_times"].values())
    assert (tmp_path / json_path.name.replace(".json", ".md")).read_text().count("| coto-") == 4
    assert "throughput vs vanilla" in capsys.readouterr().out


def test_bench_cli_dora_mode_runs_peft_dora_and_the_fused_layer(tmp_path):
    assert bench.main(["--preset", "tiny", "--rounds", "1", "--steps", "1", "--dora", "--modes",
                       "vanilla,coto-p1,floor", "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("bench-tiny-dora-*.json")
    report = json.loads(json_path.read_text())
    assert report["config"]["dora"] is True
    assert [r["mode"] for r in report["results"]] == ["vanilla", "coto-p1", "floor"]
    assert "DoRA r=16" in (tmp_path / json_path.name.replace(".json", ".md")).read_text()


def test_side_by_side_ab_checks_equal_gradients_and_reports_both_against_the_floor(capsys):
    assert side_by_side.main(["--preset", "tiny", "--rounds", "2", "--lora-dropout", "0"]) == 0
    out = capsys.readouterr().out
    difference = float(out.split("after one step: ")[1].split()[0])
    assert difference < 1e-5  # the grouped and the separate model compute the same step
    assert all(f"{name} " in out for name in ("a", "b", "floor")) and out.count("/ floor") == 3


def test_reports_name_the_cpu_model_and_thread_count():
    """Runs on differently built VMs of one name are told apart by the CPU the report names."""
    name = device_name(torch.device("cpu"))
    assert name.startswith("cpu (") and name.endswith(f", {torch.get_num_threads()} threads)")
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), None)
        if model:
            assert model in name
