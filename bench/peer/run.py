"""Run PEFT's own LoRA tests unpatched and patched by coto_kernels, and fail on any test that only fails patched.

    python bench/peer/run.py                 # full: ~3,500 LoRA tests from 10 files, modes none + off + schedule
    python bench/peer/run.py --fast          # the fixed CI subset (FAST below), modes none + off + schedule

1. Fetches the source distribution of the installed ``peft`` (``pip download --no-deps --no-binary :all:
   peft==<version>``; PEFT's tests ship only there) into ``bench/peer/.cache/`` (git-ignored), once.
2. Runs the selected tests once per mode of ``coto_peft_plugin`` (``none``: unpatched baseline; ``off``: every
   model patched with ``schedule="off"``; ``schedule``: patched with the real schedule), one outcome per test id.
3. Compares each patched mode with the baseline (``compare.py``) and writes ``report.md`` + ``outcomes.json``
   under ``--out``. Exit status 1 when a test that passes unpatched fails patched (in ``schedule`` mode: crashes,
   or any failure of a test in which no adapter was gated off).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CACHE = HERE / ".cache"

# File -> regex a test id must match (None: every test of the file). "-LoraConfig-" keeps the LoRA cases of the
# parametrised custom-model tests (it does not match "-AdaLoraConfig-").
FULL: dict[str, str | None] = {
    "tests/test_custom_models.py": r"-LoraConfig-",
    "tests/test_lora_variants.py": None,
    "tests/test_low_level_api.py": None,
    "tests/test_loraplus.py": None,
    "tests/test_lorafa.py": None,
    "tests/test_lora_ga.py": None,
    "tests/test_lora_conversion.py": None,
    "tests/test_mixed.py": None,
    "tests/test_initialization.py": None,
    "tests/test_target_parameters.py": None,
}

# The CI subset: every custom-model family the patch treats differently (fused Linear, GPT-2 Conv1D fused,
# embedding, Conv1d/2d/3d, MultiheadAttention, nn.Parameter targets; DoRA; lora_B bias) through the tests that
# exercise forward, training, merge/unmerge, disable, save/load and multiple adapters, plus the cases that
# failed patched before (mixed LoRA + AdaLoRA, target_parameters with several adapters).
_FAST_MODELS = (r"Vanilla MLP 1 LoRA-|Vanilla MLP 7 LoRA with DoRA|Vanilla MLP 1 LoRA with lora_b bias|"
                r"Embedding \+ transformers Conv1D 1 LoRA-|Embedding \+ transformers Conv1D 1 DoRA|Conv1d LoRA-|"
                r"Conv2d 1 LoRA-|Conv2d 1 LoRA with DoRA|Conv3d 1 LoRA-|MHA 1 LoRA|MLP 1 using nn.Parameter LoRA")
_FAST_TESTS = (r"test_forward_output_finite|test_only_params_are_updated|test_merge_layers\[|test_safe_merge|"
               r"test_disable_adapters_with_merging|test_load_multiple_adapters|test_save_pretrained\[|"
               r"test_training_custom_models|test_active_adapter|test_delete_adapter\[")
FAST: dict[str, str | None] = {
    "tests/test_custom_models.py": rf"TestPeftCustomModel::({_FAST_TESTS}).*({_FAST_MODELS})"
                                   r"|TestMultipleActiveAdapters::test_multiple_active_adapters_(forward|merge_and_"
                                   r"unmerge)\[LoRA (Same|Different)-",
    "tests/test_mixed.py": r"Lora_AdaLora|Lora_x2",
    "tests/test_initialization.py": r"multiple_adapters_with_same_target_parameters|TestLoraInitialization::"
                                    r"test_lora_(linear|embedding|conv2d)_init_default",
    "tests/test_low_level_api.py": r"TestLowLevelFunctional",
}

MODES = ("none", "off", "schedule")


def peft_tests(cache: Path) -> Path:
    """The unpacked source distribution of the installed peft (downloaded once), with ``tests/`` a package."""
    version = importlib.metadata.version("peft")
    folder = cache / f"peft-{version}"
    if not (folder / "tests").is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        archive = cache / f"peft-{version}.tar.gz"
        if not archive.exists():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"peft=={version}", "-d", str(cache)], check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(cache, filter="data")
    # The sdist has no tests/__init__.py, and its test modules import each other relatively.
    (folder / "tests" / "__init__.py").touch()
    return folder


def run_mode(source: Path, mode: str, selection: dict[str, str | None], out: Path, extra: list[str],
             jobs: int) -> dict:
    """One pytest run of the selected tests under ``mode``; returns {nodeid: record} (worst phase kept)."""
    records = out / f"outcomes-{mode}.jsonl"
    records.unlink(missing_ok=True)
    ini = out / "pytest.ini"  # PEFT's own pytest config asks for coverage and turns some warnings into errors
    ini.write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    env = {
        **os.environ,
        "COTO_PEER_MODE": mode,
        "COTO_PEER_OUT": str(records),
        "COTO_PEER_SELECT": json.dumps(selection),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    # pytest-xdist workers load the plugin too (-p travels with the arguments) and append to the same records
    # file, one short line per write (O_APPEND), so the outcomes are the same as in one process.
    workers = ["-n", str(jobs)] if jobs > 1 else []
    cmd = [sys.executable, "-m", "pytest", "-c", str(ini), "--rootdir", str(source), "-p", "coto_peft_plugin",
           "-q", "-p", "no:randomly", *workers, *extra, *selection]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=source, env=env, check=False)
    print(f"[peer] mode {mode}: {time.perf_counter() - start:.0f} s", flush=True)
    return load_records(records)


def load_records(path: Path) -> dict[str, dict]:
    rank = {"failed": 2, "passed": 1, "skipped": 0}
    merged: dict[str, dict] = {}
    if not path.exists():
        return merged
    for line in path.read_text().splitlines():
        record = json.loads(line)
        previous = merged.get(record["nodeid"])
        if previous is None or rank[record["outcome"]] > rank[previous["outcome"]]:
            if previous is not None:
                record["gated_off"] = record["gated_off"] or previous["gated_off"]
            merged[record["nodeid"]] = record
        elif record["gated_off"]:
            previous["gated_off"] = True
    return merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="the fixed CI subset instead of the full selection")
    parser.add_argument("--modes", default="off,schedule", help="patched modes to compare with the baseline")
    parser.add_argument("--out", default=str(ROOT / "results" / "peer"), help="where the report goes")
    parser.add_argument("--cache", default=str(CACHE), help="where the peft source distribution is kept")
    parser.add_argument("--only", nargs="+", default=None, metavar="FILE",
                        help="restrict the selection to these test files (e.g. test_mixed.py)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="pytest-xdist worker processes, one thread each (default: the CPU count; 1: no xdist)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (e.g. -x, -k EXPR)")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES[1:]))
    if unknown:
        parser.error(f"--modes takes {MODES[1:]}, got {unknown}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")

    from compare import compare, write_report

    source = peft_tests(Path(args.cache))
    selection = FAST if args.fast else FULL
    if args.only:
        selection = {path: pattern for path, pattern in selection.items() if Path(path).name in args.only}
        if not selection:
            names = sorted(Path(p).name for p in (FAST if args.fast else FULL))
            parser.error(f"--only {args.only} matches none of {names}")
    out = Path(args.out).resolve() / ("fast" if args.fast else "full")  # pytest runs in the peft source folder
    out.mkdir(parents=True, exist_ok=True)
    results = {mode: run_mode(source, mode, selection, out, args.pytest_args, args.jobs) for mode in ("none", *modes)}
    comparisons = {mode: compare(results["none"], results[mode], mode) for mode in modes}
    report = write_report(out, importlib.metadata.version("peft"), results, comparisons,
                          selection={k: v for k, v in selection.items()})
    print(report.read_text())
    empty = [mode for mode, records in results.items() if not records]
    if empty:  # pytest crashed or collected nothing: "0 regressions" would be a pass that checked nothing
        print(f"[peer] no test outcomes recorded in mode(s) {empty}; see the pytest output above", file=sys.stderr)
        return 2
    return 1 if any(c["regressions"] for c in comparisons.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
