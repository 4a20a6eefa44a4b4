"""The launchers of backend "triton": the norm (one launch per dtype, the last program of the
last launch finishing the total and the coefficient in device memory) and the in-place
transforms (scale, clamp: one launch per dtype). No host sync anywhere.
"""

from __future__ import annotations

import struct
from typing import Optional

import torch
import triton.language as tl
from torch import Tensor

from fusedclip import numerics
from fusedclip.triton import kernels
from fusedclip.triton.tables import INTERPRETED, TRITON_DTYPES, Operands, operands_of

BLOCK = 2048  # elements per step of a program's loop
FINAL_BLOCK = 1024  # lanes of the last program's reduction of the partials
NUM_WARPS = 8  # GPU only


def bits(value: float) -> int:
    """The float64 bits of value as a signed int64 (kernels bitcast them back)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


EPS_BITS = bits(numerics.CLIP_EPS)


def accumulate(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def run_kernel(kernel, device: torch.device, grid: int, *args, **constexprs) -> None:
    if INTERPRETED:
        # numpy warns where a GPU silently gives IEEE results (log2(0) = -inf, 0 * inf = nan)
        import numpy  # the interpreter's own dependency

        with numpy.errstate(all="ignore"):
            kernel[(grid,)](*args, **constexprs)
    else:
        with torch.cuda.device(device):
            kernel[(grid,)](*args, **constexprs, num_warps=NUM_WARPS)


def norm(
    operands: Operands, device: torch.device, norm_type: float, per_tensor: bool,
    max_norm: Optional[float],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(statistic, per-tensor statistics, total norm, coefficient) of a read operands' tensors;
    the norm and the coefficient only when max_norm is given (else unwritten)."""
    table, out = operands.table, operands.out
    kind = numerics.norm_kind(norm_type).value
    statistic = torch.empty((), dtype=out, device=device)
    total = torch.empty((), dtype=out, device=device)
    coef = torch.empty((), dtype=out, device=device)
    per = torch.empty((table.n_tensors if per_tensor else 0,), dtype=out, device=device)
    if table.n_chunks == 0:  # no elements: the identity, and the norm of nothing is 0
        identity = numerics.statistic_identity(norm_type)
        statistic.fill_(identity)
        per.fill_(identity)
        total.zero_()
        coef.copy_(numerics.clip_coefficient(total, 0.0 if max_norm is None else max_norm))
        return statistic, per, total, coef
    partials = torch.empty((table.n_chunks,), dtype=torch.float64, device=device)
    ticket = torch.zeros((1,), dtype=torch.int32, device=device)
    for launch in table.launches:
        run_kernel(
            kernels.norm_chunks, device, launch.n_chunks,
            table.table, table.n_chunks, launch.first_chunk, partials, ticket,
            bits(norm_type), statistic, total, coef,
            bits(max_norm if max_norm is not None else 0.0), EPS_BITS,
            DTYPE=TRITON_DTYPES[launch.dtype], ACC=accumulate(launch.dtype),
            OUT=TRITON_DTYPES[out], KIND=kind, FINISH=max_norm is not None,
            ALIGNED=launch.aligned, BLOCK=BLOCK, FINAL_BLOCK=FINAL_BLOCK,
        )
    if per_tensor:
        run_kernel(
            kernels.per_tensor, device, table.n_tensors,
            table.table, table.n_chunks, table.n_tensors, partials, per,
            KIND=kind, ACC=TRITON_DTYPES[out], BLOCK=FINAL_BLOCK,
        )
    # Temporaries are freed when the caller drops operands: kernels are stream-ordered, so the
    # caching allocator reuses their memory safely after.
    return statistic, per, total, coef


def transform(tensors: list[Tensor], op: str, kernel, *args, operands: Optional[Operands] = None) -> None:
    """Runs an in-place kernel (scale or clamp) over every chunk of tensors (write operands:
    operands_of(tensors, op, writes=True) unless given), then copies the dense copies of strided
    tensors back. Tensors sharing memory run one at a time in list order, so shared bytes change
    once per tensor, as in torch.

    A copy back writes the values the kernel left in the copy: when the scale kernel writes
    nothing (coef >= 1), the same bits as before go back (memory written, values unchanged)."""
    device = tensors[0].device
    if operands is None:
        operands = operands_of(tensors, op, writes=True)
    if operands.shares_memory:
        for t in tensors:
            transform([t], op, kernel, *args)
        return
    table = operands.table
    for launch in table.launches:
        run_kernel(
            kernel, device, launch.n_chunks,
            table.table, table.n_chunks, launch.first_chunk, *args,
            DTYPE=TRITON_DTYPES[launch.dtype], ACC=accumulate(launch.dtype),
            ALIGNED=launch.aligned, BLOCK=BLOCK,
        )
    for original, dense in operands.write_back:
        original.copy_(dense)


