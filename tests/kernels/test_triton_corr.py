"""The Triton correlation-EMA kernel against :mod:`fastpred.backends.reference`.

Runs on CPU tensors through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported when there is no GPU); the GPU
variants at the end are skipped here. The interpreter is slow, so the sizes are
a hand-picked subset of dim {1, 7, 129, 200, 256} x N {1, 3, 77, 512}.
"""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fastpred import functional  # noqa: E402
from fastpred.backends import reference, resolve  # noqa: E402
from fastpred.backends import triton as tb  # noqa: E402
from fastpred.backends.triton_kernels import triton_common  # noqa: E402
from fastpred.backends.triton_kernels.triton_common import TileConfig  # noqa: E402
from fastpred.backends.triton_kernels.triton_corr import corr_ema_launch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 results: the interpreter's tl.dot is an fp32 matmul, a GPU's is IEEE fp32
# ("highest" matmul precision, the default). TF32 needs the looser GPU_TF32 below.
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def gpu_dot_sizes(monkeypatch):
    """Make the interpreter reject tl.dot blocks smaller than 16, as GPUs do.

    The interpreter accepts any dot shape; with this, a kernel that passes here
    uses only dot shapes that compile on sm_80/sm_90.
    """
    if not triton_common.INTERPRETED:
        return
    from triton.runtime.interpreter import interpreter_builder

    monkeypatch.setitem(interpreter_builder.codegen_fns, "min_dot_size", lambda lhs, rhs: (16, 16, 16))


def spd(d, *batch, seed=0):
    """A symmetric positive semi-definite float32 (..., d, d), like a running F."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, d, d, generator=g)
    return (a @ a.mT / d).to(DEVICE)


def features(n, d, *batch, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*batch, n, d, generator=g) + 0.5).to(DEVICE, dtype)


def weight_of(kind, value):
    return torch.tensor(value, device=DEVICE) if kind == "tensor" else value


# (d, N, x dtype, weight kind, with mean): every d and N appears; fp16 and the
# tensor weight at several sizes. One 256 x 512 case: the interpreter's slowest.
CASES = [
    (1, 1, torch.float32, "float", True),
    (1, 77, torch.float16, "tensor", False),
    (7, 3, torch.float16, "float", True),
    (7, 512, torch.float32, "tensor", True),
    (129, 77, torch.float32, "float", False),
    (129, 1, torch.float16, "tensor", True),
    (200, 3, torch.float32, "tensor", True),
    (256, 512, torch.float32, "float", True),
    (256, 77, torch.float16, "tensor", False),
]


@pytest.mark.parametrize("d, n, dtype, weight_kind, with_mean", CASES)
def test_corr_ema_matches_reference(d, n, dtype, weight_kind, with_mean):
    corr = spd(d)
    x = features(n, d, dtype=dtype)
    mean = torch.randn(d, device=DEVICE) if with_mean else None
    expected = corr.clone()
    expected_mean = None if mean is None else mean.clone()
    reference.corr_ema_(expected, x, weight_of(weight_kind, 0.3), expected_mean)

    out = tb.corr_ema_(corr, x, weight_of(weight_kind, 0.3), mean)

    assert out is corr
    torch.testing.assert_close(corr, expected, **TOL)
    assert torch.equal(corr, corr.mT), "mirrored tiles must give an exactly symmetric F"
    if with_mean:
        torch.testing.assert_close(mean, expected_mean, **TOL)


@pytest.mark.parametrize("weight_kind", ["float", "tensor"])
@pytest.mark.parametrize("d, n", [(7, 3), (200, 77)])
def test_first_update_overwrites_nan(d, n, weight_kind):
    """weight == 1 sets F (and the mean) to the batch statistics; old NaNs are never read."""
    x = features(n, d)
    corr = torch.full((d, d), float("nan"), device=DEVICE)
    mean = torch.full((d,), float("nan"), device=DEVICE)

    tb.corr_ema_(corr, x, weight_of(weight_kind, 1.0), mean)

    torch.testing.assert_close(corr, reference.gram(x) / n, **TOL)
    torch.testing.assert_close(mean, x.mean(dim=-2), **TOL)
    assert torch.equal(corr, corr.mT)


def test_weight_zero_keeps_corr():
    corr = spd(129)
    before = corr.clone()
    tb.corr_ema_(corr, features(3, 129), 0.0)
    assert torch.equal(corr, before)


def test_bfloat16_equals_float32_upcast():
    """bf16 X: on a GPU a native bf16 dot with fp32 accumulation; under the
    interpreter (which cannot multiply bf16) each tile is widened to fp32 first.

    Products of bf16 numbers are exact in fp32, so the result must match the
    reference; under the interpreter it equals, bit for bit, the one from the same
    values given as fp32 (same fp32 products and sums).
    """
    d, n = 129, 77
    x16 = features(n, d, dtype=torch.bfloat16)
    corr_a, corr_b = spd(d), spd(d)
    mean_a, mean_b = torch.zeros(d, device=DEVICE), torch.zeros(d, device=DEVICE)

    tb.corr_ema_(corr_a, x16, 0.3, mean_a)
    tb.corr_ema_(corr_b, x16.float(), 0.3, mean_b)

    if DEVICE == "cpu":
        assert torch.equal(corr_a, corr_b)
        assert torch.equal(mean_a, mean_b)
    expected = spd(d)
    reference.corr_ema_(expected, x16, 0.3)
    torch.testing.assert_close(corr_a, expected, **TOL)


def test_batched_leading_dims():
    """(2, 3) predictors in one launch, tensor weight, mean; each matrix as the reference."""
    d, n = 7, 77
    corr = spd(d, 2, 3)
    x = features(n, d, 2, 3, dtype=torch.float16)
    mean = torch.randn(2, 3, d, device=DEVICE)
    expected, expected_mean = corr.clone(), mean.clone()
    w = torch.tensor(0.25, device=DEVICE)
    for i in range(2):
        for j in range(3):
            reference.corr_ema_(expected[i, j], x[i, j], w, expected_mean[i, j])

    tb.corr_ema_(corr, x, w, mean)

    torch.testing.assert_close(corr, expected, **TOL)
    torch.testing.assert_close(mean, expected_mean, **TOL)
    assert torch.equal(corr, corr.mT)


def test_batched_non_mergeable_layout_updates_in_place():
    """Batch dims that cannot be viewed as one: the update still lands in the caller's storage."""
    d, n = 129, 3
    storage = spd(d, 3, 2)
    corr = storage.transpose(0, 1)  # (2, 3, d, d) whose batch dims do not merge
    mean_storage = torch.randn(3, 2, d, device=DEVICE)
    mean = mean_storage.transpose(0, 1)
    x = features(n, d, 2, 3)
    expected = corr.clone().reshape(6, d, d)
    expected_mean = mean.clone().reshape(6, d)
    reference.corr_ema_(expected, x.reshape(6, n, d), 0.3, expected_mean)

    tb.corr_ema_(corr, x, 0.3, mean)

    torch.testing.assert_close(storage.transpose(0, 1).reshape(6, d, d), expected, **TOL)
    torch.testing.assert_close(mean_storage.transpose(0, 1).reshape(6, d), expected_mean, **TOL)


@pytest.mark.parametrize(
    "config",
    [TileConfig(16, 16, 4, 2), TileConfig(128, 32, 8, 3)],
    ids=["16x16-tiles", "128-wide"],
)
def test_other_tile_configs(config):
    """Many small tiles (9 x 9 grid, 45 programs) and one 128-wide config at d = 129.

    Every element matching the reference shows each is written (once, by construction).
    """
    d, n = 129, 77
    corr = torch.full((d, d), float("nan"), device=DEVICE)
    x = features(n, d)
    mean = torch.zeros(d, device=DEVICE)

    corr_ema_launch(corr, x, None, 1.0, mean, config=config)

    torch.testing.assert_close(corr, reference.gram(x) / n, **TOL)
    torch.testing.assert_close(mean, x.mean(dim=-2), **TOL)
    assert torch.equal(corr, corr.mT)


@pytest.mark.parametrize("d, n, dtype", [(1, 3, torch.float32), (200, 77, torch.float16)])
def test_gram_matches_reference(d, n, dtype):
    x = features(n, d, 2, dtype=dtype)
    g = tb.gram(x)
    assert g.dtype == torch.float32 and g.shape == (2, d, d)
    torch.testing.assert_close(g, reference.gram(x), rtol=1e-5, atol=1e-4)
    assert torch.equal(g, g.mT)


@triton.jit
def coords_kernel(out_ptr, SIZE: tl.constexpr):
    t = tl.arange(0, SIZE)
    bi, bj = triton_common.lower_tile_coords(t)
    tl.store(out_ptr + 2 * t, bi)
    tl.store(out_ptr + 2 * t + 1, bj)


def test_lower_tile_coords_exact():
    """The tile index -> (row, col) map covers the lower triangle once, up to 1024 x 1024 tiles."""

    if DEVICE != "cpu":
        pytest.skip("vector form checked under the interpreter; GPU runs the launch tests")
    size = 1 << 19  # 1024 * 1025 / 2 = 524800 tiles, just over half a million
    out = torch.empty(2 * size, dtype=torch.int32)
    coords_kernel[(1,)](out, SIZE=size)
    bi, bj = out.view(size, 2).long().unbind(-1)
    t = torch.arange(size)
    assert bool((bj >= 0).all() and (bj <= bi).all())
    assert torch.equal(bi * (bi + 1) // 2 + bj, t)


def test_tile_config_rejects_blocks_a_gpu_dot_cannot_take():
    """Whether the configurations the launchers pick compile for a GPU (block sizes,
    shared memory, registers) is checked by compiling them: tests/kernels/test_aot_sm90.py."""
    with pytest.raises(ValueError, match="block_d"):
        TileConfig(8, 32, 4, 2)
    with pytest.raises(ValueError, match="block_k"):
        TileConfig(32, 48, 4, 2)
    with pytest.raises(ValueError, match="num_warps"):
        TileConfig(32, 32, 3, 2)


@pytest.mark.parametrize(
    "make_args, error",
    [
        (lambda: (torch.zeros(7, 7), torch.zeros(3, 6), 0.3, None), ValueError),
        (lambda: (torch.zeros(7, 7, dtype=torch.float64), torch.zeros(3, 7), 0.3, None), TypeError),
        (lambda: (torch.zeros(7, 7), torch.zeros(3, 7, dtype=torch.int32), 0.3, None), TypeError),
        (lambda: (torch.zeros(7, 7), torch.zeros(0, 7), 0.3, None), ValueError),
        (lambda: (torch.zeros(7, 7), torch.zeros(3, 7), torch.tensor([0.3]), None), ValueError),
        (lambda: (torch.zeros(7, 7), torch.zeros(3, 7), 0.3, torch.zeros(6)), ValueError),
        (lambda: (torch.zeros(7, 7), torch.zeros(3, 7), "0.3", None), TypeError),
    ],
    ids=["d-mismatch", "corr-dtype", "x-dtype", "empty-batch", "weight-shape", "mean-shape", "weight-type"],
)
def test_bad_inputs_raise(make_args, error):
    corr, x, weight, mean = make_args()
    with pytest.raises(error):
        tb.corr_ema_(corr.to(DEVICE), x.to(DEVICE), weight, mean)


def test_dispatch_uses_triton_kernels():
    impl = resolve("triton", DEVICE)
    assert impl.corr_ema_ is tb.corr_ema_ and impl.gram is tb.gram
    assert impl.eigh is reference.eigh  # not provided here: left to the reference
    assert tb.supports(DEVICE) and not tb.supports("meta")
    d, n = 7, 77
    corr_a, corr_b = spd(d), spd(d)
    x = features(n, d)
    functional.corr_ema_(corr_a, x, 0.3, backend="triton")
    functional.corr_ema_(corr_b, x, 0.3, backend="torch")
    torch.testing.assert_close(corr_a, corr_b, **TOL)


def test_opcheck():
    """Schema (mutation of corr and mean declared), fake kernel and dispatch of the ops."""
    d, n = 7, 3
    x = features(n, d)
    for weight_tensor, weight in ((None, 0.3), (torch.tensor(0.3, device=DEVICE), 0.0)):
        args = (spd(d), x, weight_tensor, weight, torch.zeros(d, device=DEVICE))
        torch.library.opcheck(torch.ops.fastpred.triton_corr_ema_.default, args)
    torch.library.opcheck(torch.ops.fastpred.triton_gram.default, (x,))


def test_torch_compile_fullgraph():
    """The op composes with torch.compile: no graph break, same result as eager."""
    d, n = 7, 77

    def step(corr, x, w, mean):
        tb.corr_ema_(corr, x, w, mean)
        return corr.diagonal().sum() + mean.sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x = features(n, d)
    w = torch.tensor(0.3, device=DEVICE)
    corr_a, mean_a = spd(d), torch.zeros(d, device=DEVICE)
    corr_b, mean_b = spd(d), torch.zeros(d, device=DEVICE)
    out_a = compiled(corr_a, x, w, mean_a)
    out_b = step(corr_b, x, w, mean_b)
    torch.testing.assert_close(out_a, out_b, **TOL)
    torch.testing.assert_close(corr_a, corr_b, **TOL)
    torch.testing.assert_close(mean_a, mean_b, **TOL)


# The GPU registration traced without a GPU: kernels compiled for CUDA (no
# interpreter), fake CUDA tensors, AOT autograd's functionalization. The graph must
# hold the Triton kernels themselves (the triton_op decomposition inductor compiles),
# not an opaque call. Run in a subprocess: TRITON_INTERPRET is read at import.
_TRACE_GPU_OPS = """
import torch
from functorch.compile import aot_function
from torch._subclasses.fake_tensor import FakeTensorMode
from fastpred.backends.triton_kernels import triton_common, triton_corr, triton_rebuild
assert not triton_common.INTERPRETED
graphs = []
def keep(gm, _):
    graphs.append(gm.code)
    return gm
def update(corr, x, w, mean):
    torch.ops.fastpred.triton_corr_ema_(corr, x, w, 0.0, mean)
    return corr + 0, mean + 0
def rebuild(s, u):
    return torch.ops.fastpred.triton_rebuild(s, u, 0.1, 0.5, "relative", 1e-4)
with FakeTensorMode(allow_non_fake_inputs=True):
    cuda = dict(device="cuda")
    aot_function(update, fw_compiler=keep)(
        torch.empty(200, 200, **cuda), torch.empty(77, 200, dtype=torch.bfloat16, **cuda),
        torch.empty((), **cuda), torch.empty(200, **cuda))
    aot_function(rebuild, fw_compiler=keep)(torch.empty(200, **cuda), torch.empty(200, 200, **cuda))
for code in graphs:
    assert "triton_kernel_wrapper_functional" in code, code
assert "corr_ptr" in graphs[0] and "w_ptr" in graphs[1]
print("TRACED", len(graphs))
"""


def test_gpu_registration_traces_into_kernels_without_gpu():
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: test_gpu_inductor_compile compiles for real")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", _TRACE_GPU_OPS], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "TRACED 2" in done.stdout, done.stderr[-3000:]


# ---------------------------------------------------------------------------
# GPU only (skipped here): TF32, inductor, races
# ---------------------------------------------------------------------------

# TF32 rounds each operand to 10 mantissa bits: relative error ~1e-3 per product.
GPU_TF32 = dict(rtol=1e-2, atol=5e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["highest", "high"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_precision(precision, dtype):
    """IEEE fp32 by default; TF32 when torch's matmul precision allows it (fp32 X only)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        d, n = 1000, 4096
        corr, x = spd(d), features(n, d, dtype=dtype)
        expected = corr.clone()
        torch.set_float32_matmul_precision("highest")
        reference.corr_ema_(expected, x, 0.3)
        torch.set_float32_matmul_precision(precision)
        tb.corr_ema_(corr, x, 0.3)
        exact = precision == "highest" or dtype != torch.float32
        torch.testing.assert_close(corr, expected, **(TOL if exact else GPU_TF32))
    finally:
        torch.set_float32_matmul_precision(previous)


@pytest.mark.gpu
def test_gpu_deterministic_and_symmetric():
    """No races: repeated launches give identical bits; batched 4096-wide F stays symmetric."""
    d, n = 4096, 1024
    x = features(n, d, 2)
    first = spd(d, 2)
    second = first.clone()
    tb.corr_ema_(first, x, 0.3)
    tb.corr_ema_(second, x, 0.3)
    assert torch.equal(first, second)
    assert torch.equal(first, first.mT)


@pytest.mark.gpu
def test_gpu_inductor_compile():
    d, n = 256, 512
    x = features(n, d)
    w = torch.tensor(0.3, device=DEVICE)

    def step(corr, x, w):
        tb.corr_ema_(corr, x, w)
        return corr * 2

    corr_a, corr_b = spd(d), spd(d)
    torch.testing.assert_close(torch.compile(step, fullgraph=True)(corr_a, x, w), step(corr_b, x, w), **TOL)
