"""fastpred: DirectPred's directly-set linear predictor, exact and fast.

>>> import torch, fastpred
>>> predictor = fastpred.DirectPredictor(128)
>>> y = predictor(torch.randn(256, 128))

The torch-based parts load on first use, so ``import fastpred.theory`` (NumPy only)
does not pull in torch.
"""
import importlib

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)
__all__ = ["DirectPredictor", "EighError", "backends", "experimental", "functional", "losses", "solvers", "theory", "__version__"]

_LAZY = {
    "DirectPredictor": ("fastpred.predictor", "DirectPredictor"),
    "EighError": ("fastpred.eigh", "EighError"),
    "backends": ("fastpred.backends", None),
    "experimental": ("fastpred.experimental", None),
    "functional": ("fastpred.functional", None),
    "losses": ("fastpred.losses", None),
    "solvers": ("fastpred.solvers", None),
    "theory": ("fastpred.theory", None),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'fastpred' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))  # a loaded name is in both
