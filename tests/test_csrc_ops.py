"""The compiled operators (csrc/, torch.ops.fastpred.*) against the torch reference, on CPU.

Per op: odd shapes against ``fastpred.backends.reference``, ``torch.library.opcheck``
(schema, fake kernel, autograd registration, AOT dispatch) and a ``torch.compile``
test. Their CUDA variants are in tests/gpu/. Also here: the test that fails when the
CUDA sources were not compiled and linked into ``fastpred._C`` although a CUDA
toolkit is present.
"""
import os
import shutil

import pytest
import torch

import fastpred._C as _C
from fastpred import functional
from fastpred.backends import csrc, reference
from fastpred.eig_map import EigMap

ops = torch.ops.fastpred
SIZES = [(1, 1), (7, 3), (129, 77), (200, 512), (256, 33)]  # (d, N)
MAPS = [  # relative (paper), absolute (Eq. 18), DirectCopy, general-sign
    EigMap(0.1, 0.5, "relative", 1e-4),
    EigMap(0.1, 0.5, "absolute", 1e-4),
    EigMap(0.0, 1.0, "relative", 1e-4),
    EigMap(0.3, 0.7, "relative", -1.0),
]


def features(n, d, batch=(), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return (torch.randn(*batch, n, d, generator=g) @ mix + 0.2).to(dtype)


def correlation(d, batch=(), seed=1):
    x = features(2 * d + 3, d, batch, seed)
    return x.mT @ x / x.shape[-2]


def sample_inputs(device="cpu"):
    """corr_ema_ argument tuples at odd shapes, batch shapes and feature dtypes."""
    out = []
    for i, (d, n) in enumerate(SIZES):
        for batch in [(), (3,)] if d < 200 else [()]:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                corr = correlation(d, batch, seed=i).to(device)
                x = features(n, d, batch, seed=10 + i, dtype=dtype).to(device)
                out.append((corr, x, torch.tensor(0.7), torch.zeros(*batch, d, device=device)))
    return out


def lower_symmetric(a):
    """The symmetric matrix whose lower triangle is a's (what eigh reads)."""
    return a.tril() + a.tril(-1).mT


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- corr_ema_
@pytest.mark.parametrize("args", sample_inputs(), ids=lambda a: f"{tuple(a[1].shape)}-{a[1].dtype}")
def test_corr_ema_matches_reference(args):
    corr, x, weight, mean = args
    ref_corr, ref_mean = corr.clone(), mean.clone()
    reference.corr_ema_(ref_corr, x, 0.7, ref_mean)
    out = csrc.corr_ema_(corr, x, 0.7, mean)
    assert out is corr
    assert rel_err(corr, ref_corr) < 1e-5
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(corr, corr.mT, rtol=0, atol=0)  # exactly symmetric


@pytest.mark.parametrize("weight", [0.3, torch.tensor(0.3), torch.tensor(0.3, dtype=torch.float64)])
def test_corr_ema_weight_as_float_or_tensor(weight):
    corr, x = correlation(9), features(20, 9)
    ref = corr.clone()
    reference.corr_ema_(ref, x, 0.3)
    csrc.corr_ema_(corr, x, weight)
    assert rel_err(corr, ref) < 1e-6


@pytest.mark.parametrize("weight", [1.0, torch.tensor(1.0)])
def test_first_update_overwrites_nan(weight):
    d = 6
    corr, mean, x = torch.full((d, d), float("nan")), torch.full((d,), float("nan")), features(11, d)
    csrc.corr_ema_(corr, x, weight, mean)
    torch.testing.assert_close(corr, x.mT @ x / 11)
    torch.testing.assert_close(mean, x.mean(0))


def test_corr_ema_weight_zero_keeps_corr():
    corr, x = correlation(5), features(4, 5)
    before = corr.clone()
    csrc.corr_ema_(corr, x, 0.0)
    torch.testing.assert_close(corr, before, rtol=0, atol=0)


def test_corr_ema_rejects_bad_input_with_a_message():
    corr = torch.zeros(4, 4)
    with pytest.raises(RuntimeError, match="corr must be float32"):
        csrc.corr_ema_(corr.double(), torch.ones(3, 4), 0.5)
    with pytest.raises(RuntimeError, match=r"x must be \(\.\.\., N, d\)"):
        csrc.corr_ema_(corr, torch.ones(3, 5), 0.5)
    with pytest.raises(RuntimeError, match="N = 0"):
        csrc.corr_ema_(corr, torch.ones(0, 4), 0.5)
    with pytest.raises(RuntimeError, match="0-dim"):
        csrc.corr_ema_(corr, torch.ones(3, 4), torch.ones(2))


def test_corr_ema_bad_mean_is_rejected_before_corr_changes():
    corr, x = correlation(5), features(4, 5)
    before = corr.clone()
    with pytest.raises(RuntimeError, match="mean must be a float32 tensor of shape"):
        csrc.corr_ema_(corr, x, 0.5, torch.zeros(4))
    torch.testing.assert_close(corr, before, rtol=0, atol=0)


def test_corr_ema_non_contiguous_corr():
    big = correlation(10)
    corr = big.t()  # a transposed view: written through
    x = features(8, 10)
    ref = corr.clone()
    reference.corr_ema_(ref, x, 0.4)
    csrc.corr_ema_(corr, x, 0.4)
    assert rel_err(big.t(), ref) < 1e-6


# --------------------------------------------------------------------- eigh
@pytest.mark.parametrize("d, batch", [(1, ()), (2, ()), (7, ()), (129, ()), (200, ()), (1, (2, 3)), (7, (2, 3)),
                                      (129, (2,))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigh_matches_torch(d, batch, dtype):
    a = correlation(d, batch).to(dtype)
    s, u = csrc.eigh(a)
    ref_s, _ = torch.linalg.eigh(a)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert s.dtype == dtype and u.dtype == dtype
    assert rel_err(s, ref_s) < 10 * tol
    assert bool((s[..., 1:] >= s[..., :-1]).all())  # ascending
    recon = (u * s.unsqueeze(-2)) @ u.mT
    assert rel_err(recon, lower_symmetric(a)) < 100 * tol
    eye = torch.eye(d, dtype=dtype).expand_as(u)
    assert (u.mT @ u - eye).abs().max().item() < 100 * tol
    assert u.stride()[-2:] == torch.linalg.eigh(a)[1].stride()[-2:]  # column-major, as torch


def test_eigh_reads_the_lower_triangle_only():
    a = correlation(11)
    s, u = csrc.eigh(torch.tril(a) + torch.triu(torch.full_like(a, 9.0), 1))
    torch.testing.assert_close(s, torch.linalg.eigh(a)[0], rtol=1e-5, atol=1e-5)


def test_eigh_empty_and_rejects_non_square():
    s, u = csrc.eigh(torch.zeros(0, 0))
    assert s.shape == (0,) and u.shape == (0, 0)
    with pytest.raises(RuntimeError, match=r"\(\.\.\., n, n\)"):
        csrc.eigh(torch.zeros(3, 4))


# ------------------------------------------------------------------ rebuild
@pytest.mark.parametrize("d", [1, 7, 129, 200, 256])
@pytest.mark.parametrize("mapping", MAPS, ids=lambda m: f"{m.eps_mode}-p{m.power}-eps{m.eps}-min{m.min_eig}")
def test_rebuild_matches_reference(d, mapping):
    s, u = torch.linalg.eigh(correlation(d))
    s = s - 0.01 * s.max()  # a few negative eigenvalues: the clamp at 0 shows
    got = csrc.rebuild(s, u, mapping)
    want = reference.rebuild(s, u, mapping)
    assert rel_err(got, want) < 2e-5
    torch.testing.assert_close(got, got.mT, rtol=0, atol=0)
    assert got.is_contiguous()


@pytest.mark.parametrize("layout", ["column-major", "row-major", "strided"])
def test_rebuild_any_eigenvector_layout_and_batch(layout):
    d, batch = 9, (2, 3)
    s, u = torch.linalg.eigh(correlation(d, batch))
    if layout == "row-major":
        u = u.contiguous()
    elif layout == "strided":
        u = torch.cat([u, u], dim=-1)[..., ::2]
    for mapping in MAPS:
        torch.testing.assert_close(csrc.rebuild(s, u, mapping), reference.rebuild(s, u, mapping),
                                   rtol=1e-5, atol=1e-5)


def test_rebuild_float64_and_zero_matrix():
    s, u = torch.linalg.eigh(correlation(6).double())
    torch.testing.assert_close(csrc.rebuild(s, u, MAPS[0]), reference.rebuild(s, u, MAPS[0]))
    zero_s, zero_u = torch.zeros(5), torch.eye(5)
    torch.testing.assert_close(csrc.rebuild(zero_s, zero_u, EigMap(0.1, 0.5, "relative")), 0.1 * torch.eye(5))
    torch.testing.assert_close(csrc.rebuild(zero_s, zero_u, EigMap(0.1, 0.5, "absolute")), torch.zeros(5, 5))


def test_rebuild_rejects_bad_arguments():
    """At the operator, which direct callers reach with scalars."""
    s, u = torch.ones(4), torch.eye(4)
    with pytest.raises(RuntimeError, match="eps_mode must be 'relative' or 'absolute'"):
        ops.rebuild(s, u, 0.1, 0.5, "scaled", 1e-4)
    with pytest.raises(RuntimeError, match=r"s must be \(\.\.\., d\)"):
        ops.rebuild(torch.ones(3), u, 0.1, 0.5, "relative", 1e-4)
    with pytest.raises(RuntimeError, match="float32 or both float64"):
        ops.rebuild(s.double(), u, 0.1, 0.5, "relative", 1e-4)


# ------------------------------------------------- through the dispatch point
def test_functional_with_backend_csrc_matches_torch():
    d = 33
    x = features(70, d)
    corr_c, corr_t = torch.zeros(d, d), torch.zeros(d, d)
    for first in (True, False):
        functional.corr_ema_(corr_c, x, 0.3, first=first, backend="csrc")
        functional.corr_ema_(corr_t, x, 0.3, first=first, backend="torch")
    assert rel_err(corr_c, corr_t) < 1e-6
    w_c = functional.directpred_weight(corr_c, backend="csrc")
    w_t = functional.directpred_weight(corr_t, backend="torch")
    assert rel_err(w_c, w_t) < 1e-4


# ------------------------------------------------------- opcheck and compile
def _opcheck_cases():
    corr, x, weight, mean = sample_inputs()[3]  # (7, 3) features, batch (3,)
    s, u = torch.linalg.eigh(correlation(7, (2,)))
    return {
        "corr_ema_": (ops.corr_ema_.default, (corr, x, weight, mean)),
        "corr_ema_no_mean": (ops.corr_ema_.default, (correlation(5), features(4, 5), torch.tensor(1.0), None)),
        "eigh": (ops.eigh.default, (correlation(7, (2,)),)),
        "rebuild": (ops.rebuild.default, (s, u, 0.1, 0.5, "relative", 1e-4)),
        "rebuild_general": (ops.rebuild.default, (s, u, 0.3, 0.7, "relative", -1.0)),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_torch_compile_full_graph():
    d = 12
    x = features(40, d)

    def update(corr, x):
        csrc.corr_ema_(corr, x, 0.7)
        s, u = csrc.eigh(corr)
        return csrc.rebuild(s, u, EigMap())

    compiled = torch.compile(update, fullgraph=True, backend="aot_eager")
    c_eager, c_compiled = correlation(d), correlation(d)
    want = update(c_eager, x)
    got = compiled(c_compiled, x)
    torch.testing.assert_close(c_compiled, c_eager)
    torch.testing.assert_close(got, want)


# -------------------------------------------------------------- the build
def _cuda_toolkit():
    """The nvcc setup.py would find (CUDA_HOME, /usr/local/cuda, PATH), or None."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def test_cuda_sources_compiled_and_linked():
    """Fails (does not skip) when a toolkit is here but _C lacks its CUDA kernels."""
    if os.environ.get("FASTPRED_NO_CUDA") == "1" or torch.version.cuda is None or _cuda_toolkit() is None:
        pytest.skip("no CUDA toolkit (or FASTPRED_NO_CUDA=1): the extension is C++-only by design")
    assert _C.built_with_cuda(), (
        f"a CUDA toolkit is present ({_cuda_toolkit()}) but fastpred._C was built without its CUDA sources; "
        "rebuild: pip install -e . --no-build-isolation (see setup.py)")
    for op in ("corr_ema_", "rebuild", "syevd_", "syevd_batched_", "syevd_workspace_size"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastpred::{op}", "CUDA"), op
    # The libraries are linked and load: these call into libcusolver without a GPU.
    version = _C.cusolver_version()
    assert version >= 11000, version
    assert _C.has_syevd_batched() == (version >= 11701)


def test_cpu_kernels_use_lapack_directly():
    # torch's x86 wheels export sgemm_/ssyevd_ (MKL); without them the ops still
    # work through ATen, but slower: flag it here rather than silently.
    if torch.backends.mkl.is_available():
        assert _C.has_native_lapack()
    for op in ("corr_ema_", "eigh", "rebuild"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastpred::{op}", "CPU"), op


def test_runs_on_cpu_and_refuses_cuda_without_a_gpu():
    """Behaviour, not a restatement of supports(): the CPU backend resolves and computes;
    the extension's account of its CUDA build matches its operator registrations; on a
    machine without a GPU, asking for it on CUDA is refused with a message saying so."""
    from fastpred import backends

    impl = backends._resolve("csrc", torch.device("cpu"))
    x = torch.randn(5, 3)
    torch.testing.assert_close(impl.corr_ema_(torch.zeros(3, 3), x, 1.0), x.T @ x / 5)
    has_cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key("fastpred::corr_ema_", "CUDA")
    assert _C.built_with_cuda() == has_cuda_kernels
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="does not run on device cuda"):
            backends._resolve("csrc", torch.device("cuda"))
