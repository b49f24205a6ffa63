"""Triton kernels against the torch reference on a CUDA GPU (does nothing useful on CPU).

    .venv/bin/python -m bench.bench_triton            # default sizes
    .venv/bin/python -m bench.bench_triton --batch 8  # several predictors at once

Times come from ``triton.testing.do_bench`` (CUDA events, median). Rates use the
work each kernel must do, written out here so that they can be checked:

- correlation EMA, ``B`` matrices, ``x`` of ``N x d`` with ``e`` bytes per element:
  useful FLOPs ``= B * N * d * (d + 1)`` (the lower triangle of X^T X, 2 per
  multiply-add; the reference's GEMM does ``2 B N d^2``), minimum bytes
  ``= B * (N d e + 4 d (d + 1) / 2 + 4 d^2)`` (read X, read the lower triangle of
  F, write F).
- rebuild, ``B`` matrices of ``d x d``: useful FLOPs ``= B * d^2 * (d + 1)`` (each
  lower-triangle entry is a length-d dot product), minimum bytes
  ``= B * (4 d + 4 d^2 + 4 d^2)`` (read s and U, write W).
"""
from __future__ import annotations

import argparse

import torch

from fastpred.backends import reference
from fastpred.eig_map import EigMap

PAPER_MAP = EigMap()  # eps 0.1, power 0.5, relative, min_eig 1e-4

SIZES = ((128, 256), (256, 512), (1024, 2048), (4096, 4096))  # (d, N)


def corr_rates(batch: int, d: int, n: int, elem_bytes: int, ms: float) -> tuple[float, float]:
    """(TFLOP/s, GB/s) of one correlation EMA that took ``ms`` milliseconds."""
    flops = batch * n * d * (d + 1)
    bytes_ = batch * (n * d * elem_bytes + 4 * d * (d + 1) // 2 + 4 * d * d)
    return flops / ms / 1e9, bytes_ / ms / 1e6


def rebuild_rates(batch: int, d: int, ms: float) -> tuple[float, float]:
    """(TFLOP/s, GB/s) of one rebuild that took ``ms`` milliseconds."""
    flops = batch * d * d * (d + 1)
    bytes_ = batch * (4 * d + 8 * d * d)
    return flops / ms / 1e9, bytes_ / ms / 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1, help="matrices per launch")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton: no CUDA GPU here; nothing to measure.")
        return

    import triton.testing

    from fastpred.backends import triton as tb

    dtype = getattr(torch, args.dtype)
    elem = torch.finfo(dtype).bits // 8
    b = args.batch
    print(f"{torch.cuda.get_device_name()}  batch={b}  x dtype={args.dtype}  "
          f"fp32 matmul precision={torch.get_float32_matmul_precision()}")
    header = f"{'step':8} {'d':>5} {'N':>5} {'impl':9} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8}"
    print(header)
    for d, n in SIZES:
        x = torch.randn(b, n, d, device="cuda").to(dtype)
        corr = torch.eye(d, device="cuda").expand(b, d, d).contiguous()
        w = torch.tensor(0.3, device="cuda")
        for name, fn in (("triton", tb.corr_ema_), ("torch", reference.corr_ema_)):
            ms = triton.testing.do_bench(lambda fn=fn: fn(corr, x, w))
            tflops, gbs = corr_rates(b, d, n, elem, ms)
            print(f"{'corr':8} {d:5} {n:5} {name:9} {ms:9.4f} {tflops:8.2f} {gbs:8.1f}")
        s, u = torch.linalg.eigh(corr + torch.eye(d, device="cuda"))
        for name, fn in (("triton", tb.rebuild), ("torch", reference.rebuild)):
            ms = triton.testing.do_bench(lambda fn=fn: fn(s, u, PAPER_MAP))
            tflops, gbs = rebuild_rates(b, d, ms)
            print(f"{'rebuild':8} {d:5} {'':5} {name:9} {ms:9.4f} {tflops:8.2f} {gbs:8.1f}")


if __name__ == "__main__":
    main()
