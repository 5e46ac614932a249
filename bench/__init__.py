"""Benchmarks and experiments built on coto_kernels; repository tooling, not part of the wheel.

Run from the repository root: ``python -m bench.bench_checkpointing``, ``python -m bench.paper_experiment``
(or ``python bench/<script>.py``). They import the library; the library never imports them.
"""
