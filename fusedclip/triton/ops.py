"""Launchers and operators of backend "triton": ``torch.ops.fusedclip_triton.*``.

The four operators have the schemas and semantics of the C++ library's (csrc/fusedclip.cpp), in
their own namespace so that they never clash with kernels registered for ``fusedclip::``.

A call builds (or finds in a cache) one device table of int64 describing every chunk of every
tensor (kernels.py's module docstring), then launches one kernel per dtype present: the norm
of 10,000 float32 tensors is one launch, plus one for the per-tensor statistics when asked. The
fused clip is one norm launch and one scale launch per dtype, with the coefficient passed from
one to the other in device memory: no host sync anywhere.

Tables depend only on each tensor's address, numel, dtype and whether it is dense in memory, so
the operands of a list seen before on the same stream (the same grads every step) come from a
small cache: no checks, no table built, no host-to-device copy; the key is made in C++
(fusedclip._C.triton_table_key) in ~20 ns a tensor. A tensor that fills its memory exactly once
(contiguous, channels_last, transposed) is one flat span of it: every op here is elementwise
and order-free. Truly strided tensors (t[::2]) and complex tensors read for a norm (|z| is a
temporary) go through temporaries, built per call; in-place ops write a strided tensor's
contiguous copy and copy it back (the same bits when nothing was scaled).

A CUDA graph captured on a list used before (the warm-up) reads that list's cached table; one
never used before gets its table built during capture (copied at each replay from a pinned host
buffer); either way the graph's tables are kept for the process's life, never freed by an
eviction.

The operators are defined with ``torch.library.Library`` (one kernel for every device, fake
kernels for torch.compile and opcheck, and an ADInplaceOrView kernel that bumps the written
tensors' version counters in one call), not as triton_ops: a triton_op's body must be
traceable with fake tensors (that is how torch.compile sees its kernels), and a table of raw
addresses cannot be built from fake tensors, which have none. With fake kernels,
torch.compile(fullgraph=True) puts them in its graph as single nodes, as it does the C++
operators. (``torch.library.custom_op`` would bump version counters one tensor at a time in
Python: ~0.35 ms at 1,000 tensors.)
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

from fusedclip import fakes, numerics

try:
    from fusedclip._C import triton_table_key as _c_table_key
except (ImportError, OSError):  # the C++ extension is not built: keys are made in Python (slower)
    _c_table_key = None
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


_EPS_BITS = _bits(numerics.CLIP_EPS)


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
    host_copy: Optional[Tensor] = None  # the pinned source of the copy, kept while it may run


@dataclasses.dataclass
class _Operands:
    """What a call runs its kernels on: a table of spans (one per tensor) and what it needs."""

    table: _Table
    out: torch.dtype  # the call's statistic and norm dtype: float64 when any tensor is float64
    shares_memory: bool  # two tensors overlap: in-place ops must run them one by one
    has_complex: bool
    # The tensors with each truly strided one replaced by its dense copy (complex stays complex);
    # None when none is strided (cached operands hold no tensor).
    dense: Optional[list[Tensor]]
    write_back: list[tuple[Tensor, Tensor]]  # (strided original, dense copy) to copy back
    temporaries: list[Tensor]  # what the table points into besides the tensors (kept alive)


def _build_table(spans: list[tuple[int, int, torch.dtype]], device: torch.device) -> _Table:
    """The table of spans (address, numel, dtype): one per tensor, in order."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, (_, n, dtype) in enumerate(spans):
        if n:
            by_dtype.setdefault(dtype, []).append(i)
    addresses: list[int] = []
    lengths: list[int] = []
    first = [0] * len(spans)
    count = [0] * len(spans)
    launches = []
    for dtype, indices in by_dtype.items():
        launch_first = len(addresses)
        aligned = all(spans[i][0] % 16 == 0 for i in indices)
        size = dtype.itemsize
        for i in indices:
            base, n, _ = spans[i]
            first[i], count[i] = len(addresses), -(-n // CHUNK)
            addresses.extend(range(base, base + n * size, CHUNK * size))
            lengths.extend([CHUNK] * (count[i] - 1) + [n - (count[i] - 1) * CHUNK])
        launches.append(_Launch(dtype, launch_first, len(addresses) - launch_first, aligned))
    host = torch.tensor(addresses + lengths + first + count, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()  # a non-blocking copy, on the current stream (see _cache)
        table = host.to(device, non_blocking=True)
    else:
        table = host
    return _Table(table, len(addresses), len(spans), launches, host)


def _is_dense(t: Tensor) -> bool:
    """t's elements fill [data_ptr, data_ptr + numel) exactly once (contiguous, channels_last,
    transposed, ...): every op here is elementwise and order-free, so it is one flat span."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _extent(t: Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) of the memory a non-empty t's elements occupy (strides >= 0)."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _any_overlap(extents: list[tuple[int, int]]) -> bool:
    extents.sort()
    return any(a[1] > b[0] for a, b in zip(extents, extents[1:]))


def _prepare(tensors: list[Tensor], op: str, writes: bool, check: bool = True) -> _Operands:
    """Checks tensors (raising, before anything is written, on those the kernels do not take)
    and makes their operands in one pass: each real tensor that is dense in memory is a span of
    its own memory; a complex one is its real view to write, |z| (a temporary) to read; a truly
    strided one (t[::2]) is read through a contiguous copy, written through one copied back."""
    device = tensors[0].device
    if check:
        reason = device_supported(device)
        if reason is not None:
            raise RuntimeError(f"fusedclip_triton.{op}: {reason}")
        writes_to_inference = writes and not torch.is_inference_mode_enabled()
    spans, extents, dense, write_back, temporaries = [], [], [], [], []
    has_complex = has_float64 = False
    for i, t in enumerate(tensors):
        if check:
            if t.device != device:
                raise RuntimeError(
                    f"fusedclip_triton.{op}: all tensors must be on one device, but tensor 0 is on "
                    f"{device} and tensor {i} on {t.device}"
                )
            if t.layout != torch.strided:
                raise RuntimeError(f"fusedclip_triton.{op}: tensor {i} has layout {t.layout}; only "
                                   "dense (strided) tensors are supported")
            if t.dtype not in _SUPPORTED_DTYPES:
                raise RuntimeError(f"fusedclip_triton.{op}: tensor {i} has dtype {t.dtype}; "
                                   "expected float32, float64, float16, bfloat16 or complex")
            if writes_to_inference and t.is_inference():
                raise RuntimeError(
                    f"fusedclip_triton.{op}: tensor {i} is an inference tensor, which cannot be "
                    "modified in place outside torch.inference_mode()"
                )
        dtype = t.dtype
        has_float64 = has_float64 or dtype in numerics.FLOAT64_DTYPES
        if t.is_contiguous() or _is_dense(t):
            if writes:
                extents.append((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()))
        else:
            if writes and torch._debug_has_internal_overlap(t) == 1:
                raise RuntimeError(
                    f"fusedclip_triton.{op}: tensor {i} has internally overlapping memory (an "
                    "expanded tensor) and cannot be modified in place; clone it first"
                )
            if writes:
                # Checked on the original: a grad and a strided view of it overlap, copy or not.
                extents.append(_extent(t))
            copy = t.contiguous()
            if writes:
                write_back.append((t, copy))
            else:
                temporaries.append(copy)
            t = copy
        dense.append(t)
        if dtype.is_complex:
            has_complex = True
            if writes:
                t = torch.view_as_real(t)
            else:
                t = t.abs()
                temporaries.append(t)
        spans.append((t.data_ptr(), t.numel(), t.dtype))
    shares_memory = writes and len(tensors) > 1 and _any_overlap([e for e in extents if e[0] != e[1]])
    return _Operands(
        _build_table(spans, device), torch.float64 if has_float64 else torch.float32, shares_memory,
        has_complex, dense if write_back or temporaries else None, write_back, temporaries,
    )


def _key(tensors: list[Tensor], writes: bool) -> Optional[tuple]:
    """What decides a list's operands: each tensor's address, numel, dtype, whether it is dense
    in memory (a dense tensor is one span whatever its strides; a list with one that is not is
    never cached) and whether it is an inference tensor; the device and inference mode. None
    when some tensor has no address (not strided): _prepare then says why it is refused.

    A hit stands for the checks too: a tensor's address fixes its device (CUDA's unified
    addressing gives host and every device disjoint ranges), and the rest is in the key."""
    if _c_table_key is not None:
        items = _c_table_key(tensors)  # ~20 ns a tensor
        if items is None:
            return None
    else:
        try:
            items = tuple([(t.data_ptr(), t.numel(), t.dtype, t.is_contiguous() or _is_dense(t),
                            t.is_inference()) for t in tensors])
        except RuntimeError:
            return None
    return tensors[0].device, writes, torch.is_inference_mode_enabled(), items


_CACHE_SIZE = 16
# (stream, _key) -> operands. A table is copied on the current stream and used only on it, so
# every kernel reading it is ordered after its copy, and once evicted the caching allocator
# reuses its memory in that stream's order.
_cache: "collections.OrderedDict[tuple, _Operands]" = collections.OrderedDict()
# Operands a captured CUDA graph reads: never freed (an eviction from the cache drops only the
# cache's reference), as the graph reads their tables at every replay.
_captured: list[_Operands] = []


def _operands(tensors: list[Tensor], op: str, writes: bool) -> _Operands:
    """_prepare's operands, from the cache when the list was seen before on this stream (the
    same grads every step) and needs no copies or temporaries: no checks, no table built, no
    host-to-device copy.

    While the current stream captures a CUDA graph, the cached operands of the list are used
    whatever stream made them (torch.cuda.graph synchronizes the device before capture, so
    their copy is done), and kept in ``_captured`` for the graph. Without any (the list was
    never used eagerly, or needs copies) they are built during capture: the graph then copies
    the table from a pinned host buffer at each replay, kept alive with them, and they are not
    cached (the device table holds its bytes only once the graph has run)."""
    device = tensors[0].device
    key = _key(tensors, writes)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        operands = next((o for (_, k), o in _cache.items() if k == key), None) if key else None
        if operands is None:
            operands = _prepare(tensors, op, writes)
        _captured.append(operands)
        return operands
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    operands = _cache.get((stream, key)) if key is not None else None
    if operands is not None:
        _cache.move_to_end((stream, key))
        return operands
    operands = _prepare(tensors, op, writes)
    if key is not None and not operands.write_back and not operands.temporaries:
        _cache[(stream, key)] = operands
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return operands


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
    operands: _Operands, device: torch.device, norm_type: float, per_tensor: bool,
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
        _launch(
            kernels.norm_chunks, device, launch.n_chunks,
            table.table, table.n_chunks, launch.first_chunk, partials, ticket,
            _bits(norm_type), statistic, total, coef,
            _bits(max_norm if max_norm is not None else 0.0), _EPS_BITS,
            DTYPE=_TRITON_DTYPES[launch.dtype], ACC=_accumulate(launch.dtype),
            OUT=_TRITON_DTYPES[out], KIND=kind, FINISH=max_norm is not None,
            ALIGNED=launch.aligned, BLOCK=BLOCK, FINAL_BLOCK=FINAL_BLOCK,
        )
    if per_tensor:
        _launch(
            kernels.per_tensor, device, table.n_tensors,
            table.table, table.n_chunks, table.n_tensors, partials, per,
            KIND=kind, ACC=_TRITON_DTYPES[out], BLOCK=FINAL_BLOCK,
        )
    # Temporaries are freed when the caller drops operands: kernels are stream-ordered, so the
    # caching allocator reuses their memory safely after.
    return statistic, per, total, coef


def _transform(tensors: list[Tensor], op: str, kernel, *args, operands: Optional[_Operands] = None) -> None:
    """Runs an in-place kernel (scale or clamp) over every chunk of tensors (write operands:
    _operands(tensors, op, writes=True) unless given), then copies the dense copies of strided
    tensors back. Tensors sharing memory run one at a time in list order, so shared bytes change
    once per tensor, as in torch.

    A copy back writes the values the kernel left in the copy: when the scale kernel writes
    nothing (coef >= 1), the same bits as before go back (memory written, values unchanged)."""
    device = tensors[0].device
    if operands is None:
        operands = _operands(tensors, op, writes=True)
    if operands.shares_memory:
        for t in tensors:
            _transform([t], op, kernel, *args)
        return
    table = operands.table
    for launch in table.launches:
        _launch(
            kernel, device, launch.n_chunks,
            table.table, table.n_chunks, launch.first_chunk, *args,
            DTYPE=_TRITON_DTYPES[launch.dtype], ACC=_accumulate(launch.dtype),
            ALIGNED=launch.aligned, BLOCK=BLOCK,
        )
    for original, dense in operands.write_back:
        original.copy_(dense)


def _check_norm_type(norm_type: float) -> None:
    if math.isnan(norm_type):
        raise RuntimeError("fusedclip_triton: norm_type must not be nan")


# --- operators --------------------------------------------------------------------------------------

_library = torch.library.Library("fusedclip_triton", "DEF")


def _operator(schema: str, mutates: bool = False):
    """Defines ``fusedclip_triton::<schema>`` with the decorated function as its kernel for every
    device, and returns the operator. An in-place operator (its first argument the list it
    writes) bumps the version counters of that list in one call before running: what a
    ``custom_op`` does one tensor at a time in Python (~0.35 ms at 1,000 tensors)."""

    def define(kernel):
        name = schema.split("(")[0]
        _library.define(schema)
        _library.impl(name, kernel, "CompositeExplicitAutograd")
        op = getattr(torch.ops.fusedclip_triton, name)
        if mutates:
            below = torch._C._after_ADInplaceOrView_keyset

            def bump_versions(keyset, tensors, *args):
                torch._C._increment_version(tensors)
                return op.default.redispatch(keyset & below, tensors, *args)

            _library.impl(name, bump_versions, "ADInplaceOrView", with_keyset=True)
        return op

    return define


@_operator("multi_tensor_norm(Tensor[] tensors, float norm_type, bool per_tensor=False) -> (Tensor, Tensor)")
def multi_tensor_norm(
    tensors: list[Tensor], norm_type: float, per_tensor: bool = False
) -> tuple[Tensor, Tensor]:
    r"""The statistic of the p-norm before its root over all tensors as one vector
    (:math:`\sum |x|^p`, :math:`\max |x|`, :math:`\min |x|` or the count of nonzeros), in
    float32 (float64 when any tensor is float64), and per tensor when ``per_tensor``."""
    _check_norm_type(norm_type)
    if not tensors:
        identity = numerics.statistic_identity(norm_type)
        return torch.tensor(identity), torch.empty(0)
    operands = _operands(tensors, "multi_tensor_norm", writes=False)
    statistic, per, _, _ = _norm(operands, tensors[0].device, norm_type, per_tensor, None)
    return statistic, per


@_operator("multi_tensor_scale_(Tensor(a!)[] tensors, Tensor coef) -> ()", mutates=True)
def multi_tensor_scale_(tensors: list[Tensor], coef: Tensor) -> None:
    """tensors *= coef in place, in float32 (float64 for float64 tensors), rounded once; coef is
    read on the device, and nothing is written when coef >= 1."""
    if coef.numel() != 1 or not coef.is_floating_point():
        raise RuntimeError("fusedclip_triton.multi_tensor_scale_: coef must be a one-element float "
                           f"tensor, got shape {tuple(coef.shape)} and dtype {coef.dtype}")
    if not tensors:
        return
    operands = _operands(tensors, "multi_tensor_scale_", writes=True)
    if coef.device != tensors[0].device:
        raise RuntimeError(f"fusedclip_triton.multi_tensor_scale_: coef is on {coef.device}, the "
                           f"tensors on {tensors[0].device}")
    _transform(tensors, "multi_tensor_scale_", kernels.scale_chunks, coef, operands=operands)


@_operator("multi_tensor_clamp_(Tensor(a!)[] tensors, float min, float max) -> ()", mutates=True)
def multi_tensor_clamp_(tensors: list[Tensor], min: float, max: float) -> None:  # noqa: A002
    """tensors = min(max(tensors, min), max) in place, one pass; nan stays nan."""
    if not tensors:
        return
    operands = _operands(tensors, "multi_tensor_clamp_", writes=True)
    if operands.has_complex:
        i = next(i for i, t in enumerate(tensors) if t.is_complex())
        raise RuntimeError(f"fusedclip_triton.multi_tensor_clamp_: tensor {i} is complex; "
                           "clamping is not defined for complex values")
    _transform(tensors, "multi_tensor_clamp_", kernels.clamp_chunks, _bits(min), _bits(max),
               operands=operands)


@_operator("clip_grad_norm_(Tensor(a!)[] tensors, float max_norm, float norm_type) -> Tensor", mutates=True)
def clip_grad_norm_(tensors: list[Tensor], max_norm: float, norm_type: float) -> Tensor:
    """Norm, coefficient min(max_norm / (norm + 1e-6), 1) and scale, in one norm launch and one
    scale launch per dtype, with no host sync; returns the norm."""
    _check_norm_type(norm_type)
    if not tensors:
        return torch.tensor(0.0)
    operands = _operands(tensors, "clip_grad_norm_", writes=True)
    # The norm reads what the scale writes (strided grads copied once); complex grads are read
    # as |z|, temporaries of their own.
    read = operands
    if operands.has_complex:
        dense = tensors if operands.dense is None else operands.dense
        read = _prepare(dense, "clip_grad_norm_", writes=False, check=False)
    _, _, total, coef = _norm(read, tensors[0].device, norm_type, False, max_norm)
    _transform(tensors, "clip_grad_norm_", kernels.scale_chunks, coef, operands=operands)
    return total


# --- fake kernels: shapes and dtypes, for torch.compile and opcheck -------------------------------


fakes.register("fusedclip_triton", ("multi_tensor_norm", "multi_tensor_scale_", "multi_tensor_clamp_",
                                    "clip_grad_norm_"))
