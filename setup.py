"""Build script: the Python package, the Triton kernels (as ``memit_fast.kernels``) and,
optionally, the C++/CUDA extension ``memit_fast._C``.

Environment knobs:
  MEMIT_FAST_NO_EXT=1   pure-Python install (no extension)
"""

from __future__ import annotations

import os

from setuptools import setup

PACKAGES = ["memit_fast", "memit_fast.testing", "memit_fast.kernels"]
PACKAGE_DIR = {"memit_fast.kernels": "kernels"}


def ext_modules_and_cmdclass():
    if os.environ.get("MEMIT_FAST_NO_EXT", "0") == "1":
        return [], {}
    return [], {}


ext_modules, cmdclass = ext_modules_and_cmdclass()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"memit_fast": ["resources/*.txt", "resources/*.json", "resources/*.safetensors"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
