"""What ``backend="auto"`` runs on a CUDA device for the statistics and the rebuild.

The rule (no GPU measurement yet, so by construction): fp32 products at the default
"highest" matmul precision are FMA work, left to cuBLAS (the reference); where tensor
cores apply (fp16/bf16 features, or TF32 allowed) the Triton kernels. Resolved for a
CUDA device without one: the steps are spies, so nothing runs on a GPU.
"""
import pytest
import torch

pytest.importorskip("triton")

from fastpred import backends  # noqa: E402
from fastpred.backends import reference  # noqa: E402
from fastpred.backends import triton as triton_backend  # noqa: E402
from fastpred.eig_map import EigMap  # noqa: E402


@pytest.fixture
def ran(monkeypatch):
    calls = []
    for module, label in ((triton_backend, "triton"), (reference, "torch")):
        for step in ("gram", "corr_ema_", "rebuild"):
            monkeypatch.setattr(module, step, lambda *a, _l=label, _s=step, **k: calls.append((_s, _l)))
    return calls


@pytest.fixture
def precision():
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


def run_steps(x_dtype):
    impl = backends._resolve("auto", torch.device("cuda"))
    x = torch.zeros(4, 3, dtype=x_dtype)
    impl.gram(x)
    impl.corr_ema_(torch.zeros(3, 3), x, 0.5, None)
    impl.rebuild(torch.zeros(3), torch.eye(3), EigMap())


def test_fp32_at_highest_precision_goes_to_cublas(ran, precision):
    precision("highest")
    run_steps(torch.float32)
    assert ran == [("gram", "torch"), ("corr_ema_", "torch"), ("rebuild", "torch")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_features_go_to_the_tensor_core_kernels(ran, precision, dtype):
    precision("highest")
    run_steps(dtype)
    assert ran == [("gram", "triton"), ("corr_ema_", "triton"), ("rebuild", "torch")]  # U is fp32


def test_tf32_allowed_sends_everything_to_the_kernels(ran, precision):
    precision("high")  # what torch.backends.cuda.matmul.allow_tf32 = True sets
    run_steps(torch.float32)
    assert ran == [("gram", "triton"), ("corr_ema_", "triton"), ("rebuild", "triton")]
