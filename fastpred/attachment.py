"""When a DirectPredictor's step ends, and the misuse it names on the way.

- :class:`Attachment`: what ``DirectPredictor.attach`` returns; an optimizer's step
  post-hook that ends the predictor's step.
- The per-call watch: every predictor is shown every optimizer's steps through one
  global step post-hook (there while some predictor exists); those not attached use
  them to notice misuse.
- :class:`Misuse`: each misuse named once by a RuntimeWarning at the user's line.

Host-side only: nothing here reads a device value.
"""
from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from ._stack import user_stacklevel

if TYPE_CHECKING:
    from .predictor import DirectPredictor


def holds(optimizer: torch.optim.Optimizer, weight: Tensor) -> bool:
    """Whether ``weight`` is in a param group of ``optimizer``."""
    return any(p is weight for group in optimizer.param_groups for p in group["params"])


class Attachment:
    """What :meth:`DirectPredictor.attach` returns: ``remove()`` undoes it (once; a stale
    handle, replaced by a newer attachment, removes nothing)."""

    def __init__(self, predictor: "DirectPredictor", optimizer: torch.optim.Optimizer | None) -> None:
        self.predictor, self.optimizer = predictor, optimizer
        self.hook = None
        if optimizer is not None:
            ref = weakref.ref(predictor)
            self.hook = optimizer.register_step_post_hook(lambda opt, args, kwargs: _end_step_of(ref))

    def remove(self) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        if self.predictor._attachment is self:
            self.predictor._attachment = None
            self.predictor._stats.clear()


def _end_step_of(ref: "weakref.ref[DirectPredictor]") -> None:
    predictor = ref()
    if predictor is not None:
        predictor._end_attached_step()


class _Watch:
    """Predictors, shown every optimizer's steps by one global step post-hook (there while
    some exist); a per-call predictor counts as its own steps only those of an optimizer
    holding its W_p. Weak references: the hook keeps no predictor alive."""

    def __init__(self) -> None:
        self.predictors: "weakref.WeakSet[DirectPredictor]" = weakref.WeakSet()
        self.hook = None

    def add(self, predictor: "DirectPredictor") -> None:
        self.predictors.add(predictor)
        if self.hook is None:
            self.hook = register_optimizer_step_post_hook(self._after_step)

    def _after_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        predictors = list(self.predictors)
        for predictor in predictors:
            if predictor._attachment is None:
                predictor._misuse.after_optimizer_step(predictor, optimizer)
        if not predictors and self.hook is not None:  # every predictor is gone
            self.hook.remove()
            self.hook = None


watch = _Watch()


class Misuse:
    """The misuse checks of one predictor; each misuse is named once.

    ``calls`` counts the per-call steps since the last step of an optimizer holding W_p;
    ``eval_in_graph`` notes an eval-mode call inside a training graph since the last
    optimizer step.
    """

    def __init__(self) -> None:
        self.warned: set[str] = set()
        self.calls = 0
        self.eval_in_graph = False

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=user_stacklevel())

    def on_attach(self, predictor: "DirectPredictor", optimizer: torch.optim.Optimizer | None) -> None:
        """``freq > 1`` with W_p in no param group of the attached optimizer."""
        self.calls, self.eval_in_graph = 0, False
        if optimizer is not None and predictor.freq > 1 and not holds(optimizer, predictor.weight):
            self.warn_once("untrained", f"DirectPredictor(freq={predictor.freq}): W_p is in no param group of the "
                           "attached optimizer, so it is never trained between rebuilds; add "
                           "predictor.parameters() to it")

    def idle_step(self) -> None:
        """An attached step with no training call since the last one."""
        self.warn_once("idle", "DirectPredictor: an optimizer step with no training-mode call since the last "
                       "step; is the predictor in eval mode or not in the forward pass? F and W_p are unchanged "
                       "and no step is counted")

    def after_optimizer_step(self, predictor: "DirectPredictor", optimizer: torch.optim.Optimizer) -> None:
        """Per-call mode, at any optimizer's step: an eval-mode call inside a training
        graph since the last step (grad mode on, the input part of a graph: most likely a
        ``model.train()`` forgotten after a validation pass, which leaves F and W_p frozen;
        without an optimizer step, e.g. a gradient taken through a frozen predictor, it is
        not named); several training calls between two steps of this predictor's
        optimizer (one holding W_p), which are several DirectPred steps where the authors
        fold both views of a step as one batch; and with ``freq > 1`` more than ``freq``
        calls with W_p's gradient built up and no optimizer stepping W_p, which is then
        never trained between rebuilds."""
        if self.eval_in_graph:
            self.eval_in_graph = False
            self.warn_once("eval", "DirectPredictor: an optimizer step after a call in eval mode inside a "
                           "training graph: that batch was not recorded and no DirectPred step was taken; call "
                           "model.train() after a validation pass")
        if self.calls == 0:
            return
        if not holds(optimizer, predictor.weight):
            if predictor.freq > 1 and self.calls > predictor.freq and predictor.weight.grad is not None:
                self.warn_once("untrained", f"DirectPredictor(freq={predictor.freq}): W_p's gradient builds up but "
                               "no optimizer steps W_p, so it is never trained between rebuilds; add "
                               "predictor.parameters() to the optimizer")
            return  # not this predictor's optimizer
        if self.calls > 1:
            self.warn_once("per-view", f"DirectPredictor: {self.calls} training calls between two optimizer steps, "
                           "each one DirectPred step (F takes that many EMA steps per optimizer step); call "
                           "predictor.attach(optimizer) to fold them as one step, or concatenate the views into "
                           "one call")
        self.calls = 0
