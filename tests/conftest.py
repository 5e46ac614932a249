"""Shared fixtures (the helpers they build on live in ``helpers.py``), the Triton interpreter switch, and the
``gpu`` marker: tests marked ``@pytest.mark.gpu`` (full-size parity on a CUDA device) are skipped without CUDA;
``pytest -m gpu`` runs only them, ``pytest -m "not gpu"`` everything else."""

from __future__ import annotations

import os

import torch

# The Triton interpreter must be chosen before triton is first imported (kernel tests, backend="triton").
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from helpers import tiny_peft_model  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="gpu test: needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_cuda)


@pytest.fixture
def one_thread():
    """Tiny matrices: OpenMP threads only add contention on a shared CPU (30 s -> 2 s for a benchmark test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def llama():
    return tiny_peft_model("llama")
