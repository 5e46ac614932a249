"""The paper experiment's code path end to end: tiny BERT from a config, synthetic data, a few steps."""

from __future__ import annotations

import json

import pytest
import torch

from coto_kernels.experiments import paper


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
