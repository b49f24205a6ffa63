"""The one dispatch point: which implementation computes each step of the update.

A backend is a named set of functions with the signatures of
:mod:`fastpred.backends.reference` (``corr_ema_``, ``gram``, ``fold_``, ``eigh``,
``rebuild``, ``install_``).
A backend module may leave a step to the reference by not defining it, and may
define ``supports(device) -> bool`` and, for ``"auto"``, ``prefers(step, *args) ->
bool`` (per call: itself, or the reference). Backends are imported lazily, the first time
they are asked for, so ``import fastpred`` never pulls in Triton, CuPy or the
compiled extension.

``"auto"`` picks an implementation per device and step (see :func:`_auto_choice`):
on CPU the one measured fastest here (``bench/``); on CUDA, where nothing has been
measured yet, the one faster by construction (cuBLAS for fp32 products at IEEE
precision, Triton's tensor-core kernels where tensor cores apply, cuSOLVER without a
host sync for the eigendecomposition). ``"torch"`` is the reference itself.
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from . import reference
from .._stack import user_stacklevel

STEPS = ("gram", "corr_ema_", "fold_", "eigh", "rebuild", "install_")

# name -> (module that provides it, what to do when it is missing)
_PROVIDERS: dict[str, tuple[str, str]] = {
    "torch": ("fastpred.backends.reference", ""),
    "triton": (
        "fastpred.backends.triton",
        "Install triton (pip install triton) and run on a CUDA device "
        "(or set TRITON_INTERPRET=1 before importing fastpred to run on CPU tensors).",
    ),
    "csrc": (
        "fastpred.backends.csrc",
        "Build the compiled extension: pip install -e . --no-build-isolation.",
    ),
    "cupy": (
        "fastpred.backends.cupy",
        "Install the CUDA extra (pip install 'fastpred[cuda]') and run on a CUDA device.",
    ),
}

BACKEND_NAMES = ("auto",) + tuple(_PROVIDERS)


@dataclass(frozen=True)
class Backend:
    """Resolved implementations of each step for one device: what :func:`resolve` returns,
    and what every ``backend=`` argument of :mod:`fastpred.functional` also accepts, so
    that a caller resolves once (``DirectPredictor`` does, per device) and passes the
    object on."""

    name: str
    device: torch.device
    gram: Callable
    corr_ema_: Callable
    eigh: Callable
    rebuild: Callable
    fold_: Callable = reference.fold_
    install_: Callable = reference.install_


def check_name(backend: "str | Backend") -> None:
    """Raise ValueError naming ``backend`` when it is not a known backend name (or a
    resolved :class:`Backend`)."""
    if isinstance(backend, Backend):
        return
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")


def _load(name: str, device: torch.device):
    module_name, hint = _PROVIDERS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RuntimeError(f"backend {name!r} is not available: {err}. {hint}".strip()) from err
    supports = getattr(module, "supports", None)
    if supports is not None and not supports(device):
        raise RuntimeError(f"backend {name!r} does not run on device {device}. {hint}".strip())
    return module


def _available(name: str, device: torch.device) -> bool:
    try:
        _load(name, device)
    except RuntimeError:
        return False
    return True


def auto_choice(device_type: str, available: Callable[[str], bool]) -> dict[str, str]:
    """Which backend computes each step under ``backend="auto"`` on a device of
    ``device_type`` where ``available(name)`` says which backends can run: a pure
    function, so the CUDA decisions are tested without a GPU (tests/test_fake_cuda.py).

    CPU (measured, ``bench/report.md``): the compiled extension (lower-triangle GEMM
    panels, LAPACK ``syevd`` with a cached workspace), faster than the reference for
    every step but the plain ``gram``; the reference where it is not built.

    CUDA (not measured on a GPU yet; the choice rests on how each implementation
    computes): the eigendecomposition by cuSOLVER without a host sync per call
    (through CuPy, else the extension's binding), else torch's, which syncs. For
    the statistics and the rebuild, products of fp32 tensors at the default
    ("highest") matmul precision are plain fp32 FMA work, where cuBLAS (the
    reference's ``addmm``/``matmul``) is at least as fast as a Triton FMA kernel:
    the reference. Where tensor cores apply (fp16/bf16 features, or fp32 with TF32
    allowed), the Triton kernels, which compute one triangle (half the products)
    and fuse the EMA, the map and the mirror; that is decided per call by
    :func:`fastpred.backends.triton.prefers`. The fold and the install guard (elementwise
    passes over d x d, fused into one kernel each) are Triton's, or the extension's on CPU.
    """
    def first(*names: str) -> str:
        return next((n for n in names if n == "torch" or available(n)), "torch")

    if device_type == "cuda":
        kernels = first("triton", "torch")
        return {"gram": kernels, "corr_ema_": kernels, "fold_": kernels, "eigh": first("cupy", "csrc", "torch"),
                "rebuild": kernels, "install_": kernels}
    fast = first("csrc", "torch")
    return {"gram": "torch", "corr_ema_": fast, "fold_": fast, "eigh": fast, "rebuild": fast, "install_": fast}


def _auto_choice(device: torch.device) -> dict[str, str]:
    return auto_choice(device.type, lambda name: _available(name, device))


_resolved: dict[tuple[str, torch.device], Backend] = {}


def resolve(backend: "str | Backend", device: torch.device | str) -> Backend:
    """Return the implementations of every step for ``backend`` on ``device``.

    A :class:`Backend` already resolved for ``device`` is returned as it is.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: a named backend that cannot run here (not installed, or not
            on this device); the message says what to install.
    """
    device = torch.device(device)
    if isinstance(backend, Backend):
        if backend.device != device:
            raise ValueError(f"backend was resolved for device {backend.device}, not for {device}")
        return backend
    check_name(backend)
    key = (backend, device)
    if key not in _resolved:
        _resolved[key] = _resolve(backend, device)
    return _resolved[key]


def _resolve(backend: str, device: torch.device) -> Backend:
    if backend == "auto":
        choice = _auto_choice(device)
    else:
        choice = {step: backend for step in STEPS}
    steps = {}
    for step, name in choice.items():
        module = _load(name, device)
        steps[step] = getattr(module, step, getattr(reference, step))
        if backend == "auto" and step != "eigh" and hasattr(module, "prefers"):
            steps[step] = _when_preferred(module.prefers, step, steps[step], getattr(reference, step))
        if backend == "auto" and name != "torch" and step != "eigh":
            steps[step] = _falling_back(steps[step], getattr(reference, step), f"{name}.{step}")
    return Backend(name=backend, device=device, **steps)


def _when_preferred(prefers: Callable, step: str, fast: Callable, ref: Callable) -> Callable:
    """Under ``auto``: per call, ``fast`` where the backend ``prefers(step, *args)`` it
    to the reference, else the reference (see :func:`_auto_choice`)."""

    def run(*args, **kwargs):
        return (fast if prefers(step, *args) else ref)(*args, **kwargs)

    return run


def _falling_back(fast: Callable, ref: Callable, label: str) -> Callable:
    """Under ``auto``, a step whose fast implementation raises (a kernel that does not
    compile on this GPU, say) warns once and is computed by the reference from then
    on, rather than stopping a run. Explicitly requested backends never fall back;
    eigh has its own retry chain (:func:`fastpred.eigh.symmetric_eigh`).

    A user error is never taken for a broken kernel: when the reference refuses the same
    arguments too (a wrong dtype, shape or device), the fast path's error is raised and
    nothing falls back."""
    state = {"broken": False}

    def step(*args, **kwargs):
        if state["broken"]:
            return ref(*args, **kwargs)
        try:
            return fast(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any failure of the fast path
            try:
                result = ref(*args, **kwargs)
            except Exception:  # noqa: BLE001 - the reference refuses too: the input is at fault
                raise err from None
            state["broken"] = True
            warnings.warn(f"fastpred: {label} failed ({type(err).__name__}: {err}); "
                          "using the torch reference for it from now on", RuntimeWarning, stacklevel=user_stacklevel())
            return result

    return step
