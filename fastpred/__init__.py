"""fastpred: DirectPred's directly-set linear predictor, exact and fast.

>>> import torch, fastpred
>>> predictor = fastpred.DirectPredictor(128)
>>> y = predictor(torch.randn(256, 128))
"""
from . import backends, functional
from .functional import EighError
from .predictor import DirectPredictor

__version__ = "0.1.0"
__all__ = ["DirectPredictor", "EighError", "backends", "functional", "__version__"]
