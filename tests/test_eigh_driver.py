"""fastpred.backends.eigh_driver with NumPy arrays and NumPy stand-ins for the cuSOLVER routines.

Everything the GPU backends do around the library calls runs here: workspace
caching, batching under the INT32 limit, the fallback chain, float64 retries and the
lazy ``info`` check, with failures injected by the fake solvers.
"""
import warnings

import numpy as np
import pytest

from numpy_ops import NumpyOps

from fastpred.backends.eigh_driver import INT32_MAX, EighDriver, Solver


# ----------------------------------------------------------------- fakes
class FakeRoutine:
    """A cuSOLVER routine's contract in NumPy: a (batch, n, n) row-major, lower triangle
    read, row j of a[b] <- eigenvector j, w <- ascending eigenvalues, info <- status.

    fail_marker: matrices whose a[b][0, 0] equals it get info = 7 (a convergence
    failure the caller only learns about from info). refuse: raise RuntimeError when
    called (an unavailable routine). dtypes: the dtypes it accepts (else it raises).
    """

    def __init__(self, name, *, batched=False, max_n=None, refuse=False, dtypes=None, fail_marker=None):
        self.name, self.batched, self.max_n = name, batched, max_n
        self.refuse, self.dtypes, self.fail_marker = refuse, dtypes, fail_marker
        self.calls = []  # (batch, n, dtype) per run
        self.size_queries = 0
        self.workspaces = []  # ids of the device workspaces it was given

    def workspace_size(self, a, w):
        self.size_queries += 1
        return 8 * a.shape[-1] * (a.shape[0] if self.batched else 1), 3

    def run(self, a, w, info, work_device, work_host):
        if self.refuse:
            raise RuntimeError(f"{self.name}: not available in this library")
        if self.dtypes is not None and a.dtype not in self.dtypes:
            raise RuntimeError(f"{self.name}: {a.dtype} not supported")
        need_device, need_host = 8 * a.shape[-1] * (a.shape[0] if self.batched else 1), 3
        assert work_device.nbytes >= need_device and work_host.nbytes >= need_host
        assert a.flags.c_contiguous and w.flags.c_contiguous
        self.calls.append((a.shape[0], a.shape[-1], a.dtype))
        self.workspaces.append(id(work_device))
        for b in range(a.shape[0]):
            failed = self.fail_marker is not None and a[b, 0, 0] == self.fail_marker
            vals, vecs = np.linalg.eigh(a[b], UPLO="L")
            w[b] = vals
            a[b] = vecs.T  # row j = eigenvector j
            info[b] = 7 if failed else 0

    def solver(self):
        return Solver(self.name, self.run, self.workspace_size, batched=self.batched, max_n=self.max_n)


class DelayedOps(NumpyOps):
    """Copies of info land only after `delay` polls (a GPU running behind the host)."""

    def __init__(self, delay):
        self.delay = delay
        self.started = 0
        self.capture = False
        self.stream = "s0"

    def start_to_host(self, info):
        self.started += 1
        return _DelayedPending(np.array(info, copy=True), self.delay)

    def capturing(self):
        return self.capture

    def stream_key(self):
        return self.stream


class _DelayedPending:
    def __init__(self, values, delay):
        self.values, self.left = values, delay

    def ready(self):
        if self.left == 0:
            return True
        self.left -= 1
        return False

    def wait(self):
        return self.values


def sym(n, batch=(), seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*batch, 2 * n + 1, n))
    return (np.swapaxes(x, -1, -2) @ x / (2 * n + 1)).astype(dtype)


def driver_with(*routines, ops=None, **kw):
    return EighDriver(ops or NumpyOps(), [r.solver() for r in routines], **kw)


def assert_eigh(a, w, u, rtol=2e-4):
    ref_w = np.linalg.eigh(a.astype(np.float64), UPLO="L")[0]
    np.testing.assert_allclose(w, ref_w, rtol=rtol, atol=rtol * np.abs(ref_w).max())
    # eigenvectors in columns: a u = u diag(w), orthonormal
    lower = np.tril(a) + np.swapaxes(np.tril(a, -1), -1, -2)
    np.testing.assert_allclose(lower @ u, u * w[..., None, :], atol=1e-3 * np.abs(ref_w).max())
    eye = np.broadcast_to(np.eye(a.shape[-1]), u.shape)
    np.testing.assert_allclose(np.swapaxes(u, -1, -2) @ u, eye, atol=1e-4)


# --------------------------------------------------------------- results
@pytest.mark.parametrize("n", [1, 7, 33])
@pytest.mark.parametrize("batch", [(), (5,), (2, 3)])
def test_results_match_numpy_and_layout_of_torch_eigh(n, batch):
    a = sym(n, batch)
    single, batched = FakeRoutine("single"), FakeRoutine("batched", batched=True)
    w, u = driver_with(batched, single).eigh(a)
    assert w.shape == (*batch, n) and u.shape == (*batch, n, n) and w.dtype == np.float32
    assert_eigh(a, w, u)
    # a stack goes to the batched routine, a lone matrix to the per-matrix one
    expected = "batched" if np.prod(batch, dtype=int) > 1 else "single"
    assert (batched.calls if expected == "batched" else single.calls)
    assert not (single.calls if expected == "batched" else batched.calls)


def test_only_the_lower_triangle_is_read_and_input_is_untouched():
    a = sym(9)
    garbage = a + np.triu(np.full_like(a, 5.0), 1)
    before = garbage.copy()
    w, u = driver_with(FakeRoutine("single")).eigh(garbage)
    assert_eigh(a, w, u)
    np.testing.assert_array_equal(garbage, before)


def test_float64_input_stays_float64_and_float16_becomes_float32():
    single = FakeRoutine("single")
    driver = driver_with(single)
    w64, _ = driver.eigh(sym(6, dtype=np.float64))
    w16, _ = driver.eigh(sym(6).astype(np.float16))
    assert w64.dtype == np.float64 and w16.dtype == np.float32
    assert [c[2] for c in single.calls] == [np.float64, np.float32]


# -------------------------------------------------------------- workspaces
def test_workspace_is_queried_and_allocated_once_per_shape_and_dtype():
    single = FakeRoutine("single")
    driver = driver_with(single)
    for _ in range(4):
        driver.eigh(sym(8))
    assert single.size_queries == 1 and driver.stats.workspace_allocations == 1
    assert len(set(single.workspaces)) == 1  # the same buffer every call
    driver.eigh(sym(9))
    driver.eigh(sym(8, dtype=np.float64))
    assert single.size_queries == 3 and driver.stats.workspace_allocations == 3
    # a stack reuses the per-matrix workspace of its size (the routine loops)
    driver.eigh(sym(8, (3,)))
    assert driver.stats.workspace_allocations == 3


def test_batched_workspace_is_keyed_by_batch_size_and_stream():
    batched = FakeRoutine("batched", batched=True)
    ops = DelayedOps(delay=0)
    driver = driver_with(batched, FakeRoutine("single"), ops=ops)
    driver.eigh(sym(5, (4,)))
    driver.eigh(sym(5, (4,)))
    driver.eigh(sym(5, (6,)))
    assert batched.size_queries == 2
    ops.stream = "s1"  # another stream gets its own workspace (no sharing across streams)
    driver.eigh(sym(5, (4,)))
    assert batched.size_queries == 3 and len(set(batched.workspaces)) == 3


def test_least_recently_used_workspaces_are_dropped():
    single = FakeRoutine("single")
    driver = driver_with(single, max_cached=2)
    for n in (3, 4, 3, 5, 3, 4):
        driver.eigh(sym(n))
    # 3 stays warm (used most recently each time); 4 was evicted by 5 and comes back
    assert driver.stats.workspace_allocations == 4
    assert len(driver._workspaces) == 2


# ---------------------------------------------------------------- batching
def test_stack_is_chunked_under_the_int32_limit():
    n = 6
    batched, single = FakeRoutine("batched", batched=True), FakeRoutine("single")
    driver = driver_with(batched, single, int32_limit=3 * n * n + 5)
    a = sym(n, (8,))
    w, u = driver.eigh(a)
    assert_eigh(a, w, u)
    assert [c[0] for c in batched.calls] == [3, 3, 2]  # n * n * chunk <= limit
    assert not single.calls
    assert INT32_MAX == 2**31 - 1


@pytest.mark.parametrize("n, batch, per_call, batched_chunks", [(4, 5, 2, [2, 2]), (40, 7, 3, [3, 3])])
def test_last_chunk_of_one_matrix_goes_to_the_per_matrix_routine(n, batch, per_call, batched_chunks):
    """(40, 7, 3) replays tests/gpu/test_gpu_eigh.py's chunking case: 3 + 3 batched, 1 alone."""
    batched, single = FakeRoutine("batched", batched=True), FakeRoutine("single")
    driver = driver_with(batched, single, int32_limit=per_call * n * n)
    a = sym(n, (batch,))
    assert_eigh(a, *driver.eigh(a))
    assert [c[0] for c in batched.calls] == batched_chunks and [c[0] for c in single.calls] == [1]
    assert driver.stats.solver_calls == {"batched": len(batched_chunks), "single": 1}


def test_solver_size_limit_is_respected():
    jacobi = FakeRoutine("jacobi", batched=True, max_n=32)
    single = FakeRoutine("single")
    driver = driver_with(jacobi, single)
    driver.eigh(sym(32, (3,)))
    driver.eigh(sym(33, (3,)))
    assert [c[1] for c in jacobi.calls] == [32] and [c[1] for c in single.calls] == [33]


# --------------------------------------------------------------- fallbacks
def test_a_refusing_solver_is_disabled_with_a_warning_and_the_next_takes_over():
    broken = FakeRoutine("batched", batched=True, refuse=True)
    jacobi, single = FakeRoutine("jacobi", batched=True, max_n=32), FakeRoutine("single")
    driver = driver_with(broken, jacobi, single)
    a = sym(10, (4,))
    with pytest.warns(RuntimeWarning, match="batched failed") as record:
        w, u = driver.eigh(a)
    assert [r.filename for r in record] == [__file__]  # points at the caller's line, not the driver
    assert_eigh(a, w, u)
    assert jacobi.calls and "batched/n=10/float32" in driver.stats.disabled
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # disabled: not tried (nor warned about) again
        driver.eigh(a)
    assert len(jacobi.calls) == 2
    # another size still tries it (a failure may depend on n)
    with pytest.warns(RuntimeWarning):
        driver.eigh(sym(40, (2,)))
    assert single.calls[-1][:2] == (2, 40)


def test_float64_retry_when_every_float32_solver_refuses():
    """The driver retries nothing: it raises, and the one retry chain
    (fastpred.eigh.symmetric_eigh) calls it again with the matrix in float64."""
    only64 = FakeRoutine("single", dtypes=(np.float64,))
    driver = driver_with(only64)
    a = sym(7)
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="no eigensolver succeeded: float32"):
        driver.eigh(a)
    w, u = driver.eigh(a.astype(np.float64))  # the chain's float64 attempt
    assert w.dtype == np.float64 and u.dtype == np.float64
    assert only64.calls == [(1, 7, np.float64)]
    assert_eigh(a, w.astype(np.float32), u.astype(np.float32))


def test_no_usable_solver_raises_runtime_error_naming_the_reasons():
    driver = driver_with(FakeRoutine("single", refuse=True))
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="no eigensolver succeeded.*not available"):
        driver.eigh(sym(4))


# ---------------------------------------------------------------- lazy info
def test_failed_matrices_get_nan_eigenvalues_in_the_call_itself():
    """Without reading info on the host: only the failed matrix of a stack is NaN."""
    marker = 31.0
    driver = driver_with(FakeRoutine("batched", batched=True, fail_marker=marker), FakeRoutine("single"),
                         ops=DelayedOps(delay=10**9))  # info never reaches the host
    a = sym(6, (4,))
    a[1, 0, 0] = marker
    w, u = driver.eigh(a)
    assert np.isnan(w[1]).all()
    assert np.isfinite(w[[0, 2, 3]]).all()
    assert_eigh(a[[0, 2, 3]], w[[0, 2, 3]], u[[0, 2, 3]])
    assert not driver.stats.failures  # nothing known on the host yet


def test_failure_is_reported_by_a_later_call_without_waiting():
    marker = 123.0
    single = FakeRoutine("single", fail_marker=marker)
    ops = DelayedOps(delay=2)
    driver = driver_with(single, ops=ops)
    bad = sym(5)
    bad[0, 0] = marker
    w, _ = driver.eigh(bad)  # the failing call itself returns: info is still on the "device"
    assert np.isnan(w).all()  # ... but its eigenvalues say so
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        driver.eigh(sym(5))  # poll 1: copy not landed
        driver.eigh(sym(5))  # poll 2: not yet
    with pytest.warns(RuntimeWarning, match=r"call 1 .*n=5, float32.*matrix 0: info=7") as record:
        w, u = driver.eigh(sym(5))  # poll 3: landed, reported here; this call is fine
    assert [r.filename for r in record] == [__file__]
    assert_eigh(sym(5), w, u)
    assert len(driver.stats.failures) == 1
    # from now on this size runs in float64; results still come back float32
    w, _ = driver.eigh(sym(5))
    assert single.calls[-1][2] == np.float64 and w.dtype == np.float32
    driver.eigh(sym(6))
    assert single.calls[-1][2] == np.float32  # other sizes unaffected


def test_healthy_calls_never_report_and_check_waits_for_everything():
    marker = -9.0
    single = FakeRoutine("single", fail_marker=marker)
    ops = DelayedOps(delay=100)  # the copies never land by polling
    driver = driver_with(single, ops=ops)
    for _ in range(3):
        driver.eigh(sym(4))
    bad = sym(4, (3,))
    bad[2, 0, 0] = marker
    driver.eigh(bad)
    assert len(driver._pending) == 4
    with pytest.warns(RuntimeWarning, match="matrix 2: info=7"):
        found = driver.check()
    assert len(found) == 1 and "call 4" in found[0]
    assert not driver._pending
    assert driver.check() == []  # nothing left


def test_pending_checks_are_bounded_instead_of_waiting():
    ops = DelayedOps(delay=10**9)
    driver = driver_with(FakeRoutine("single"), ops=ops, max_pending=3)
    for _ in range(5):
        driver.eigh(sym(3))
    assert len(driver._pending) == 3 and driver.stats.unchecked == 2


def test_graph_capture_keeps_info_for_check_and_starts_no_copy():
    marker = 77.0
    ops = DelayedOps(delay=0)
    driver = driver_with(FakeRoutine("single", fail_marker=marker), ops=ops)
    ops.capture = True
    bad = sym(4)
    bad[0, 0] = marker
    driver.eigh(sym(4))
    driver.eigh(bad)
    assert ops.started == 0 and len(driver._captured) == 2
    ops.capture = False
    with pytest.warns(RuntimeWarning, match="call 2"):
        assert len(driver.check()) == 1


def test_rejects_non_square_input_and_bad_options():
    driver = driver_with(FakeRoutine("single"))
    with pytest.raises(ValueError, match="must be"):
        driver.eigh(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="solvers"):
        EighDriver(NumpyOps(), [])
