"""pytest-benchmark: the full DirectPred update against the authors' update and a bare eigh.

    .venv/bin/python -m pytest bench/test_update.py --benchmark-only --benchmark-group-by=param:size

Not part of ``make test`` (tests/ is the test suite); ``python -m bench.ratios`` prints
the same comparison as ratios measured round-robin in one run.
"""
import pytest
import torch

from bench.harness import authors_update, fastpred_update, inputs

SIZES = {"128x256": (128, 256), "256x512": (256, 512), "1024x2048": (1024, 2048)}


@pytest.fixture(params=list(SIZES), ids=list(SIZES))
def size(request):
    return request.param


def test_fastpred_update(benchmark, size):
    x, corr = inputs(*SIZES[size])
    benchmark(fastpred_update, corr, x)


def test_authors_update(benchmark, size):
    x, corr = inputs(*SIZES[size])
    benchmark.pedantic(authors_update, args=(corr, x), rounds=3 if size == "1024x2048" else 10)


def test_bare_eigh(benchmark, size):
    _, corr = inputs(*SIZES[size])
    benchmark(torch.linalg.eigh, corr)
