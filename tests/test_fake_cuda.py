"""The fake-CUDA tier: the module's step paths on device ``cuda`` with no GPU.

Under torch's ``FakeTensorMode`` tensors carry device, shape and dtype but no data, so a
program runs on ``cuda`` here. What it proves (docs/design.md, "What runs where"): every
buffer and output stays on cuda; the statistics stay float32 under fp16 and bf16
autocast; and the hot path never reads a device value on the host. A host read
(``.item()``, ``bool(t)``, ``int(t)``: ``aten._local_scalar_dense``) has no value under
fake tensors; :class:`HostReads` records each one (with the fastpred function that made
it) and answers a harmless value, so an ``except`` in the code cannot hide it either.
Ops that need data to know their output's shape (``nonzero``) still raise.

What it cannot prove: that a kernel runs or is right (Triton and CuPy launches cannot
run on fake tensors, so the step paths take the torch route, ``backend="torch"``), and
that cuSOLVER or ``torch.linalg.eigh`` make no sync of their own; ``tests/gpu`` does that
on a GPU. Backward is not run (autograd needs a CUDA context).
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from fastpred import DirectPredictor, backends, schedule
from fastpred.losses import isoloss

D, N, STEPS = 16, 12, 4
AUTOCAST = [None, torch.float16, torch.bfloat16]
_FASTPRED = os.path.dirname(os.path.abspath(sys.modules["fastpred"].__file__))


class HostReads(TorchDispatchMode):
    """Records every host read of a tensor's value, by the fastpred function that made it."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(_fastpred_caller())
            value = args[0]
            return True if value.dtype == torch.bool else 0.0 if value.is_floating_point() else 0
        return func(*args, **(kwargs or {}))


def _fastpred_caller() -> str:
    frame = sys._getframe(2)
    while frame is not None and not frame.f_code.co_filename.startswith(_FASTPRED):
        frame = frame.f_back
    return frame.f_code.co_name if frame is not None else "<outside fastpred>"


@contextlib.contextmanager
def fake_cuda():
    """Fake tensors on cuda, every warning an error (a kernel falling back warns), and
    the host reads made inside, recorded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with FakeTensorMode(), torch.device("cuda"), HostReads() as reads:
            yield reads


def autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """CUDA autocast without a GPU (torch checks for one when the context is made, not after)."""
    if dtype is None:
        return contextlib.nullcontext()
    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("torch.cuda.is_bf16_supported", return_value=True):
        return torch.autocast("cuda", dtype=dtype)


class FakeStreams:
    """Stand-in for fastpred.schedule.STREAMS: streams and events that record what was asked."""

    class Stream:
        def __init__(self, name):
            self.name, self.waited_for = name, []

        def wait_stream(self, other):
            self.waited_for.append(other.name)

        def wait_event(self, event):
            self.waited_for.append(event)

    class Event:
        def __init__(self):
            self.recorded_on = None

        def record(self, stream):
            self.recorded_on = stream.name

        def query(self):
            return True

        def synchronize(self):
            pass

    def __init__(self):
        self.main, self.side_stream, self.recorded = self.Stream("main"), self.Stream("side"), []
        self.active = "main"

    def current(self, device):
        return self.side_stream if self.active == "side" else self.main

    def side(self, device):
        return self.side_stream

    @contextlib.contextmanager
    def using(self, stream):
        before, self.active = self.active, stream.name
        try:
            yield
        finally:
            self.active = before

    def event(self):
        return self.Event()

    def record_stream(self, tensor, stream):
        self.recorded.append((tuple(tensor.shape), stream.name))

    def pinned_like(self, tensor):
        return torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")


def check_device_and_dtypes(pred: DirectPredictor, y: torch.Tensor, dtype: torch.dtype | None) -> None:
    assert y.device.type == "cuda" and y.dtype == (dtype or torch.float32)
    for name, buffer in pred.named_buffers():
        assert buffer.device.type == "cuda", name
    for name in ("corr", "mean", "thresholds", "solver_state"):
        if getattr(pred, name, None) is not None:
            assert getattr(pred, name).dtype == torch.float32, name
    assert pred._stats.moments.device.type == "cuda" and pred._stats.moments.dtype == torch.float32
    assert pred.weight.device.type == "cuda"


# ------------------------------------------------------------------ step paths
PATHS = {
    "per_call": dict(),
    "partitions": dict(partitions=2),
    "freq_3": dict(freq=3),
    "directcopy": dict(power=1.0),  # the closed form F / s_max + eps I
    "async_rebuild": dict(async_rebuild=True),
    "async_partitions_freq_2": dict(async_rebuild=True, partitions=2, freq=2),
}


@pytest.fixture
def streams(monkeypatch):
    fake = FakeStreams()
    monkeypatch.setattr(schedule, "STREAMS", fake)
    return fake


@pytest.mark.parametrize("dtype", AUTOCAST, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("path", PATHS)
def test_per_call_steps_stay_on_cuda_in_float32_without_a_host_read(path, dtype, streams):
    with fake_cuda() as host:
        pred = DirectPredictor(D, backend="torch", **PATHS[path])
        opt = torch.optim.SGD(pred.parameters(), lr=0.1)  # freq > 1: W_p is trained between rebuilds
        for _ in range(STEPS):
            with autocast(dtype):
                y = pred(torch.randn(N, D))
            opt.step()  # no backward under fake CUDA: the step's hooks run all the same
        check_device_and_dtypes(pred, y, dtype)
    assert host.reads == []
    if pred.async_rebuild:  # the rebuild went to the side stream, after the main one
        assert streams.side_stream.waited_for[:1] == ["main"] and streams.recorded


@pytest.mark.parametrize("dtype", AUTOCAST, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("path", ["per_call", "partitions", "freq_3", "async_rebuild"])
def test_attached_per_view_steps_stay_on_cuda_without_a_host_read(path, dtype, streams):
    with fake_cuda() as host:
        pred = DirectPredictor(D, backend="torch", **PATHS[path])
        opt = torch.optim.SGD([*pred.parameters(), torch.zeros(1, requires_grad=True)], lr=0.1)
        pred.attach(opt)
        for _ in range(STEPS):
            with autocast(dtype):
                y1, y2 = pred(torch.randn(N, D)), pred(torch.randn(N // 2, D))
            opt.step()
        check_device_and_dtypes(pred, y2, dtype)
    assert host.reads == []


def test_eval_calls_and_a_partitioned_isoloss_make_no_host_read(streams):
    with fake_cuda() as host:
        pred = DirectPredictor(D, backend="torch", partitions=2, async_rebuild=True)
        z = torch.randn(N, D, requires_grad=True)
        with autocast(torch.bfloat16):
            loss = isoloss(z, pred(z), torch.randn(N, D))
        assert loss.device.type == "cuda" and loss.dtype == torch.float32 and loss.dim() == 0
        pred.eval()  # installs the rebuild in flight
        assert pred._schedule.pending is None
        with autocast(torch.float16):
            y = pred(torch.randn(N, D))
        check_device_and_dtypes(pred, y, torch.float16)
    assert host.reads == []


def test_state_dict_and_load_read_the_host_only_where_documented(streams):
    """state_dict reports the skips found on the device (one read); a load checks the
    checkpoint's values and sets the host mirrors (its reads); no other read anywhere."""
    with fake_cuda() as host:
        pred = DirectPredictor(D, backend="torch", power=1.0, async_rebuild=True)
        pred(torch.randn(N, D))
        state = pred.state_dict()
        assert pred._schedule.pending is None  # collected before saving
        assert all(t.device.type == "cuda" for t in state.values())
        assert state["corr"].dtype == torch.float32 and state["solver_state"].dtype == torch.float32
        saved = set(host.reads)
        twin = DirectPredictor(D, backend="torch", power=1.0)
        twin.load_state_dict(state)
        loaded = set(host.reads) - saved
        y = twin(torch.randn(N, D))
        check_device_and_dtypes(twin, y, None)
    assert saved == {"_warn_new_skips"}
    assert loaded <= {"_load_from_state_dict", "_after_load"} and loaded
    assert set(host.reads) == saved | loaded  # the step after the load read nothing


# ------------------------------------------------------------------ dispatch decisions
def test_auto_picks_per_step_on_cuda_from_what_is_installed():
    everything = backends.auto_choice("cuda", lambda name: True)
    assert everything == {"gram": "triton", "corr_ema_": "triton", "fold_": "triton", "eigh": "cupy",
                          "rebuild": "triton", "install_": "triton"}
    no_cupy = backends.auto_choice("cuda", lambda name: name != "cupy")
    assert no_cupy["eigh"] == "csrc"
    nothing = backends.auto_choice("cuda", lambda name: False)
    assert nothing == dict.fromkeys(backends.STEPS, "torch")  # torch.linalg.eigh: it syncs, but runs
    cpu = backends.auto_choice("cpu", lambda name: True)
    assert cpu == {"gram": "torch", "corr_ema_": "csrc", "fold_": "csrc", "eigh": "csrc", "rebuild": "csrc",
                   "install_": "csrc"}


@pytest.mark.parametrize("dtype, precision, triton_statistics, triton_rebuild", [
    (torch.float32, "highest", False, False),  # plain FMA work: cuBLAS
    (torch.bfloat16, "highest", True, False),  # tensor cores for the statistics only
    (torch.float16, "highest", True, False),
    (torch.float32, "high", True, True),  # TF32 allowed: tensor cores everywhere
])
def test_auto_sends_a_call_to_triton_where_tensor_cores_apply(dtype, precision, triton_statistics, triton_rebuild):
    pytest.importorskip("triton")
    from fastpred.backends import triton as module

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        with FakeTensorMode(), torch.device("cuda"):
            x, corr = torch.randn(N, D, dtype=dtype), torch.zeros(D, D)
            s, u = torch.zeros(D), torch.zeros(D, D)
            assert module.prefers("gram", x) is triton_statistics
            assert module.prefers("corr_ema_", corr, x, 0.5) is triton_statistics
            assert module.prefers("rebuild", s, u) is triton_rebuild
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("n, matrices, solver", [
    (16, 8, "batched"),  # a stack of small matrices: one batched call
    (32, 2, "batched"),
    (16, 1, "cupy.Xsyevd"),  # a single matrix: the per-matrix solver
    (33, 8, "above_jacobi"),  # beyond syevjBatched's n <= 32
    (512, 1, "cupy.Xsyevd"),
])
def test_the_gpu_eigensolver_picks_its_routine_by_size(n, matrices, solver):
    """The CuPy backend's driver (cuSOLVER through fastpred.backends.eigh_driver): which
    routine takes a stack of ``matrices`` of size n (decided on the host, no GPU needed)."""
    pytest.importorskip("cupy")
    import numpy as np

    from fastpred.backends import cupy as module
    from fastpred.backends.eigh_driver import EighDriver
    from tests.numpy_ops import NumpyOps

    solvers = module.cuda_solvers()
    names = [s.name for s in solvers]
    driver = EighDriver(NumpyOps(), solvers)
    picked, count = driver._pick(n, matrices, np.float32)
    if solver == "batched":  # csrc's XsyevBatched when the extension has it, else CuPy's Jacobi
        assert picked.batched and picked.name == names[0] and count == matrices
    elif solver == "above_jacobi":
        assert picked.name != "cupy.syevjBatched"
        assert picked.name == ("csrc.XsyevBatched" if "csrc.XsyevBatched" in names else "cupy.Xsyevd")
    else:
        assert picked.name == solver
