"""The one compiled piece of nanogpt-mlx, built by `pip install` (everything else is in pyproject.toml).

`model/cpu/blas_dispatch.c` becomes a shared library inside `nanogpt_mlx.model.cpu` that
`import nanogpt_mlx` loads with ctypes on AMD CPUs (see model/cpu/README.md). It is optional:
without a C compiler the install still succeeds, and the package loads one BLAS instead.
"""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(Extension("nanogpt_mlx.model.cpu._blas_dispatch", sources=["model/cpu/blas_dispatch.c"], optional=True))

setup(ext_modules=ext_modules)
