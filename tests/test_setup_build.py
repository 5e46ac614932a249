"""setup.py's optional native build: a part that fails is skipped with its reason (or fails loudly when required),
and the CUDA toolkit is found behind a wrapper ``nvcc``. Each case runs setup.py in a child process, in a scratch
copy of the build's inputs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BROKEN = "#error deliberately broken by the test\n"  # first line: fails before any torch header is read


def _scratch_project(tmp_path: Path) -> Path:
    """setup.py, pyproject.toml, README.md, the package and csrc/ with a C++ source that cannot compile."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "csrc", project / "csrc")
    (project / "coto_kernels").mkdir()
    (project / "coto_kernels" / "__init__.py").write_text("")
    source = project / "csrc" / "lora_ops.cpp"
    source.write_text(BROKEN + source.read_text())
    return project


def _build_in_place(project: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("COTO_BUILD_")}
    environment.update(COTO_BUILD_CUDA="0", **env)
    return subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=project, env=environment,
                          capture_output=True, text=True, timeout=600)


def test_a_failed_optional_part_is_skipped_with_its_reason(tmp_path):
    # An in-place build (bench/gpu_check.sh's) used to exit 1 after the warning: build_ext then copied every
    # extension into the source tree, the one that never built included.
    project = _scratch_project(tmp_path)
    done = _build_in_place(project)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "coto_kernels._native not built" in done.stderr
    reason = (project / "coto_kernels" / "_native_build_error.txt").read_text()
    assert "build failed" in reason
    assert not list((project / "coto_kernels").glob("_native*.so"))


def test_a_required_part_that_fails_fails_the_build(tmp_path):
    done = _build_in_place(_scratch_project(tmp_path), COTO_BUILD_NATIVE="1")
    assert done.returncode != 0
    assert "coto_kernels._native was required but cannot be built" in done.stdout + done.stderr


def _cuda_home_seen_by_setup(path_dirs: list[Path], **env: str) -> str:
    """The CUDA_HOME that setup.py leaves for torch's cpp_extension, with ``setup()`` itself replaced by a no-op."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("CUDA_HOME", "CUDA_PATH") and not key.startswith("COTO_BUILD_")}
    environment["PATH"] = os.pathsep.join([*map(str, path_dirs), environment.get("PATH", "")])
    environment.update(env)
    probe = ("import os, runpy, setuptools; setuptools.setup = lambda **kwargs: None; "
             f"runpy.run_path({str(ROOT / 'setup.py')!r}); print(os.environ.get('CUDA_HOME', 'unset'))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=300, check=True)
    return done.stdout.strip().splitlines()[-1]


def _wrapper_nvcc(tmp_path: Path, with_headers: bool) -> tuple[Path, Path]:
    """A toolkit folder and a bin folder holding an ``nvcc`` script that reports that toolkit as its home."""
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    if with_headers:
        (toolkit / "include" / "cuda_runtime.h").write_text("")
    wrapper_bin = tmp_path / "wrapper" / "bin"
    wrapper_bin.mkdir(parents=True)
    nvcc = wrapper_bin / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '#$ _NVVM_BRANCH_=nvvm' >&2\necho '#$ _HERE_={toolkit}/bin' >&2\n")
    nvcc.chmod(0o755)
    return toolkit, wrapper_bin


def test_cuda_home_is_the_toolkit_behind_a_wrapper_nvcc(tmp_path):
    toolkit, wrapper_bin = _wrapper_nvcc(tmp_path, with_headers=True)
    assert _cuda_home_seen_by_setup([wrapper_bin]) == str(toolkit)


def test_cuda_home_is_left_alone_when_set_or_when_the_toolkit_has_no_headers(tmp_path):
    toolkit, wrapper_bin = _wrapper_nvcc(tmp_path, with_headers=False)
    assert _cuda_home_seen_by_setup([wrapper_bin]) == "unset"  # torch's own guess stands
    _wrapper_nvcc(tmp_path / "second", with_headers=True)
    assert _cuda_home_seen_by_setup([tmp_path / "second" / "wrapper" / "bin"], CUDA_HOME="/opt/mine") == "/opt/mine"
    assert _cuda_home_seen_by_setup([tmp_path / "second" / "wrapper" / "bin"], COTO_BUILD_CUDA="0") == "unset"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
def test_cuda_home_found_for_this_machines_nvcc_holds_the_runtime_headers():
    cuda_home = _cuda_home_seen_by_setup([])
    assert cuda_home == "unset" or (Path(cuda_home) / "include" / "cuda_runtime.h").exists()
