"""The Triton rebuild kernel (W = U diag(eig_map(s)) U^T) against :mod:`fastpred.backends.reference`.

Runs on CPU tensors through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 when there is no GPU); GPU variants at the end are skipped here.
"""
import pytest
import torch

pytest.importorskip("triton")

from fastpred import functional  # noqa: E402
from fastpred.backends import reference, resolve  # noqa: E402
from fastpred.backends import triton as tb  # noqa: E402
from fastpred.eig_map import EigMap  # noqa: E402
from fastpred.backends.triton_kernels import triton_common  # noqa: E402
from fastpred.backends.triton_kernels.triton_common import TileConfig  # noqa: E402
from fastpred.backends.triton_kernels.triton_rebuild import rebuild_launch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=1e-5, atol=1e-5)  # IEEE fp32 tl.dot (interpreter; GPU at "highest" precision)


@pytest.fixture(autouse=True)
def gpu_dot_sizes(monkeypatch):
    """Make the interpreter reject tl.dot blocks smaller than 16, as GPUs do."""
    if not triton_common.INTERPRETED:
        return
    from triton.runtime.interpreter import interpreter_builder

    monkeypatch.setitem(interpreter_builder.codegen_fns, "min_dot_size", lambda lhs, rhs: (16, 16, 16))


def eigenpairs(d, *batch, seed=0, shift=0.0):
    """Eigenpairs of a random symmetric matrix (eigh's column-major U), some s < 0 when shift < 0."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, d, d, generator=g)
    f = a @ a.mT / d + shift * torch.eye(d)
    s, u = torch.linalg.eigh(f)
    return s.to(DEVICE), u.to(DEVICE)


# The paper's map, DirectCopy (power 1), Eq. 18 as printed, and general powers with no
# boost (eps = 0, the smallest EigMap accepts: p reaches 0).
MAPS = {
    "relative-sqrt": EigMap(0.1, 0.5, "relative", 1e-4),
    "relative-copy": EigMap(0.3, 1.0, "relative", 1e-4),
    "absolute-sqrt": EigMap(0.1, 0.5, "absolute", 1e-4),
    "relative-power0.3-no-boost": EigMap(0.0, 0.3, "relative", 0.0),
    "absolute-power2-no-boost": EigMap(0.0, 2.0, "absolute", 0.0),
}

# (d, map, shift): every dim; every map at least once; negative eigenvalues (clamped) too.
CASES = [
    (1, "relative-sqrt", 0.0),
    (1, "absolute-sqrt", 0.0),
    (7, "relative-copy", -0.5),
    (7, "absolute-power2-no-boost", -0.5),
    (129, "absolute-sqrt", -0.2),
    (129, "relative-power0.3-no-boost", 0.0),
    (200, "relative-sqrt", 0.0),
    (256, "relative-sqrt", -0.1),
]


@pytest.mark.parametrize("d, map_name, shift", CASES)
def test_rebuild_matches_reference(d, map_name, shift):
    s, u = eigenpairs(d, shift=shift)
    eig_map = MAPS[map_name]

    w = tb.rebuild(s, u, eig_map)

    torch.testing.assert_close(w, reference.rebuild(s, u, eig_map), **TOL)
    assert torch.equal(w, w.mT), "mirrored tiles must give an exactly symmetric W"


@pytest.mark.parametrize("map_name", list(MAPS))
def test_eig_map_inside_kernel(map_name):
    """With U = I the kernel's output is diag(p): the map itself, entry by entry."""
    d = 33
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(d, generator=g) * 2).to(DEVICE)  # unsorted, some negative
    u = torch.eye(d, device=DEVICE)
    eig_map = MAPS[map_name]

    w = tb.rebuild(s, u, eig_map)

    torch.testing.assert_close(w.diagonal(), eig_map(s), rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(w - torch.diag(w.diagonal())) == 0


@pytest.mark.parametrize("eps_mode, expected_p", [("relative", 0.1), ("absolute", 0.0)])
def test_all_zero_corr(eps_mode, expected_p):
    """F = 0: relative mode gives max(eps, min_eig) I, absolute mode gives 0; always finite."""
    d = 7
    s, u = torch.linalg.eigh(torch.zeros(d, d))
    s, u = s.to(DEVICE), u.to(DEVICE)

    eig_map = EigMap(0.1, 0.5, eps_mode, 1e-4)

    w = tb.rebuild(s, u, eig_map)

    assert torch.isfinite(w).all()
    torch.testing.assert_close(w, expected_p * torch.eye(d, device=DEVICE), **TOL)
    torch.testing.assert_close(w, reference.rebuild(s, u, eig_map), **TOL)


def test_batched_unsorted_and_strided():
    """(2, 3) matrices in one launch; eigenpairs permuted (s_max not last); U contiguous or not."""
    d = 7
    s, u = eigenpairs(d, 2, 3, shift=-0.1)
    perm = torch.randperm(d, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    s, u = s[..., perm], u[..., perm]  # u now row-major (contiguous) after indexing
    eig_map = MAPS["relative-sqrt"]

    w = tb.rebuild(s, u, eig_map)
    w_t = tb.rebuild(s, u.mT.contiguous().mT, eig_map)  # same values, column-major

    expected = torch.empty_like(w)
    for i in range(2):
        for j in range(3):
            expected[i, j] = reference.rebuild(s[i, j], u[i, j], eig_map)
    torch.testing.assert_close(w, expected, **TOL)
    assert torch.equal(w, w_t)
    assert torch.equal(w, w.mT)


def test_small_tiles_many_programs():
    """16 x 16 tiles at d = 129: a 9 x 9 grid (45 programs), every element written."""
    s, u = eigenpairs(129)
    eig_map = MAPS["absolute-sqrt"]
    w = rebuild_launch(s, u, eig_map, config=TileConfig(16, 16, 4, 2))
    torch.testing.assert_close(w, reference.rebuild(s, u, eig_map), **TOL)
    assert torch.equal(w, w.mT)


@pytest.mark.parametrize(
    "s_shape, u_shape, dtype, eps_mode, power, error",
    [
        ((6,), (7, 7), torch.float32, "relative", 0.5, ValueError),
        ((7,), (7, 6), torch.float32, "relative", 0.5, ValueError),
        ((7,), (7, 7), torch.float64, "relative", 0.5, TypeError),
        ((7,), (7, 7), torch.float32, "scaled", 0.5, ValueError),
        ((7,), (7, 7), torch.float32, "relative", 0.0, ValueError),
    ],
    ids=["s-shape", "u-not-square", "dtype", "eps-mode", "power"],
)
def test_bad_inputs_raise(s_shape, u_shape, dtype, eps_mode, power, error):
    """At the operator, which direct callers reach with scalars."""
    s = torch.zeros(s_shape, dtype=dtype, device=DEVICE)
    u = torch.zeros(u_shape, dtype=dtype, device=DEVICE)
    with pytest.raises(error):
        torch.ops.fastpred.triton_rebuild(s, u, 0.1, power, eps_mode, 1e-4)


def test_directpred_weight_through_dispatch():
    """functional.directpred_weight with backend="triton": reference eigh, Triton rebuild."""
    impl = resolve("triton", DEVICE)
    assert impl.rebuild is tb.rebuild
    g = torch.Generator().manual_seed(7)
    a = torch.randn(2, 40, 40, generator=g)
    corr = (a @ a.mT / 40).to(DEVICE)
    w_triton = functional.directpred_weight(corr, backend="triton")
    w_torch = functional.directpred_weight(corr, backend="torch")
    torch.testing.assert_close(w_triton, w_torch, **TOL)


def test_opcheck():
    s, u = eigenpairs(7)
    for m in MAPS.values():
        torch.library.opcheck(torch.ops.fastpred.triton_rebuild.default, (s, u, m.eps, m.power, m.eps_mode, m.min_eig))


def test_torch_compile_fullgraph():
    s, u = eigenpairs(7)
    eig_map = MAPS["relative-sqrt"]

    def predict(features, s, u):
        return features @ tb.rebuild(s, u, eig_map)

    compiled = torch.compile(predict, backend="aot_eager", fullgraph=True)
    f = torch.randn(5, 7, device=DEVICE)
    torch.testing.assert_close(compiled(f, s, u), predict(f, s, u), **TOL)


# ---------------------------------------------------------------------------
# GPU only (skipped here)
# ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("precision, tol", [("highest", TOL), ("high", dict(rtol=1e-2, atol=5e-3))])
def test_gpu_large_batched(precision, tol):
    """1024-wide (large config) batched rebuild; TF32 tolerance when matmuls may use it."""
    s, u = eigenpairs(1024, 2)
    eig_map = MAPS["relative-sqrt"]
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        expected = reference.rebuild(s, u, eig_map)
        torch.set_float32_matmul_precision(precision)
        w = tb.rebuild(s, u, eig_map)
        again = tb.rebuild(s, u, eig_map)
    finally:
        torch.set_float32_matmul_precision(previous)
    torch.testing.assert_close(w, expected, **tol)
    assert torch.equal(w, w.mT)
    assert torch.equal(w, again)  # deterministic: no races


@pytest.mark.parametrize("eps_mode", ["relative", "absolute"])
def test_nan_eigenvalue_gives_nan_weight_like_the_reference(eps_mode):
    """A failed GPU eigendecomposition leaves NaN eigenvalues (fastpred.backends.eigh_driver):
    W must come out non-finite so that a finiteness check rejects it."""
    d = 40
    s, u = torch.linalg.eigh(torch.eye(d) + 0.01 * torch.ones(d, d))
    s[3] = float("nan")
    eig_map = EigMap(0.1, 0.5, eps_mode, 1e-4)
    expected = reference.rebuild(s, u, eig_map)
    w = rebuild_launch(s.to(DEVICE), u.to(DEVICE), eig_map)
    assert not torch.isfinite(expected).all()
    assert torch.equal(torch.isnan(w).cpu(), torch.isnan(expected))
