"""Builds fastpred's compiled extension ``fastpred._C`` from csrc/.

    pip install -e . --no-build-isolation        # needs torch, setuptools, pybind11, ninja

The C++ sources (operator schemas, CPU kernels, the module) always build. The CUDA
sources in csrc/cuda/ (kernels and the cuSOLVER binding) are added when a CUDA
toolkit is found and torch is a CUDA build, whether or not a GPU is visible.

Environment switches:
    FASTPRED_NO_CUDA=1      build the C++ part only, even with a toolkit
    FASTPRED_DEBUG=1        -O0 -g (and -lineinfo for device code)
    CUDA_HOME               the toolkit (default: $CUDA_HOME, else /usr/local/cuda,
                            else the folder of the nvcc on PATH); torch's own guess
                            is not used because it can be wrong
    TORCH_CUDA_ARCH_LIST    GPU architectures; default 8.0;9.0+PTX when no GPU is
                            visible (torch cannot pick one then)

cuSOLVER and cuBLAS headers and libraries are taken from the toolkit, or else from
NVIDIA's pip wheels that torch itself depends on (site-packages/nvidia/*/include
and lib); the libraries are linked by their exact file name with an rpath to their
folder. Install editable (``-e``): the source tree would otherwise shadow the
built module. Package metadata lives in pyproject.toml.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

CSRC = "csrc"
# Headers the CUDA sources need beyond the toolkit's core (ATen's CUDAContextLight.h
# includes all of them) and the libraries they call directly.
CUDA_HEADERS = ("cusolverDn.h", "cublas_v2.h", "cublasLt.h", "cusparse.h")
CUDA_LIBS = ("cusolver", "cublas")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _log(msg: str) -> None:
    print(f"fastpred setup: {msg}", file=sys.stderr)


def _find_cuda_home():
    """(toolkit folder, None) or (None, why not)."""
    if _flag("FASTPRED_NO_CUDA"):
        return None, "FASTPRED_NO_CUDA=1"
    import torch

    if torch.version.cuda is None:
        return None, "torch is a CPU-only build"
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home, None
    return None, "no nvcc found (set CUDA_HOME to a CUDA toolkit)"


def _nvidia_wheel_dirs(kind: str) -> list:
    """site-packages/nvidia/*/<kind> folders of NVIDIA's pip wheels (cu13/, cusolver/, ...)."""
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(d for root in nvidia.__path__ for d in glob.glob(os.path.join(root, "*", kind)))


def _cuda_include_dirs(cuda_home: str) -> list:
    """Folders that supply the CUDA_HEADERS the toolkit lacks."""
    dirs = []
    for header in CUDA_HEADERS:
        if os.path.isfile(os.path.join(cuda_home, "include", header)):
            continue
        found = [d for d in _nvidia_wheel_dirs("include") if os.path.isfile(os.path.join(d, header))]
        if not found:
            raise RuntimeError(f"{header} is in neither {cuda_home}/include nor NVIDIA's pip wheels; "
                               "install the CUDA math libraries or set FASTPRED_NO_CUDA=1")
        if found[0] not in dirs:
            dirs.append(found[0])
    return dirs


def _cuda_link_args(cuda_home: str) -> list:
    """Linker arguments for CUDA_LIBS: the library torch loads (NVIDIA's wheel) when present."""
    args = []
    for lib in CUDA_LIBS:
        folders = _nvidia_wheel_dirs("lib") + [os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")]
        for folder in folders:
            files = sorted(glob.glob(os.path.join(folder, f"lib{lib}.so*")), key=len)
            if files:
                args += [f"-L{folder}", f"-l:{os.path.basename(files[0])}", f"-Wl,-rpath,{folder}"]
                break
        else:
            raise RuntimeError(f"lib{lib}.so not found in NVIDIA's pip wheels or {cuda_home}; "
                               "install the CUDA math libraries or set FASTPRED_NO_CUDA=1")
    return args


def _torch_rpath() -> list:
    """An rpath to torch's libraries, so that ``import fastpred._C`` works before ``import torch``."""
    import torch

    return [f"-Wl,-rpath,{os.path.join(os.path.dirname(torch.__file__), 'lib')}"]


def get_extensions():
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    if not sources:
        return []
    debug = _flag("FASTPRED_DEBUG")
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cuda_home, why_not = _find_cuda_home()
    if cuda_home is None:
        _log(f"building the C++ operators only ({why_not})")
        from torch.utils.cpp_extension import CppExtension

        return [CppExtension("fastpred._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=_torch_rpath())]

    # cpp_extension reads CUDA_HOME when first imported: set it before.
    os.environ["CUDA_HOME"] = cuda_home
    import torch

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home
    sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))
    system_includes = [flag for d in _cuda_include_dirs(cuda_home) for flag in ("-isystem", d)]
    nvcc = (["-O0", "-g", "-lineinfo"] if debug else ["-O3"]) + ["-DFASTPRED_WITH_CUDA"] + system_includes
    _log(f"building with CUDA from {cuda_home} for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    return [
        cpp_extension.CUDAExtension(
            "fastpred._C",
            sources,
            extra_compile_args={"cxx": cxx + ["-DFASTPRED_WITH_CUDA"] + system_includes, "nvcc": nvcc},
            extra_link_args=_cuda_link_args(cuda_home) + _torch_rpath(),
        )
    ]


def get_cmdclass():
    if not glob.glob(os.path.join(CSRC, "*.cpp")):
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


def check_build_requirements() -> None:
    """``pip install --no-build-isolation`` builds with what the environment has and ignores
    pyproject.toml's build requirements: a stock venv's setuptools (65.5 in Python 3.11) then fails
    with "project.license must be valid exactly by one definition". Say what is missing instead."""
    import importlib.util

    import setuptools

    missing = [] if int(setuptools.__version__.split(".")[0]) >= 77 else [
        f"setuptools>=77 (this environment has {setuptools.__version__})"]
    missing += [name for name in ("wheel", "pybind11", "torch") if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(f"fastpred setup: the build needs {', '.join(missing)}: run "
                 "pip install torch 'setuptools>=77' wheel pybind11 ninja, then this command again")


check_build_requirements()
setup(ext_modules=get_extensions(), cmdclass=get_cmdclass())
