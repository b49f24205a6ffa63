"""Device-generic tests, as PyTorch's device-type tests: one body, run on ``cpu`` always and
on ``cuda`` when a GPU is present (the ``cuda`` case is marked ``gpu``, which
tests/conftest.py skips without one). A refactor that breaks the body then fails the CPU
run at once, instead of waiting for a GPU to be lent."""
from __future__ import annotations

import contextlib

import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def no_host_sync(device: str) -> contextlib.AbstractContextManager:
    """On CUDA, any host synchronisation torch knows of raises inside the block; on CPU
    (where reading a tensor is free) it checks nothing."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def guard():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return guard()


def generator(device: str, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
