"""The launches of backend "triton" that several operators share: the norm (one launch per
dtype, the last program of the last launch finishing the total, the coefficient and found_inf in
device memory; one more for per-tensor statistics) and the in-place transforms (scale, clamp: one
launch per dtype), and run_kernel, through which every launch goes. An operator's own launches
(AGC's, GradientMonitor's update) are in its function in ops.py. No host sync anywhere.
"""

from __future__ import annotations

import struct
from typing import NamedTuple, Optional

import torch
import triton.language as tl
from torch import Tensor

from fusedclip import numerics
from fusedclip.triton import kernels
from fusedclip.triton.tables import INTERPRETED, TRITON_DTYPES, Operands, operands_of

BLOCK = 2048  # elements per step of a program's loop
FINAL_BLOCK = 1024  # lanes of the reductions of partials
NUM_WARPS = 8  # GPU only


def bits(value: float) -> int:
    """The float64 bits of value as a signed int64 (kernels bitcast them back)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


EPS_BITS = bits(numerics.CLIP_EPS)


def accumulate(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def run_kernel(kernel, device: torch.device, grid: int, *args, **constexprs) -> None:
    """kernel[(grid,)](*args, **constexprs); options such as enable_fp_fusion are for the
    compiler only (the interpreter ignores them)."""
    if INTERPRETED:
        # numpy warns where a GPU silently gives IEEE results (log2(0) = -inf, 0 * inf = nan)
        import numpy  # the interpreter's own dependency

        with numpy.errstate(all="ignore"):
            kernel[(grid,)](*args, **constexprs)
    else:
        with torch.cuda.device(device):
            kernel[(grid,)](*args, **constexprs, num_warps=NUM_WARPS)


class NormResults(NamedTuple):
    statistic: Tensor
    per: Tensor  # per-tensor statistics (norms with roots=True); empty unless asked
    total: Tensor  # the norm (with max_norm)
    coef: Tensor  # the clip coefficient (with max_norm)
    found_inf: Optional[Tensor]  # float32 1. when any element is inf or nan (with inv_scale)


def norm(
    operands: Operands, device: torch.device, norm_type: float, per_tensor: bool,
    max_norm: Optional[float], inv_scale: Optional[Tensor] = None, roots: bool = False,
) -> NormResults:
    """The statistic of a read operands' tensors; per tensor when asked (their norms with
    roots); the norm and the coefficient only when max_norm is given (else unwritten); with
    inv_scale, the statistic of the tensors times inv_scale and found_inf."""
    table, out = operands.table, operands.out
    kind = numerics.norm_kind(norm_type).value
    statistic = torch.empty((), dtype=out, device=device)
    total = torch.empty((), dtype=out, device=device)
    coef = torch.empty((), dtype=out, device=device)
    found_inf = None if inv_scale is None else torch.empty((), dtype=torch.float32, device=device)
    per = torch.empty((table.n_tensors if per_tensor else 0,), dtype=out, device=device)
    if table.n_chunks == 0:  # no elements: the identity, and the norm of nothing is 0
        identity = numerics.statistic_identity(norm_type)
        statistic.fill_(identity)
        per.fill_(0.0 if roots else identity)
        total.zero_()
        coef.copy_(numerics.clip_coefficient(total, 0.0 if max_norm is None else max_norm))
        if found_inf is not None:
            found_inf.zero_()
        return NormResults(statistic, per, total, coef, found_inf)
    partials = torch.empty((table.n_chunks,), dtype=torch.float64, device=device)
    ticket = torch.zeros((2,), dtype=torch.int32, device=device)  # [finished programs, found]
    for launch in table.launches:
        run_kernel(
            kernels.norm_chunks, device, launch.n_chunks,
            table.table, table.n_chunks, launch.first_chunk, partials, ticket,
            bits(norm_type), statistic, total, coef,
            bits(max_norm if max_norm is not None else 0.0), EPS_BITS,
            statistic if inv_scale is None else inv_scale, statistic if found_inf is None else found_inf,
            DTYPE=TRITON_DTYPES[launch.dtype], ACC=accumulate(launch.dtype),
            OUT=TRITON_DTYPES[out], KIND=kind, FINISH=max_norm is not None, UNSCALE=inv_scale is not None,
            ALIGNED=launch.aligned, BLOCK=BLOCK, FINAL_BLOCK=FINAL_BLOCK,
        )
    if per_tensor:
        run_kernel(
            kernels.per_tensor, device, table.n_tensors,
            table.table, 3 * table.n_chunks, table.n_tensors, partials, table.n_chunks, per, statistic,
            bits(norm_type), KIND=kind, ACC=TRITON_DTYPES[out], ROOT=roots, TOTAL=False, BLOCK=FINAL_BLOCK,
        )
    # Temporaries are freed when the caller drops operands: kernels are stream-ordered, so the
    # caching allocator reuses their memory safely after.
    return NormResults(statistic, per, total, coef, found_inf)


def transform(tensors: list[Tensor], op: str, kernel, *args, operands: Optional[Operands] = None,
              args_of=None, **constexprs) -> None:
    """Runs an in-place kernel (scale or clamp) over every chunk of tensors (write operands:
    operands_of(tensors, op, writes=True) unless given), then copies the dense copies of strided
    tensors back. Tensors sharing memory run one at a time in list order, so shared bytes change
    once per tensor, as in torch; args_of(i) are then tensor i's arguments (args by default).

    A copy back writes the values the kernel left in the copy: when the scale kernel writes
    nothing (coef >= 1), the same bits as before go back (memory written, values unchanged)."""
    device = tensors[0].device
    if operands is None:
        operands = operands_of(tensors, op, writes=True)
    if operands.shares_memory:
        for i, t in enumerate(tensors):
            transform([t], op, kernel, *(args if args_of is None else args_of(i)), **constexprs)
        return
    table = operands.table
    for launch in table.launches:
        run_kernel(
            kernel, device, launch.n_chunks,
            table.table, table.n_chunks, launch.first_chunk, *args,
            DTYPE=TRITON_DTYPES[launch.dtype], ACC=accumulate(launch.dtype),
            ALIGNED=launch.aligned, BLOCK=BLOCK, **constexprs,
        )
    for original, dense in operands.write_back:
        original.copy_(dense)
