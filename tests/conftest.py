"""Shared test setup: CPU-only by default; GPU tests are marked ``gpu`` and skipped here."""
import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU.
# It must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep the 2-core CI machine predictable.
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here); run `make gpu-check` on a GPU machine")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not the tests/gpu folder's name
            item.add_marker(skip)
