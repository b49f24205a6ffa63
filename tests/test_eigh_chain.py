"""fastpred.eigh.symmetric_eigh: the one place a failed eigendecomposition is retried.

A backend's own solver is retried in float64 (on a GPU: cuSOLVER in float64, without a
host sync) before the reference, then the reference in float64, then with jitter."""
import dataclasses

import pytest
import torch

from fastpred import backends
from fastpred.backends import reference
from fastpred.eigh import EighError, symmetric_eigh


def spd(d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * d, d, generator=g)
    return x.T @ x / (3 * d)


def backend_with_eigh(eigh):
    return dataclasses.replace(backends.resolve("torch", "cpu"), name="test", eigh=eigh)


def test_a_backend_refusing_float32_is_retried_in_float64_before_the_reference(monkeypatch):
    calls = []

    def float64_only(a):
        calls.append(("backend", a.dtype))
        if a.dtype != torch.float64:
            raise RuntimeError("no float32 routine here")
        return torch.linalg.eigh(a)

    monkeypatch.setattr(reference, "eigh", lambda a: calls.append(("reference", a.dtype)) or torch.linalg.eigh(a))
    corr = spd()
    s, u = symmetric_eigh(corr, backend=backend_with_eigh(float64_only))
    assert calls == [("backend", torch.float32), ("backend", torch.float64)]
    assert s.dtype == u.dtype == torch.float32
    torch.testing.assert_close(s.double(), torch.linalg.eigvalsh(corr.double()), rtol=1e-5, atol=1e-6)


def test_then_the_reference_in_float64_then_jitter_then_one_error_naming_each(monkeypatch):
    calls = []

    def broken(a):
        calls.append(("backend", a.dtype))
        raise RuntimeError("backend broken")

    def reference_broken(a):
        calls.append(("reference", a.dtype))
        raise torch.linalg.LinAlgError("reference broken")

    monkeypatch.setattr(reference, "eigh", reference_broken)
    with pytest.raises(EighError, match="backend broken; backend broken; reference broken; reference broken"):
        symmetric_eigh(spd(), backend=backend_with_eigh(broken))
    assert calls == [("backend", torch.float32), ("backend", torch.float64),
                     ("reference", torch.float64), ("reference", torch.float64)]  # the last one jittered


def test_the_reference_backend_is_not_tried_twice(monkeypatch):
    calls = []
    real = torch.linalg.eigh

    def flaky(a, *args, **kwargs):
        calls.append(a.dtype)
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("injected")
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    symmetric_eigh(spd(), backend="torch")
    assert calls == [torch.float32, torch.float64]
