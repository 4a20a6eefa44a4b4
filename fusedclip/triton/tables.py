"""The operands of a Triton call: one device table describing every chunk of every tensor
(kernels.py's module docstring), and the cache of those tables.

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
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedclip import numerics

try:
    from fusedclip._C import triton_table_key as _c_table_key
except (ImportError, OSError):  # the C++ extension is not built: keys are made in Python (slower)
    _c_table_key = None
from fusedclip.triton import kernels

# Elements per chunk (one program): 64 KB of float32, a few hundred cycles of memory traffic per
# program on a GPU; small enough that a 1B-element model is ~60K programs for every SM to share.
CHUNK = 16384
TRITON_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}
SUPPORTED_DTYPES = (*TRITON_DTYPES, torch.complex64, torch.complex128)

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



@dataclasses.dataclass
class Launch:
    """The chunks of one dtype: [first_chunk, first_chunk + n_chunks) of the table."""

    dtype: torch.dtype
    first_chunk: int
    n_chunks: int
    aligned: bool  # every chunk starts on 16 bytes (the kernels then vectorize)


@dataclasses.dataclass
class Table:
    table: Tensor  # int64 on the tensors' device (kernels.py's module docstring)
    n_chunks: int
    n_tensors: int
    launches: list[Launch]
    host_copy: Optional[Tensor] = None  # the pinned source of the copy, kept while it may run


@dataclasses.dataclass
class Operands:
    """What a call runs its kernels on: a table of spans (one per tensor) and what it needs."""

    table: Table
    out: torch.dtype  # the call's statistic and norm dtype: float64 when any tensor is float64
    shares_memory: bool  # two tensors overlap: in-place ops must run them one by one
    has_complex: bool
    # The tensors with each truly strided one replaced by its dense copy (complex stays complex);
    # None when none is strided (cached operands hold no tensor).
    dense: Optional[list[Tensor]]
    write_back: list[tuple[Tensor, Tensor]]  # (strided original, dense copy) to copy back
    temporaries: list[Tensor]  # what the table points into besides the tensors (kept alive)


def build_table(spans: list[tuple[int, int, torch.dtype]], device: torch.device) -> Table:
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
        launches.append(Launch(dtype, launch_first, len(addresses) - launch_first, aligned))
    host = torch.tensor(addresses + lengths + first + count, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()  # a non-blocking copy, on the current stream (see _cache)
        table = host.to(device, non_blocking=True)
    else:
        table = host
    return Table(table, len(addresses), len(spans), launches, host)


def is_dense(t: Tensor) -> bool:
    """t's elements fill [data_ptr, data_ptr + numel) exactly once (contiguous, channels_last,
    transposed, ...): every op here is elementwise and order-free, so it is one flat span."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def extent(t: Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) of the memory a non-empty t's elements occupy (strides >= 0)."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def any_overlap(extents: list[tuple[int, int]]) -> bool:
    extents.sort()
    return any(a[1] > b[0] for a, b in zip(extents, extents[1:]))


def prepare(tensors: list[Tensor], op: str, writes: bool, check: bool = True) -> Operands:
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
            if t.dtype not in SUPPORTED_DTYPES:
                raise RuntimeError(f"fusedclip_triton.{op}: tensor {i} has dtype {t.dtype}; "
                                   "expected float32, float64, float16, bfloat16 or complex")
            if writes_to_inference and t.is_inference():
                raise RuntimeError(
                    f"fusedclip_triton.{op}: tensor {i} is an inference tensor, which cannot be "
                    "modified in place outside torch.inference_mode()"
                )
        dtype = t.dtype
        has_float64 = has_float64 or dtype in numerics.FLOAT64_DTYPES
        if t.is_contiguous() or is_dense(t):
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
                extents.append(extent(t))
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
    shares_memory = writes and len(tensors) > 1 and any_overlap([e for e in extents if e[0] != e[1]])
    return Operands(
        build_table(spans, device), torch.float64 if has_float64 else torch.float32, shares_memory,
        has_complex, dense if write_back or temporaries else None, write_back, temporaries,
    )


def key_of(tensors: list[Tensor], writes: bool) -> Optional[tuple]:
    """What decides a list's operands: each tensor's address, numel, dtype, whether it is dense
    in memory (a dense tensor is one span whatever its strides; a list with one that is not is
    never cached) and whether it is an inference tensor; the device and inference mode. None
    when some tensor has no address (not strided): prepare then says why it is refused.

    A hit stands for the checks too: a tensor's address fixes its device (CUDA's unified
    addressing gives host and every device disjoint ranges), and the rest is in the key."""
    if _c_table_key is not None:
        items = _c_table_key(tensors)  # ~20 ns a tensor
        if items is None:
            return None
    else:
        try:
            items = tuple([(t.data_ptr(), t.numel(), t.dtype, t.is_contiguous() or is_dense(t),
                            t.is_inference()) for t in tensors])
        except RuntimeError:
            return None
    return tensors[0].device, writes, torch.is_inference_mode_enabled(), items


_CACHE_SIZE = 16
# (stream, key_of(...)) -> operands. A table is copied on the current stream and used only on it, so
# every kernel reading it is ordered after its copy, and once evicted the caching allocator
# reuses its memory in that stream's order.
_cache: "collections.OrderedDict[tuple, Operands]" = collections.OrderedDict()
# Operands a captured CUDA graph reads: never freed (an eviction from the cache drops only the
# cache's reference), as the graph reads their tables at every replay.
_captured: list[Operands] = []


def operands_of(tensors: list[Tensor], op: str, writes: bool) -> Operands:
    """prepare's operands, from the cache when the list was seen before on this stream (the
    same grads every step) and needs no copies or temporaries: no checks, no table built, no
    host-to-device copy.

    While the current stream captures a CUDA graph, the cached operands of the list are used
    whatever stream made them (torch.cuda.graph synchronizes the device before capture, so
    their copy is done), and kept in ``_captured`` for the graph. Without any (the list was
    never used eagerly, or needs copies) they are built during capture: the graph then copies
    the table from a pinned host buffer at each replay, kept alive with them, and they are not
    cached (the device table holds its bytes only once the graph has run)."""
    device = tensors[0].device
    key = key_of(tensors, writes)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        operands = next((o for (_, k), o in _cache.items() if k == key), None) if key else None
        if operands is None:
            operands = prepare(tensors, op, writes)
        _captured.append(operands)
        return operands
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    operands = _cache.get((stream, key)) if key is not None else None
    if operands is not None:
        _cache.move_to_end((stream, key))
        return operands
    operands = prepare(tensors, op, writes)
    if key is not None and not operands.write_back and not operands.temporaries:
        _cache[(stream, key)] = operands
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return operands


