"""The README's Python examples run as written (in order, one namespace)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
    controller = namespace["controller"]
    assert controller.global_step == 20 and controller.p == 1.0 and all(controller.gates)
    assert "CoToController(step=4, total_steps=4" in capsys.readouterr().out
    assert len(namespace["shapley"].values) == 4  # one Shapley value per block
