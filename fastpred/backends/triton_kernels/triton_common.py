"""What the two Triton kernels share: launch configurations, the lower-triangle tile
grid, the mirrored store, limits, the dot precision and the operator registration.

:mod:`fastpred.backends.triton_kernels.triton_corr` (Eq. 19) and :mod:`fastpred.backends.triton_kernels.triton_rebuild`
(Eq. 18) both compute a symmetric ``d x d`` result from the tiles of its lower
triangle and store each tile with its mirror image.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op
from triton.runtime.interpreter import InterpretedFunction


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration: a square output tile and the reduction block.

    Every size is a power of two >= 16 so that ``tl.dot`` compiles on GPUs (the
    interpreter would accept smaller blocks; a GPU does not).
    """

    block_d: int  # output tile is block_d x block_d
    block_k: int  # reduction chunk (rows of X, or eigenpairs for the rebuild)
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        for name in ("block_d", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps must be a power of two, got {self.num_warps}")


# A few fixed configurations, chosen by the matrix size (not autotuned: autotuning
# would re-run an in-place kernel, and is very slow under the interpreter). None
# spills more than 128 bytes of registers on sm_90 for any dtype or precision
# (tests/kernels/test_aot_sm90.py compiles them all with ptxas): a 128-wide tile
# with fp32 FMA ("ieee") accumulation needs more registers than a thread has.
# TODO(gpu): tune on a GPU with bench/bench_triton.py.
CONFIGS = {
    "small": TileConfig(block_d=32, block_k=32, num_warps=4, num_stages=2),
    "medium": TileConfig(block_d=64, block_k=32, num_warps=4, num_stages=3),
}


def pick_config(d: int) -> TileConfig:
    """The launch configuration for ``d x d`` outputs."""
    return CONFIGS["small"] if d <= 32 else CONFIGS["medium"]


def lower_tiles(d: int, block_d: int) -> int:
    """Number of tiles in the lower triangle (diagonal included) of a ``d x d`` grid."""
    t = triton.cdiv(d, block_d)
    return t * (t + 1) // 2


# CUDA caps grid axis 1 (the batch axis here) at 65535 programs.
MAX_BATCH = 65535
# Offsets inside one d x d matrix are int32 (batch offsets are int64).
MAX_DIM = 46340  # floor(sqrt(2**31 - 1))


def check_batch(batch: int) -> None:
    """Raise ValueError when the flattened batch does not fit the launch grid."""
    if batch > MAX_BATCH:
        raise ValueError(f"at most {MAX_BATCH} matrices per launch (grid axis 1), got a batch of {batch}")


def fp32_input_precision() -> str:
    """``tl.dot`` precision for fp32 operands, following torch's matmul setting."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def launch_device(t: Tensor):
    """A context that makes ``t``'s GPU current for a launch (Triton launches on the
    current device, not the tensors'). Nothing for CPU tensors (the interpreter) and
    fake ones (tracing records the launch; inductor's code guards the device itself)."""
    if t.is_cuda and not is_fake(t):
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def batched_view(t: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, bool]:
    """``t`` viewed as ``shape`` (batch dimensions merged), or a copy when no view exists.

    In-place outputs must be views of the caller's storage; when the batch
    dimensions do not merge into one stride, the caller computes into the copy and
    writes it back (the second item says which case this is).
    """
    try:
        return t.view(shape), True
    except RuntimeError:
        return t.reshape(shape).clone(), False


# ---------------------------------------------------------------------------
# Device functions
# ---------------------------------------------------------------------------


@triton.jit
def lower_tile_coords(tile):
    """Map a linear index over the lower triangle of the tile grid to ``(bi, bj)``, ``bj <= bi``.

    Row-major: tiles 0, 1, 2, 3, ... are (0,0), (1,0), (1,1), (2,0), ...
    ``bi`` is the largest integer with ``bi (bi + 1) / 2 <= tile``; the float
    square root is corrected by one step either way, so it is exact.
    """
    bi = ((tl.sqrt((8 * tile + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    bi = tl.where(bi * (bi + 1) // 2 > tile, bi - 1, bi)
    bi = tl.where((bi + 1) * (bi + 2) // 2 <= tile, bi + 1, bi)
    bj = tile - bi * (bi + 1) // 2
    return bi, bj


@triton.jit
def store_mirrored(out_ptr, rows, cols, value, d, stride_r, stride_c):
    """Store a lower-triangle tile and its mirror image; each element written once.

    ``value[i, j]`` goes to ``(rows[i], cols[j])`` where ``rows[i] >= cols[j]`` and to
    ``(cols[j], rows[i])`` where ``rows[i] > cols[j]``: a diagonal tile writes its
    lower half and the transpose of its strict lower half, an off-diagonal tile
    writes itself and its transpose.
    """
    in_range = (rows[:, None] < d) & (cols[None, :] < d)
    tl.store(
        out_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c,
        value,
        mask=in_range & (rows[:, None] >= cols[None, :]),
    )
    tl.store(
        out_ptr + rows[:, None] * stride_c + cols[None, :] * stride_r,
        value,
        mask=in_range & (rows[:, None] > cols[None, :]),
    )


# ---------------------------------------------------------------------------
# PyTorch operators (compose with torch.compile)
# ---------------------------------------------------------------------------

# True when TRITON_INTERPRET=1 was set before this module was imported: the
# kernels then run on CPU tensors through Triton's NumPy interpreter.
INTERPRETED = isinstance(lower_tile_coords, InterpretedFunction)


def define_op(name: str, mutates_args, fake: Callable):
    """Register ``fn`` as the operator ``name``: a ``triton_op`` on real GPUs.

    ``torch.library.triton_op`` lets ``torch.compile`` trace into the kernels
    (``fn`` is its own fake kernel: ``wrap_triton`` records the launch). Under the
    interpreter ``wrap_triton`` hands back the interpreted kernel, which would run on
    FakeTensors, so there the operator is an opaque ``custom_op`` with ``fake`` as
    its fake kernel instead: same schema, same eager behaviour.
    """

    def decorate(fn: Callable) -> Callable:
        if not INTERPRETED:
            return triton_op(name, fn, mutates_args=mutates_args)
        op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        op.register_fake(fake)
        return op

    return decorate
