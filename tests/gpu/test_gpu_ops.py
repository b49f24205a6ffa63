"""csrc's CUDA operators against the torch reference (needs a GPU; skipped here).

The CUDA variants of tests/test_csrc_ops.py: corr_ema_ with a device weight (no host
read), a CPU weight, the NaN-overwriting first update and the mean EMA; rebuild in
every eigenvalue-map mode; opcheck and torch.compile on CUDA tensors.
"""
import pytest
import torch

from fastpred.eig_map import EigMap

pytestmark = pytest.mark.gpu

SIZES = [(1, 1), (7, 3), (33, 77), (129, 512), (200, 33), (256, 512), (1000, 2000)]  # (d, N)
MAPS = [EigMap(0.1, 0.5, "relative", 1e-4), EigMap(0.1, 0.5, "absolute", 1e-4), EigMap(0.0, 1.0, "relative", 1e-4),
        EigMap(0.3, 0.7, "relative", -1.0)]


@pytest.fixture(scope="module")
def csrc():
    from fastpred.backends import csrc

    if not csrc.built_with_cuda():
        pytest.fail("fastpred._C was built without CUDA: rebuild with a CUDA toolkit (see setup.py)")
    error = csrc._C.cuda_kernel_image_error()
    if error:
        cap = torch.cuda.get_device_capability()
        pytest.fail(f"fastpred._C has no kernels for this GPU ({error}): rebuild with "
                    f"TORCH_CUDA_ARCH_LIST={cap[0]}.{cap[1]}")
    return csrc


def features(n, d, batch=(), dtype=torch.float32, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mix = torch.randn(d, d, device="cuda", generator=g) / d**0.5 + torch.eye(d, device="cuda")
    return (torch.randn(*batch, n, d, device="cuda", generator=g) @ mix + 0.2).to(dtype)


def correlation(d, batch=(), seed=1):
    x = features(2 * d + 3, d, batch, seed=seed)
    return x.mT @ x / x.shape[-2]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("d, n", SIZES)
@pytest.mark.parametrize("batch", [(), (3,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_on", ["cuda", "cpu", "float"])
def test_corr_ema_cuda_matches_reference(csrc, d, n, batch, dtype, weight_on):
    from fastpred.backends import reference

    if batch and d > 256:
        pytest.skip("large stacks: covered by the single-matrix case")
    corr, x = correlation(d, batch), features(n, d, batch, dtype)
    mean = torch.zeros(*batch, d, device="cuda")
    weight = {"cuda": torch.tensor(0.7, device="cuda"), "cpu": torch.tensor(0.7), "float": 0.7}[weight_on]
    ref_corr, ref_mean = corr.clone(), mean.clone()
    reference.corr_ema_(ref_corr, x, 0.7, ref_mean)
    csrc.corr_ema_(corr, x, weight, mean)
    assert rel_err(corr, ref_corr) < 1e-5
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(corr, corr.mT, rtol=0, atol=0)


@pytest.mark.parametrize("batch", [(), (2,)])
def test_corr_ema_cuda_first_update_overwrites_nan(csrc, batch):
    d = 40
    corr = torch.full((*batch, d, d), float("nan"), device="cuda")
    mean = torch.full((*batch, d), float("nan"), device="cuda")
    x = features(50, d, batch)
    csrc.corr_ema_(corr, x, torch.tensor(1.0, device="cuda"), mean)
    torch.testing.assert_close(corr, x.mT @ x / 50, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, x.mean(-2))


@pytest.mark.parametrize("d", [1, 7, 33, 129, 256, 1000])
@pytest.mark.parametrize("batch", [(), (4,)])
@pytest.mark.parametrize("mapping", MAPS, ids=lambda m: f"{m.eps_mode}-p{m.power}-min{m.min_eig}")
def test_rebuild_cuda_matches_reference(csrc, d, batch, mapping):
    from fastpred.backends import reference

    if batch and d > 256:
        pytest.skip("large stacks: covered by the single-matrix case")
    s, u = torch.linalg.eigh(correlation(d, batch))
    s = s - 0.01 * s.amax(-1, keepdim=True)
    got = csrc.rebuild(s, u, mapping)
    assert rel_err(got, reference.rebuild(s, u, mapping)) < 2e-5
    torch.testing.assert_close(got, got.mT, rtol=0, atol=0)


def test_rebuild_cuda_float64_and_row_major_u(csrc):
    from fastpred.backends import reference

    s, u = torch.linalg.eigh(correlation(50).double())
    for uu in (u, u.contiguous()):
        torch.testing.assert_close(csrc.rebuild(s, uu, MAPS[0]), reference.rebuild(s, uu, MAPS[0]))


def test_opcheck_cuda(csrc):
    ops = torch.ops.fastpred
    s, u = torch.linalg.eigh(correlation(9, (2,)))
    cases = [
        (ops.corr_ema_.default, (correlation(9), features(5, 9), torch.tensor(0.4, device="cuda"),
                                 torch.zeros(9, device="cuda"))),
        (ops.corr_ema_.default, (correlation(9, (2,)), features(5, 9, (2,)), torch.tensor(0.4), None)),
        (ops.rebuild.default, (s, u, 0.1, 0.5, "relative", 1e-4)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_cuda(csrc):
    def update(corr, x, w):
        csrc.corr_ema_(corr, x, w)
        s, u = torch.linalg.eigh(corr)
        return csrc.rebuild(s, u, EigMap())

    x, w = features(40, 16), torch.tensor(0.7, device="cuda")
    c1, c2 = correlation(16), correlation(16)
    want = update(c1, x, w)
    got = torch.compile(update, fullgraph=True)(c2, x, w)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_batch_beyond_grid_z_limit(csrc):
    """More than 65535 matrices: the triangle kernels launch in chunks of gridDim.z."""
    from fastpred.backends import reference

    batch, d, n = 70_000, 2, 3
    x = features(n, d, (batch,))
    corr, expected = torch.zeros(batch, d, d, device="cuda"), torch.zeros(batch, d, d, device="cuda")
    csrc.corr_ema_(corr, x, 1.0)
    reference.corr_ema_(expected, x, 1.0)
    torch.testing.assert_close(corr, expected, rtol=1e-5, atol=1e-5)
    s, u = torch.linalg.eigh(expected)
    torch.testing.assert_close(csrc.rebuild(s, u, EigMap()), reference.rebuild(s, u, EigMap()), rtol=1e-4, atol=1e-5)


def test_triton_offsets_beyond_int32_for_a_transposed_x():
    """x stored column-major (stride_xd = N) with d * N > 2**31: int64 offsets along X."""
    from fastpred.backends import reference
    from fastpred.backends import triton as tb

    d, n = 1024, 2**21 + 16  # d * n > 2**31; 4 GiB in bf16
    storage = torch.randn(d, n, device="cuda", dtype=torch.bfloat16)
    x = storage.T  # (n, d), stride (1, n)
    corr, expected = torch.zeros(d, d, device="cuda"), torch.zeros(d, d, device="cuda")
    tb.corr_ema_(corr, x, 1.0)
    reference.corr_ema_(expected, x, 1.0)
    torch.testing.assert_close(corr, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_launches_on_the_tensors_device():
    from fastpred.backends import reference
    from fastpred.backends import triton as tb

    x = torch.randn(64, 40, device="cuda:1")
    corr, expected = torch.zeros(40, 40, device="cuda:1"), torch.zeros(40, 40, device="cuda:1")
    with torch.cuda.device(0):
        tb.corr_ema_(corr, x, 1.0)
        w = tb.rebuild(*torch.linalg.eigh(corr), EigMap())
    reference.corr_ema_(expected, x, 1.0)
    torch.testing.assert_close(corr, expected, rtol=1e-5, atol=1e-5)
    assert w.device == torch.device("cuda:1") and torch.isfinite(w).all()
