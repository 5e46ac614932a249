"""Build script: the Python package plus its optional native backend, compiled from csrc/ against the installed torch.

- ``coto_kernels._native``: the CPU ops (csrc/lora_ops.cpp), built with the system C++ compiler whenever torch
  is importable at build time. The README's install (``make setup``) passes ``--no-build-isolation`` for that;
  a plain ``pip install .`` builds in an isolated environment without torch and installs the package without
  the native backend (``python -m coto_kernels.kernels`` then says so and why).
- ``coto_kernels._native_cuda``: the CUDA kernels (csrc/*.cu) and their torch binding, built when torch has CUDA
  and nvcc is found.

Environment switches: ``COTO_BUILD_NATIVE=1`` / ``COTO_BUILD_CUDA=1`` make a part required (the build fails
loudly when it cannot be built); ``=0`` skips it. Unset, a part that fails to build is skipped with a warning
(and the reason is written next to the package, where ``backend_status()`` reads it): the package then falls
back to its torch (and Triton) backends.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CPU_EXT = "coto_kernels._native"
CUDA_EXT = "coto_kernels._native_cuda"
# Compiled twice on x86-64 (AVX2/FMA clone and baseline, chosen at load time): see csrc/lora_ops.cpp.
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"]
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xptxas", "-v"]
CUDA_ARCHS = ("80", "90")


def _toolkit_root_from_nvcc() -> str | None:
    """The CUDA toolkit's root as the ``nvcc`` on PATH reports it (``-v --dryrun``: its own bin folder), or None.

    torch takes ``CUDA_HOME`` (when unset) as the folder above ``which nvcc``; where that is a wrapper script
    (``/usr/local/bin/nvcc`` exec-ing ``/usr/local/cuda-13.0/bin/nvcc``, as on these machines) torch looks for
    ``cuda_runtime.h`` and ``libcudart`` under ``/usr/local`` and the CUDA binding fails to compile."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        done = subprocess.run([nvcc, "-v", "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in done.stderr.splitlines():
        key, _, value = line.removeprefix("#$ ").partition("=")
        if key == "_HERE_" and value.strip():
            root = os.path.dirname(os.path.abspath(value.strip()))
            return root if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")) else None
    return None


def _set_cuda_home() -> None:
    """Point ``CUDA_HOME`` at the real toolkit before torch's cpp_extension reads it (at import), unless the user
    set ``CUDA_HOME`` or ``CUDA_PATH``."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or _switch("COTO_BUILD_CUDA") is False:
        return
    root = _toolkit_root_from_nvcc()
    if root is not None:
        os.environ["CUDA_HOME"] = root


def _switch(name: str) -> bool | None:
    """True (required), False (skipped) or None (try, warn on failure) from environment variable ``name``."""
    value = os.environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        raise SystemExit(f"setup.py: {name} must be 0 or 1, got {value!r}")
    return None if value == "" else value == "1"


def _reason_files(command: build_ext, ext_name: str) -> list[str]:
    """Where the reason an extension is missing is recorded: beside the built library and in the source package
    (setuptools builds in-place and editable installs in build_lib, then copies only the libraries over)."""
    name = f"{ext_name.rsplit('.', 1)[1]}_build_error.txt"
    package_dir = command.get_finalized_command("build_py").get_package_dir(ext_name.rsplit(".", 1)[0])
    return [os.path.join(os.path.dirname(command.get_ext_fullpath(ext_name)), name), os.path.join(package_dir, name)]


def _warn(message: str) -> None:
    bar = "=" * 100
    print(f"\n{bar}\nWARNING (coto_kernels setup.py): {message}\n{bar}\n", file=sys.stderr, flush=True)


def _skip(command: build_ext, required: bool | None, ext: Extension, reason: str, warn: bool = True) -> None:
    """Record why ``ext`` is not built next to where it would be (``backend_status()`` reads it), or fail.

    The extension is also left out of the command's outputs (``_drop_skipped``): an editable install copies every
    listed output and fails on a library that was never built."""
    if required:
        raise SystemExit(f"setup.py: {ext.name} was required but cannot be built: {reason}")
    command.skipped_extensions = [*getattr(command, "skipped_extensions", []), ext.name]
    for path in _reason_files(command, ext.name):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as handle:
            handle.write(reason + "\n")
    if warn:
        _warn(f"{ext.name} not built; the package falls back to its torch/Triton backends.\n{reason}")


def _drop_skipped(command: build_ext) -> None:
    """Remove the extensions ``_skip`` recorded from ``command.extensions`` (what ``get_outputs`` lists)."""
    skipped = set(getattr(command, "skipped_extensions", []))
    command.extensions = [ext for ext in command.extensions if ext.name not in skipped]


def _nvcc_found(cuda_home: str | None) -> bool:
    return bool(cuda_home) and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))


def _required(ext: Extension) -> bool | None:
    return _switch("COTO_BUILD_NATIVE" if ext.name == CPU_EXT else "COTO_BUILD_CUDA")


def _build_command() -> type[build_ext]:
    """torch's BuildExtension made optional per extension, or (torch not importable) a build that records why."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension
    except ImportError as error:
        reason = (f"torch was not importable at build time ({error}); pip builds in an isolated environment by "
                  "default: reinstall with `pip install --no-build-isolation .` (or `make setup`)")

        class NoTorchBuild(build_ext):
            def build_extensions(self) -> None:
                for ext in self.extensions:
                    if _required(ext) is not False:
                        _skip(self, _required(ext), ext, reason)
                self.extensions = []

        return NoTorchBuild

    class OptionalNativeBuild(BuildExtension):
        def build_extensions(self) -> None:
            buildable = []
            for ext in self.extensions:
                required = _required(ext)
                if required is False:
                    _skip(self, required, ext, "skipped: COTO_BUILD_NATIVE/COTO_BUILD_CUDA=0", warn=False)
                elif ext.name == CUDA_EXT and torch.version.cuda is None:
                    _skip(self, required, ext, f"torch {torch.__version__} has no CUDA", warn=bool(required))
                elif ext.name == CUDA_EXT and not _nvcc_found(CUDA_HOME):
                    _skip(self, required, ext, "nvcc not found (set CUDA_HOME)", warn=bool(required))
                else:
                    buildable.append(ext)
            self.extensions = buildable
            if buildable:
                super().build_extensions()
            _drop_skipped(self)  # before build_ext.run's in-place copy, which fails on a library never built

        def build_extension(self, ext: Extension) -> None:
            try:
                super().build_extension(ext)
            except Exception as error:  # compiler/linker failures: optional unless required
                _skip(self, _required(ext), ext, f"build failed: {type(error).__name__}: {error}")
            else:
                for path in _reason_files(self, ext.name):
                    if os.path.exists(path):
                        os.remove(path)

    return OptionalNativeBuild


def _extensions() -> list[Extension]:
    cuda_sources = sorted(glob.glob("csrc/*.cu")) + ["csrc/lora_cuda_binding.cpp"]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
    return [
        Extension(CPU_EXT, ["csrc/lora_ops.cpp"], include_dirs=["csrc"], language="c++",
                  extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=["-fopenmp"]),
        Extension(CUDA_EXT, cuda_sources, include_dirs=["csrc"], language="c++",
                  extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": NVCC_FLAGS + gencode},
                  libraries=["c10", "torch", "torch_cpu", "c10_cuda", "torch_cuda", "cudart"]),
    ]


def _torch_paths(extensions: list[Extension]) -> list[Extension]:
    """Add torch's include and library paths when torch is importable (it may not be, under build isolation)."""
    try:
        from torch.utils.cpp_extension import include_paths, library_paths
    except ImportError:
        return extensions
    for ext in extensions:
        cuda = ext.name == CUDA_EXT
        try:
            ext.include_dirs += include_paths(device_type="cuda" if cuda else "cpu")
            ext.library_dirs += library_paths(device_type="cuda" if cuda else "cpu")
        except (TypeError, OSError, RuntimeError):  # older torch (no device_type) or no CUDA toolkit
            ext.include_dirs += include_paths()
            ext.library_dirs += library_paths()
        if not cuda:
            ext.libraries += ["c10", "torch", "torch_cpu"]
    return extensions


_set_cuda_home()
setup(ext_modules=_torch_paths(_extensions()), cmdclass={"build_ext": _build_command()})
