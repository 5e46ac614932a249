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
    assert paper.main(["--smoke", "--out", str(out), "--quiet", "--bootstrap", "200"]) == 0
    results = json.loads((out / "results.json").read_text())
    table = results["table"]
    assert set(table) == {"lora", "coto", "lora-matched"}
    for row in table.values():
        assert {key for key, _ in paper.COLUMNS} <= set(row)
    runs = results["runs"]
    assert runs["coto"]["0"]["mean_active_fraction"] < 1.0  # CoTo really gated adapters
    assert runs["lora"]["0"]["mean_active_fraction"] == 1.0  # schedule="off": the gate never closes
    for seed in ("0", "1", "2"):  # the fit-matched control: CoTo's active fraction x steps
        assert runs["lora-matched"][seed]["steps"] == round(runs["coto"][seed]["mean_active_fraction"] * 24)
        assert runs["lora"][seed]["steps"] == 24
    none = results["no_adapters"]
    for by_seed in runs.values():  # retention per run, as the report defines it
        for row in by_seed.values():
            assert set(row["retention"]) == set(paper.PRUNE_SELECTIONS)
            for name, value in row["retention"].items():
                if row["full"] != none:
                    assert value == pytest.approx((row[name] - none) / (row["full"] - none))
    for method in ("lora", "coto"):
        merges = results["merge"][method]
        assert set(merges["1:1"]) == {"0-1", "0-2", "1-2"} and set(merges["1:1:1"]) == {"0-1-2"}
        for entry in merges["1:1:1"].values():
            assert entry["shrinkage"] + entry["interference"] == pytest.approx(entry["fusion_loss"])
        for shap in results["shapley"][method].values():  # exact: 2^6 coalitions of the 6 blocks
            assert len(shap["players"]) == 6 and shap["coalitions"] == 64
            assert sum(shap["values"]) == pytest.approx(shap["v_all"] - shap["v_none"])  # efficiency, exactly
        assert len(results["shapley"][method]) == 2
        assert [lam for lam, _ in results["curve"][method]["fusion"]["points"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for pair in ("coto - lora", "coto - lora-matched"):
        full = results["comparisons"][pair]["full accuracy"]
        assert full["n"] == 3 and len(full["values"]) == 3
        assert full["low"] <= full["mean"] <= full["high"]
        assert full["bootstrap_low"] <= full["bootstrap_high"] and full["bootstrap_samples"] == 200
        assert "merge 1:1:1 interference" in results["comparisons"][pair]
    report = (out / "results.md").read_text()
    assert "| Method | All adapters: test acc | Retention, blocks 0,2,4 kept" in report and "| CoTo |" in report
    assert "Table r3" not in report
    assert (out / "adapters" / "lora-matched-seed1" / "adapter_model.safetensors").exists()
    # --reuse: head, adapters and evaluations come back from disk, same numbers
    assert paper.main(["--smoke", "--out", str(out), "--quiet", "--bootstrap", "200", "--reuse"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["table"] == table and again["comparisons"] == results["comparisons"]


def test_paired_interval_matches_the_t_formula():
    d = [0.02, -0.01, 0.05, 0.03, 0.00]
    mean = sum(d) / 5
    sd = (sum((x - mean) ** 2 for x in d) / 4) ** 0.5
    got = paper.paired_interval(d)
    assert got["mean"] == pytest.approx(mean)
    assert got["high"] - mean == pytest.approx(2.776 * sd / 5 ** 0.5)  # t_0.975 with 4 df
    assert paper.t_quantile(11) == 2.228 and paper.t_quantile(40) == 1.96  # no interval narrower than t's


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
        "from coto_kernels.kernels import backend_status\n"
        "unbuilt = {f'coto_kernels.kernels.lora_{b}' for b, why in backend_status().items() if why}\n"
        "for info in pkgutil.walk_packages(coto_kernels.__path__, 'coto_kernels.'):\n"
        "    if info.name in ('coto_kernels._native', 'coto_kernels._native_cuda'):  # op libraries for torch.ops\n"
        "        continue\n"
        "    try:\n"
        "        importlib.import_module(info.name)\n"
        "    except ImportError:\n"
        "        if info.name not in unbuilt:  # only a backend whose toolchain is missing may fail to import\n"
        "            raise\n"
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


def _trained_smoke_adapter(task):
    """A smoke-task adapter with non-zero B in every block (a few steps of plain LoRA)."""
    adapter, _ = paper.train(task, "lora", 0, steps=6, batch_size=16, lr=5e-2)
    return adapter


def test_block_replay_is_bit_identical_to_the_full_forward():
    """Every pruning state and every Shapley coalition evaluated through the cached block inputs gives the same
    logits as a plain forward, and the prefix walk evaluates 2^(L+1) - 2 blocks instead of L * 2^L."""
    from itertools import product

    from coto_kernels.tools import pruned

    torch.manual_seed(0)
    task = paper.smoke_task()
    evaluator = paper.Evaluator(task)
    adapter = _trained_smoke_adapter(task)
    model = evaluator.model_for(adapter)
    rank = paper._adapter_rank(adapter)
    blocks = evaluator.block_modules[rank]
    names, values = evaluator.block_coalition_values(adapter, task.shapley, "shapley")
    replay = next(iter(evaluator.replays.values()))
    assert replay.block_runs == 2 ** 7 - 2 and len(values) == 64
    for bits in list(product((False, True), repeat=6))[::7]:
        off = [m for modules, on in zip(blocks, bits) if not on for m in modules]
        with pruned(model, off):
            plain = paper.correctness(model, task.shapley, task.pad_id)
        assert plain.count("1") / len(plain) == values[frozenset(n for n, on in zip(names, bits) if on)]
    # logits, not just decisions: block 0 on, 1 off, the rest on, starting at a cached block 2
    off = blocks[1]
    with pruned(model, off) as off_modules:
        states = evaluator._states(rank, off_modules)
        batch = paper.collate(task.test, list(range(16)), task.pad_id)
        batch.pop("labels")
        expected = model(**batch).logits
        replay.logits("probe", batch, states)
        before = replay.block_runs
        assert torch.equal(replay.logits("probe", batch, states), expected)
        assert replay.block_runs - before == 1  # only the last block ran again
    # another adapter: its blocks must not reuse the first one's cached inputs
    all_on = evaluator._states(rank, ())
    first = replay.logits("probe", batch, all_on)
    other = adapter.map(lambda m, A, B, s: (A.clone(), -3 * B, s))
    evaluator.model_for(other)
    expected = model(**batch).logits
    assert not torch.allclose(expected, first)
    assert torch.equal(replay.logits("probe", batch, all_on), expected)


def test_length_grouped_batches_cover_every_item_once_per_epoch_and_pad_little():
    split = paper.synthetic(250, 3, length=(2, 40))
    batches = paper.length_grouped_batches(split, 16, torch.Generator().manual_seed(0), group=4)
    epoch = [next(batches) for _ in range(16)]  # 250 items: 3 groups of 64 and one of 58 -> 4 * 4 batches
    assert sorted(i for b in epoch for i in b) == list(range(250))
    lengths = [[len(split.ids[i]) for i in b] for b in epoch]
    padded = sum(max(b) * len(b) for b in lengths) / sum(map(sum, lengths))
    assert padded < 1.35  # random batches of lengths 4..42 pad to ~1.6x
