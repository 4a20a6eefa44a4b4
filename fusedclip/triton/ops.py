"""Launchers and operators of backend "triton": ``torch.ops.fusedclip_triton.*``.

The four operators have the schemas and semantics of the C++ library's (csrc/fusedclip.cpp), in
their own namespace so that they never clash with kernels registered for ``fusedclip::``.

A call builds (or finds in a cache) one device table of int64 describing every chunk of every
tensor (kernels.py's module docstring), then launches one kernel per dtype present: the norm
of 10,000 float32 tensors is one launch, plus one for the per-tensor statistics when asked. The
fused clip is one norm launch and one scale launch per dtype, with the coefficient passed from
one to the other in device memory: no host sync anywhere.

Tables depend only on each tensor's (address, numel, dtype), so the table of a list seen before
(the same grads every step) is reused from a small cache and costs no host-to-device copy.
Tensors that are not contiguous, and complex tensors read for a norm (|z| is a temporary), go
through temporaries; their tables are built per call. In-place ops on non-contiguous tensors
write a contiguous copy and copy it back, as the CPU backend does.

The operators are ``torch.library.custom_op``\\ s, not ``triton_op``\\ s: a triton_op's body
must be traceable with fake tensors (that is how torch.compile sees its kernels), and a table
of raw addresses cannot be built from fake tensors, which have none. As custom ops with fake
kernels, torch.compile(fullgraph=True) puts them in its graph as single nodes, as it does the
C++ operators.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import struct
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedclip import reference
from fusedclip.triton import kernels

__all__ = ["INTERPRETED", "device_supported", "multi_tensor_norm", "multi_tensor_scale_", "multi_tensor_clamp_", "clip_grad_norm_"]

# Elements per chunk (one program): 64 KB of float32, a few hundred cycles of memory traffic per
# program on a GPU; small enough that a 1B-element model is ~60K programs for every SM to share.
CHUNK = 16384
BLOCK = 2048  # elements per step of a program's loop
FINAL_BLOCK = 1024  # lanes of the last program's reduction of the partials
NUM_WARPS = 8  # GPU only

_TRITON_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}
_SUPPORTED_DTYPES = (*_TRITON_DTYPES, torch.complex64, torch.complex128)
_EPS_BITS = struct.unpack("<q", struct.pack("<d", 1e-6))[0]

# True in a process started with TRITON_INTERPRET=1: the kernels then run in Triton's
# interpreter, which reads the tables' addresses as host memory, so they take CPU tensors only.
INTERPRETED = not isinstance(kernels.norm_chunks, triton.runtime.JITFunction)


def device_supported(device: torch.device) -> Optional[str]:
    """None when the kernels can run on tensors of ``device``, else why not."""
    if INTERPRETED:
        if device.type != "cpu":
            return f"Triton's interpreter (TRITON_INTERPRET=1) runs CPU tensors only, not {device}"
    elif device.type != "cuda":
        return (f"the Triton kernels run CUDA tensors (CPU tensors only in a process started with "
                f"TRITON_INTERPRET=1), not {device}")
    return None


def _bits(value: float) -> int:
    """The float64 bits of value as a signed int64 (kernels bitcast them back)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _kind(norm_type: float) -> int:
    if norm_type == 2.0:
        return kernels.SQUARE_SUM.value
    if norm_type == 1.0:
        return kernels.ABS_SUM.value
    if norm_type == 0.0:
        return kernels.COUNT.value
    if norm_type == math.inf:
        return kernels.MAX.value
    if norm_type == -math.inf:
        return kernels.MIN.value
    return kernels.POWER_SUM.value


def _accumulate(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# --- tables ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Launch:
    """The chunks of one dtype: [first_chunk, first_chunk + n_chunks) of the table."""

    dtype: torch.dtype
    first_chunk: int
    n_chunks: int
    aligned: bool  # every chunk starts on 16 bytes (the kernels then vectorize)


@dataclasses.dataclass
class _Table:
    table: Tensor  # int64 on the tensors' device (kernels.py's module docstring)
    n_chunks: int
    n_tensors: int
    launches: list[_Launch]
    shares_memory: bool  # two tensors overlap: in-place ops must run them one by one
    host_copy: Optional[Tensor] = None  # the pinned source of the copy, kept while it may run


def _build_table(views: list[Tensor], device: torch.device) -> _Table:
    """The table of contiguous real tensors (one per original tensor, in order)."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, v in enumerate(views):
        if v.numel():
            by_dtype.setdefault(v.dtype, []).append(i)
    addresses: list[int] = []
    lengths: list[int] = []
    first = [0] * len(views)
    count = [0] * len(views)
    launches = []
    for dtype, indices in by_dtype.items():
        launch_first = len(addresses)
        aligned = all(views[i].data_ptr() % 16 == 0 for i in indices)
        for i in indices:
            v = views[i]
            base, size, n = v.data_ptr(), v.element_size(), v.numel()
            first[i], count[i] = len(addresses), -(-n // CHUNK)
            addresses.extend(range(base, base + n * size, CHUNK * size))
            lengths.extend([CHUNK] * (count[i] - 1) + [n - (count[i] - 1) * CHUNK])
        launches.append(_Launch(dtype, launch_first, len(addresses) - launch_first, aligned))
    host = torch.tensor(addresses + lengths + first + count, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
        table = host.to(device, non_blocking=True)  # no sync; the cache keeps `host` alive
    else:
        table = host
    return _Table(table, len(addresses), len(views), launches, _any_memory_shared(views), host)


def _any_memory_shared(views: list[Tensor]) -> bool:
    ranges = sorted(
        (v.data_ptr(), v.data_ptr() + v.numel() * v.element_size()) for v in views if v.numel()
    )
    return any(a[1] > b[0] for a, b in zip(ranges, ranges[1:]))


_CACHE_SIZE = 16
_cache: "collections.OrderedDict[tuple, _Table]" = collections.OrderedDict()


def _cached_table(tensors: list[Tensor], views: list[Tensor], write: bool) -> _Table:
    """The table of views (the tensors themselves, or their real view for complex writes), from
    the cache when these addresses, sizes and dtypes were seen before."""
    device = tensors[0].device
    key = (device, write, tuple((t.data_ptr(), t.numel(), t.dtype) for t in tensors))
    table = _cache.get(key)
    if table is None:
        table = _build_table(views, device)
        _cache[key] = table
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
    return table


def _read_table(tensors: list[Tensor]) -> tuple[_Table, list[Tensor]]:
    """The table for reading, and the temporaries it points into (kept alive by the caller)."""
    views = [t.abs() if t.is_complex() else t.contiguous() for t in tensors]
    if all(v is t for v, t in zip(views, tensors)):
        return _cached_table(tensors, views, write=False), []
    return _build_table(views, tensors[0].device), views


def _write_table(tensors: list[Tensor]) -> tuple[_Table, list[tuple[Tensor, Tensor]]]:
    """The table for in-place writes, and the (original, contiguous copy) pairs to copy back."""
    views, write_back = [], []
    for t in tensors:
        real = torch.view_as_real(t) if t.is_complex() else t
        if not real.is_contiguous():
            dense = real.contiguous()
            write_back.append((real, dense))
            real = dense
        views.append(real)
    if not write_back:
        return _cached_table(tensors, views, write=True), []
    return _build_table(views, tensors[0].device), write_back


# --- launchers ------------------------------------------------------------------------------------


def _launch(kernel, device: torch.device, grid: int, *args, **constexprs) -> None:
    if INTERPRETED:
        # numpy warns where a GPU silently gives IEEE results (log2(0) = -inf, 0 * inf = nan)
        import numpy  # the interpreter's own dependency

        with numpy.errstate(all="ignore"):
            kernel[(grid,)](*args, **constexprs)
    else:
        with torch.cuda.device(device):
            kernel[(grid,)](*args, **constexprs, num_warps=NUM_WARPS)


def _norm(
    tensors: list[Tensor], norm_type: float, per_tensor: bool, max_norm: Optional[float]
) -> tuple[Tensor, Tensor, Tensor, Tensor, Optional[_Table]]:
    """(statistic, per-tensor statistics, total norm, coefficient, table); the norm and the
    coefficient only when max_norm is given (else unwritten); the table when it points into the
    tensors themselves (no temporaries), so that an in-place pass can use it too."""
    device = tensors[0].device
    acc = reference.accumulate_dtype(tensors)
    kind = _kind(norm_type)
    table, temporaries = _read_table(tensors)
    statistic = torch.empty((), dtype=acc, device=device)
    total = torch.empty((), dtype=acc, device=device)
    coef = torch.empty((), dtype=acc, device=device)
    per = torch.empty((len(tensors) if per_tensor else 0,), dtype=acc, device=device)
    identity = reference.statistic_identity(norm_type)
    if table.n_chunks == 0:  # no elements: the identity, and the norm of nothing is 0
        statistic.fill_(identity)
        per.fill_(identity)
        total.zero_()
        coef.copy_(reference.clip_coefficient(total, 0.0 if max_norm is None else max_norm))
        return statistic, per, total, coef, None
    partials = torch.empty((table.n_chunks,), dtype=torch.float64, device=device)
    ticket = torch.zeros((1,), dtype=torch.int32, device=device)
    for launch in table.launches:
        _launch(
            kernels.norm_chunks, device, launch.n_chunks,
            table.table, table.n_chunks, launch.first_chunk, partials, ticket,
            _bits(norm_type), statistic, total, coef,
            _bits(max_norm if max_norm is not None else 0.0), _EPS_BITS,
            DTYPE=_TRITON_DTYPES[launch.dtype], ACC=_accumulate(acc), KIND=kind,
            FINISH=max_norm is not None, ALIGNED=launch.aligned, BLOCK=BLOCK,
            FINAL_BLOCK=FINAL_BLOCK,
        )
    if per_tensor:
        _launch(
            kernels.per_tensor, device, len(tensors),
            table.table, table.n_chunks, len(tensors), partials, per,
            KIND=kind, ACC=_accumulate(acc), BLOCK=FINAL_BLOCK,
        )
    direct = not temporaries
    del temporaries  # kernels are stream-ordered: the caching allocator reuses them safely after
    return statistic, per, total, coef, table if direct else None


def _transform(tensors: list[Tensor], kernel, *args, table: Optional[_Table] = None) -> None:
    """Runs an in-place kernel (scale or clamp) over every chunk of tensors (through ``table``
    when given: a read table without temporaries); tensors sharing memory run one at a time in
    list order, so shared bytes change once per tensor, as in torch."""
    device = tensors[0].device
    if table is None:
        table, write_back = _write_table(tensors)
    else:
        write_back = []
    if table.shares_memory and len(tensors) > 1:
        for t in tensors:
            _transform([t], kernel, *args)
        return
    for launch in table.launches:
        _launch(
            kernel, device, launch.n_chunks,
            table.table, table.n_chunks, launch.first_chunk, *args,
            DTYPE=_TRITON_DTYPES[launch.dtype], ACC=_accumulate(launch.dtype),
            ALIGNED=launch.aligned, BLOCK=BLOCK,
        )
    for original, dense in write_back:
        original.copy_(dense)


def _scale(tensors: list[Tensor], coef: Tensor, table: Optional[_Table] = None) -> None:
    _transform(tensors, kernels.scale_chunks, coef, table=table)


# --- argument checks ------------------------------------------------------------------------------


def _check(tensors: list[Tensor], op: str, writes: bool) -> None:
    """Raises, before anything is written, on tensors the kernels do not take."""
    device = tensors[0].device
    reason = device_supported(device)
    if reason is not None:
        raise RuntimeError(f"fusedclip_triton.{op}: {reason}")
    for i, t in enumerate(tensors):
        if t.device != device:
            raise RuntimeError(
                f"fusedclip_triton.{op}: all tensors must be on one device, but tensor 0 is on "
                f"{device} and tensor {i} on {t.device}"
            )
        if t.layout != torch.strided:
            raise RuntimeError(f"fusedclip_triton.{op}: tensor {i} has layout {t.layout}; only "
                               "dense (strided) tensors are supported")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise RuntimeError(f"fusedclip_triton.{op}: tensor {i} has dtype {t.dtype}; expected "
                               "float32, float64, float16, bfloat16 or complex")
        if writes:
            if torch._debug_has_internal_overlap(t) == 1:
                raise RuntimeError(
                    f"fusedclip_triton.{op}: tensor {i} has internally overlapping memory (an "
                    "expanded tensor) and cannot be modified in place; clone it first"
                )
            if t.is_inference() and not torch.is_inference_mode_enabled():
                raise RuntimeError(
                    f"fusedclip_triton.{op}: tensor {i} is an inference tensor, which cannot be "
                    "modified in place outside torch.inference_mode()"
                )


def _check_norm_type(norm_type: float) -> None:
    if math.isnan(norm_type):
        raise RuntimeError("fusedclip_triton: norm_type must not be nan")


# --- operators --------------------------------------------------------------------------------------


@torch.library.custom_op(
    "fusedclip_triton::multi_tensor_norm",
    mutates_args=(),
    schema="(Tensor[] tensors, float norm_type, bool per_tensor=False) -> (Tensor, Tensor)",
)
def multi_tensor_norm(
    tensors: list[Tensor], norm_type: float, per_tensor: bool = False
) -> tuple[Tensor, Tensor]:
    r"""The statistic of the p-norm before its root over all tensors as one vector
    (:math:`\sum |x|^p`, :math:`\max |x|`, :math:`\min |x|` or the count of nonzeros), in
    float32 (float64 when any tensor is float64), and per tensor when ``per_tensor``."""
    _check_norm_type(norm_type)
    if not tensors:
        identity = reference.statistic_identity(norm_type)
        return torch.tensor(identity), torch.empty(0)
    _check(tensors, "multi_tensor_norm", writes=False)
    statistic, per, _, _, _ = _norm(tensors, norm_type, per_tensor, None)
    return statistic, per


@torch.library.custom_op(
    "fusedclip_triton::multi_tensor_scale_",
    mutates_args=("tensors",),
    schema="(Tensor(a!)[] tensors, Tensor coef) -> ()",
)
def multi_tensor_scale_(tensors: list[Tensor], coef: Tensor) -> None:
    """tensors *= coef in place, in float32 (float64 for float64 tensors), rounded once; coef is
    read on the device, and nothing is written when coef >= 1."""
    if coef.numel() != 1 or not coef.is_floating_point():
        raise RuntimeError("fusedclip_triton.multi_tensor_scale_: coef must be a one-element float "
                           f"tensor, got shape {tuple(coef.shape)} and dtype {coef.dtype}")
    if not tensors:
        return
    _check(tensors, "multi_tensor_scale_", writes=True)
    if coef.device != tensors[0].device:
        raise RuntimeError(f"fusedclip_triton.multi_tensor_scale_: coef is on {coef.device}, the "
                           f"tensors on {tensors[0].device}")
    _scale(tensors, coef)


@torch.library.custom_op(
    "fusedclip_triton::multi_tensor_clamp_",
    mutates_args=("tensors",),
    schema="(Tensor(a!)[] tensors, float min, float max) -> ()",
)
def multi_tensor_clamp_(tensors: list[Tensor], min: float, max: float) -> None:  # noqa: A002
    """tensors = min(max(tensors, min), max) in place, one pass; nan stays nan."""
    if not tensors:
        return
    _check(tensors, "multi_tensor_clamp_", writes=True)
    for i, t in enumerate(tensors):
        if t.is_complex():
            raise RuntimeError(f"fusedclip_triton.multi_tensor_clamp_: tensor {i} is complex; "
                               "clamping is not defined for complex values")
    _transform(tensors, kernels.clamp_chunks, _bits(min), _bits(max))


@torch.library.custom_op(
    "fusedclip_triton::clip_grad_norm_",
    mutates_args=("tensors",),
    schema="(Tensor(a!)[] tensors, float max_norm, float norm_type) -> Tensor",
)
def clip_grad_norm_(tensors: list[Tensor], max_norm: float, norm_type: float) -> Tensor:
    """Norm, coefficient min(max_norm / (norm + 1e-6), 1) and scale, in one norm launch and one
    scale launch per dtype, with no host sync; returns the norm."""
    _check_norm_type(norm_type)
    if not tensors:
        return torch.tensor(0.0)
    _check(tensors, "clip_grad_norm_", writes=True)
    _, _, total, coef, table = _norm(tensors, norm_type, False, max_norm)
    _scale(tensors, coef, table)
    return total


# --- fake kernels: shapes and dtypes, for torch.compile and opcheck -------------------------------


@multi_tensor_norm.register_fake
def _(tensors, norm_type, per_tensor=False):
    acc = reference.accumulate_dtype(tensors)
    count = len(tensors) if per_tensor else 0
    return tensors[0].new_empty((), dtype=acc), tensors[0].new_empty((count,), dtype=acc)


@multi_tensor_scale_.register_fake
def _(tensors, coef):
    return None


@multi_tensor_clamp_.register_fake
def _(tensors, min, max):  # noqa: A002
    return None


@clip_grad_norm_.register_fake
def _(tensors, max_norm, norm_type):
    return tensors[0].new_empty((), dtype=reference.accumulate_dtype(tensors))
