"""Build script: plain Python package; the CUDA sources in csrc/ are compiled only on request.

Set COTO_BUILD_CUDA=1 with a CUDA toolkit and a CUDA build of torch to compile them; without it (the default)
nothing is compiled and the package uses its Triton and PyTorch backends.
"""

import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
if os.environ.get("COTO_BUILD_CUDA") == "1" and sources:
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext_modules = [CUDAExtension("coto_kernels._C", sources)]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
