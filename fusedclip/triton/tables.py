"""The operands of a Triton call: one device table describing every chunk of every tensor
(kernels.py's module docstring), AGC's table of pieces, and the cache of those tables.

Tables depend only on each tensor's address, numel, dtype and whether it is dense in memory, so
the operands of a list seen before on the same stream (the same grads every step) come from a
small cache: no checks, no table built, no host-to-device copy (the key costs about 0.5 us a
tensor in Python). A tensor that fills its memory exactly once
(contiguous, channels_last, transposed) is one flat span of it: every op here but AGC is
elementwise and order-free. Truly strided tensors (t[::2]) and complex tensors read for a norm
(|z| is a temporary) go through temporaries, built per call; in-place ops write a strided
tensor's contiguous copy and copy it back (the same bits when nothing was scaled). AGC's units
are rows of the row-major layout: its non-contiguous tensors go through contiguous copies.

CUDA graphs. A graph captured on a list used before (the warm-up) reads that list's cached
table; one never used before gets its table built during capture, copied at each replay from
pinned host memory reserved before the capture (``_Staging``: allocating pinned memory queries
events, which a capture in the default "global" mode forbids). Either way the operands a graph
reads are kept alive by that graph (``captured_operands``), and released with it; an eviction
from the cache drops only the cache's reference.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import operator
import weakref
from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedclip import numerics

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
    """Chunks (or AGC pieces) [first_chunk, first_chunk + n_chunks) of the table, of one dtype
    (and, for AGC, one parameter dtype) and one alignment."""

    dtype: torch.dtype
    first_chunk: int
    n_chunks: int
    aligned: bool  # every chunk starts on 16 bytes (the kernels then vectorize)
    param_dtype: Optional[torch.dtype] = None  # AGC's parameters


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


# --- the table on the device --------------------------------------------------------------------


class _Staging:
    """Pinned host memory for the tables of CUDA-graph captures, reserved outside any capture.

    A table built during a capture is copied to the device by a node of the graph at every
    replay, so its host source must be pinned and stay untouched for the graph's life. Pinned
    memory cannot be allocated during a "global" capture (the host allocator queries events), so
    every eager build of a table makes sure that a free region at least as large as that table
    is reserved (one arena of at least ``ARENA`` entries, more when needed); a capture takes a
    region and gives it back when the operands holding it die (with their graph). A capture
    with no region large enough (no call of the Triton backend ran eagerly before, the
    warm-up that torch.cuda.graph asks for) raises a RuntimeError before anything is captured.

    A region given back is taken again only by a later capture, which torch.cuda.graph begins
    with a device synchronization: no replay of the dead graph still reads it.
    """

    ARENA = 1 << 17  # int64 entries: 1 MiB

    def __init__(self, allocate: Callable[[int], Tensor]):
        self._allocate = allocate
        self._arenas: list[Tensor] = []
        self._free: list[tuple[int, int, int]] = []  # (arena, first entry, entries)

    def reserve(self, n: int) -> None:
        """Outside a capture: a free region of at least n entries exists afterwards."""
        if not any(length >= n for _, _, length in self._free):
            self._arenas.append(self._allocate(max(self.ARENA, 2 * n)))
            self._free.append((len(self._arenas) - 1, 0, self._arenas[-1].numel()))

    def take(self, n: int) -> tuple[Tensor, tuple[int, int, int]]:
        """A region of n entries (a view of an arena) and its token for ``give_back``."""
        fits = [r for r in self._free if r[2] >= n]
        if not fits:
            raise RuntimeError(
                "fusedclip_triton: this CUDA graph capture needs a table for tensors never used "
                f"before ({n} entries of pinned memory), and none can be allocated during capture; "
                "run the call once outside the capture first (a warm-up, as torch.cuda.graph "
                "asks for)"
            )
        arena, first, length = min(fits, key=lambda r: r[2])
        self._free.remove((arena, first, length))
        if length > n:
            self._free.append((arena, first + n, length - n))
        return self._arenas[arena][first:first + n], (arena, first, n)

    def give_back(self, token: tuple[int, int, int]) -> None:
        self._free.append(token)


_staging = _Staging(lambda n: torch.empty(n, dtype=torch.int64, pin_memory=True))


def to_device(values: list[int], device: torch.device) -> tuple[Tensor, Optional[Tensor]]:
    """(the int64 table of values on device, its pinned host source while a copy may read it).

    Eagerly: a non-blocking copy from pinned memory, on the current stream (see _cache). During
    a CUDA-graph capture: the copy is a node of the graph, from a region reserved by _staging;
    the table returned owns the region, and gives it back when it dies."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host, None
    if torch.cuda.is_current_stream_capturing():
        return staged_copy(host, device, _staging)
    _staging.reserve(host.numel())
    host = host.pin_memory()
    return host.to(device, non_blocking=True), host


def staged_copy(host: Tensor, device: torch.device, staging: _Staging) -> tuple[Tensor, Tensor]:
    """(host's values copied to device from a staging region, the region): the table returned
    gives the region back when it dies."""
    region, token = staging.take(host.numel())
    region.copy_(host)  # host to host: no CUDA call
    table = torch.empty(host.numel(), dtype=torch.int64, device=device)
    table.copy_(region, non_blocking=True)
    weakref.finalize(table, staging.give_back, token)
    return table, region


def build_table(spans: list[tuple[int, int, torch.dtype]], device: torch.device) -> Table:
    """The table of spans (address, numel, dtype): one per tensor, in order. A dtype's chunks
    are one launch for the tensors that start on 16 bytes and one for those that do not (an
    odd view), so that one unaligned tensor does not cost the others their vector loads."""
    by_launch: dict[tuple[torch.dtype, bool], list[int]] = {}
    for i, (base, n, dtype) in enumerate(spans):
        if n:
            by_launch.setdefault((dtype, base % 16 == 0), []).append(i)
    addresses: list[int] = []
    lengths: list[int] = []
    owners: list[int] = []
    first = [0] * len(spans)
    count = [0] * len(spans)
    launches = []
    for (dtype, aligned), indices in by_launch.items():
        launch_first = len(addresses)
        size = dtype.itemsize
        for i in indices:
            base, n, _ = spans[i]
            first[i], count[i] = len(addresses), -(-n // CHUNK)
            addresses.extend(range(base, base + n * size, CHUNK * size))
            lengths.extend([CHUNK] * (count[i] - 1) + [n - (count[i] - 1) * CHUNK])
            owners.extend([i] * count[i])
        launches.append(Launch(dtype, launch_first, len(addresses) - launch_first, aligned))
    table, host = to_device(addresses + lengths + owners + first + count, device)
    return Table(table, len(addresses), len(spans), launches, host)


# --- checks and operands ---------------------------------------------------------------------------


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


def check(tensors: list[Tensor], op: str, writes: bool, device: Optional[torch.device] = None,
          dtypes: tuple = SUPPORTED_DTYPES, name: str = "tensor") -> None:
    """Raises, before anything is written, on tensors the kernels do not take: another device
    than ``device`` (tensors[0]'s by default), a layout other than strided, a dtype not in
    ``dtypes``; and, for tensors written in place, tensors whose elements share memory
    (numerics.internal_overlap) and inference tensors outside inference mode."""
    device = tensors[0].device if device is None else device
    reason = device_supported(device)
    if reason is not None:
        raise TypeError(f"fusedclip_triton.{op}: {reason}")
    writes_to_inference = writes and not torch.is_inference_mode_enabled()
    for i, t in enumerate(tensors):
        if t.device != device:
            raise TypeError(
                f"fusedclip_triton.{op}: all tensors must be on one device, but {name} {i} is on "
                f"{t.device}, not {device}"
            )
        if t.layout != torch.strided:
            raise TypeError(f"fusedclip_triton.{op}: {name} {i} has layout {t.layout}; only "
                               "dense (strided) tensors are supported")
        if t.dtype not in dtypes:
            expected = ("float32, float64, float16, bfloat16 or complex" if dtypes == SUPPORTED_DTYPES
                        else "float32, float64, float16 or bfloat16")
            raise TypeError(f"fusedclip_triton.{op}: {name} {i} has dtype {t.dtype}; expected {expected}")
        if writes_to_inference and t.is_inference():
            raise ValueError(
                f"fusedclip_triton.{op}: {name} {i} is an inference tensor, which cannot be "
                "modified in place outside torch.inference_mode()"
            )
        if writes and numerics.internal_overlap(t):
            raise ValueError(
                f"fusedclip_triton.{op}: {name} {i} has internally overlapping memory (elements "
                "that share memory: an expanded tensor, an as_strided view) and cannot be "
                "modified in place; clone it first"
            )


def _written_extent(t: Tensor) -> tuple[int, int]:
    """The bytes an in-place op on t may touch (checked on the original: a grad and a strided
    view of it overlap, copy or not)."""
    if t.is_contiguous() or is_dense(t):
        return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    return extent(t)


def shares_memory(tensors: list[Tensor]) -> bool:
    """Whether two of the tensors (to be written in place) overlap in memory."""
    return len(tensors) > 1 and any_overlap([e for e in map(_written_extent, tensors) if e[0] != e[1]])


def prepare(tensors: list[Tensor], op: str, writes: bool, check_first: bool = True) -> Operands:
    """Checks tensors (``check``) and makes their operands: each real tensor that is dense in
    memory is a span of its own memory; a complex one is its real view to write, |z| (a
    temporary) to read; a truly strided one (t[::2]) is read through a contiguous copy, written
    through one copied back."""
    if check_first:
        check(tensors, op, writes)
    spans, dense, write_back, temporaries = [], [], [], []
    has_complex = has_float64 = False
    for t in tensors:
        dtype = t.dtype
        has_float64 = has_float64 or dtype in numerics.FLOAT64_DTYPES
        if not (t.is_contiguous() or is_dense(t)):
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
    return Operands(
        build_table(spans, tensors[0].device), torch.float64 if has_float64 else torch.float32,
        writes and shares_memory(tensors), has_complex, dense if write_back or temporaries else None,
        write_back, temporaries,
    )


# --- AGC: a table of units ------------------------------------------------------------------------


@dataclasses.dataclass
class AgcTable:
    """AGC's table of pieces (kernels.py's module docstring) and its sizes."""

    table: Tensor
    n_pieces: int
    n_long: int  # rows longer than CHUNK, measured in parts
    n_parts: int
    n_units: int
    n_tensors: int
    launches: list[Launch]  # every piece, by (grad dtype, param dtype, alignment)
    long_launches: list[Launch]  # the parts of long rows (the end of each launch's pieces)
    host_copy: Optional[Tensor] = None


@dataclasses.dataclass
class AgcOperands:
    table: AgcTable
    out: torch.dtype  # float64 when any gradient is float64
    shares_memory: bool
    write_back: list[tuple[Tensor, Tensor]]  # (non-contiguous gradient, its contiguous copy)
    temporaries: list[Tensor]  # contiguous copies of parameters


def build_agc_table(pairs: list[tuple[Tensor, Tensor]], device: torch.device) -> AgcTable:
    """The pieces of contiguous (gradient, parameter) pairs: a tensor's units are its rows (slices
    along dim 0) when it has more than one dimension, else the whole tensor. Rows of at most
    CHUNK elements go whole, CHUNK // row length of them to a piece; a longer row is cut into
    parts of CHUNK. A launch takes the pieces of one (grad dtype, param dtype, alignment): aligned
    when both tensors and their rows start on 16 bytes."""
    groups: dict[tuple, tuple[list, list]] = {}
    long_rows: list[tuple[int, int, int, int]] = []  # (unit, first part, parts, flags)
    first_unit, unit_count = [], []
    units = parts = 0
    for g, p in pairs:
        n = g.numel()
        rows = g.shape[0] if g.dim() > 1 and n else 1
        first_unit.append(units)
        unit_count.append(rows if n else 0)
        if n == 0:
            continue
        length = n // rows
        gs, ps = g.element_size(), p.element_size()
        ga, pa = g.data_ptr(), p.data_ptr()
        aligned = ga % 16 == 0 and pa % 16 == 0 and length * gs % 16 == 0 and length * ps % 16 == 0
        whole, long = groups.setdefault((g.dtype, p.dtype, aligned), ([], []))
        if length <= CHUNK:
            k = CHUNK // length
            whole.extend((ga + r * length * gs, length, units + r, pa + r * length * ps, min(k, rows - r), -1)
                         for r in range(0, rows, k))
        else:
            count = -(-length // CHUNK)
            flags = int(g.dtype == torch.float64) | 2 * int(p.dtype == torch.float64)
            for r in range(rows):
                long.extend((ga + (r * length + j) * gs, min(CHUNK, length - j), len(long_rows),
                             pa + (r * length + j) * ps, 1, parts + j // CHUNK)
                            for j in range(0, length, CHUNK))
                long_rows.append((units + r, parts, count, flags))
                parts += count
        units += rows
    pieces: list[tuple] = []
    launches, long_launches = [], []
    for (dtype, param_dtype, aligned), (whole, long) in groups.items():
        launches.append(Launch(dtype, len(pieces), len(whole) + len(long), aligned, param_dtype))
        if long:
            long_launches.append(Launch(dtype, len(pieces) + len(whole), len(long), aligned, param_dtype))
        pieces += whole + long
    columns = list(zip(*pieces)) + list(zip(*long_rows))
    values = [v for c in columns for v in c] + first_unit + unit_count
    table, host = to_device(values, device)
    return AgcTable(table, len(pieces), len(long_rows), parts, units, len(pairs), launches, long_launches, host)


def prepare_agc(grads: list[Tensor], params: list[Tensor], op: str) -> AgcOperands:
    """Checks AGC's gradients and parameters (real, one device, matching shapes) and makes their
    operands; non-contiguous ones go through contiguous copies (gradients' copied back)."""
    if len(grads) != len(params):
        raise ValueError(f"fusedclip_triton.{op}: got {len(grads)} gradients but {len(params)} parameters")
    check(grads, op, True, dtypes=tuple(TRITON_DTYPES), name="gradient")
    check(params, op, False, device=grads[0].device, dtypes=tuple(TRITON_DTYPES), name="parameter")
    for i, (g, p) in enumerate(zip(grads, params)):
        if g.shape != p.shape:
            raise ValueError(f"fusedclip_triton.{op}: parameter {i} has shape {tuple(p.shape)} but its "
                             f"gradient has shape {tuple(g.shape)}")
    pairs, write_back, temporaries = [], [], []
    for g, p in zip(grads, params):
        if not g.is_contiguous():
            copy = g.contiguous()
            write_back.append((g, copy))
            g = copy
        if not p.is_contiguous():
            p = p.contiguous()
            temporaries.append(p)
        pairs.append((g, p))
    return AgcOperands(build_agc_table(pairs, grads[0].device), numerics.accumulate_dtype(grads),
                       shares_memory(grads), write_back, temporaries)


# --- the cache ------------------------------------------------------------------------------------


def key_of(tensors: list[Tensor], writes: bool) -> Optional[tuple]:
    """What decides a list's operands: each tensor's address, numel, dtype and whether it is dense
    in memory (a dense tensor is one span whatever its strides; a list with one that is not is
    never cached); the device and inference mode. None when some tensor has no address (not
    strided), or is an inference tensor to write outside inference mode: prepare then says why
    it is refused.

    A hit stands for the checks too: a tensor's address fixes its device (CUDA's unified
    addressing gives host and every device disjoint ranges), and the rest is in the key."""
    inference_mode = torch.is_inference_mode_enabled()
    if writes and not inference_mode and _any_inference_tensor(tensors):
        return None
    try:
        if _native_spans():  # ~80 ns a tensor, against ~400 for the Python below
            spans = torch.ops.fusedclip.tensor_spans.default(tensors)
            items = ctypes.string_at(spans.data_ptr(), spans.numel() * spans.element_size())
        else:
            items = tuple([(t.data_ptr(), t.numel(), t.dtype, t.is_contiguous() or is_dense(t)) for t in tensors])
    except (RuntimeError, NotImplementedError):
        return None
    return tensors[0].device, writes, inference_mode, items


def _any_inference_tensor(tensors: list[Tensor]) -> bool:
    """Whether any tensor is an inference tensor: the only tensors without a version counter
    (reading ._version costs ~50 ns a tensor, is_inference() ~70)."""
    try:
        sum(map(_version_of, tensors))
    except RuntimeError:
        return True
    return False


_version_of = operator.attrgetter("_version")
_has_native_spans: Optional[bool] = None


def _native_spans() -> bool:
    """Whether fusedclip._C registered fusedclip::tensor_spans (csrc/cpu/tensor_spans.cpp); not on
    a torch older than the native libraries, where they are not loaded."""
    global _has_native_spans
    if _has_native_spans is None:
        _has_native_spans = torch._C._dispatch_has_kernel_for_dispatch_key(
            "fusedclip::tensor_spans", "CompositeExplicitAutograd")
    return _has_native_spans


def agc_key_of(grads: list[Tensor], params: list[Tensor]) -> Optional[tuple]:
    """key_of for AGC's two lists, with what decides its units: each gradient's rows and whether
    both tensors are contiguous (a dense, non-contiguous tensor is copied)."""
    if len(grads) != len(params):
        return None
    grads_key, params_key = key_of(grads, True), key_of(params, False)
    if grads_key is None or params_key is None:
        return None
    try:
        units = tuple([(g.shape[0] if g.dim() > 1 else 1, g.shape == p.shape, g.is_contiguous(), p.is_contiguous())
                       for g, p in zip(grads, params)])
    except AttributeError:
        return None
    return "agc", grads_key, params_key, units


_CACHE_SIZE = 16
# (stream, key) -> operands. A table is copied on the current stream and used only on it, so
# every kernel reading it is ordered after its copy, and once evicted the caching allocator
# reuses its memory in that stream's order.
_cache: "collections.OrderedDict[tuple, object]" = collections.OrderedDict()
# The operands each captured CUDA graph reads, released with the graph (weak keys), and those of
# graphs that cannot be known (a torch without CUDAGraph.get_currently_capturing_graph), kept
# for the process's life.
_captured: "weakref.WeakKeyDictionary[object, list]" = weakref.WeakKeyDictionary()
_captured_without_graph: list = []


def _capturing_graph() -> Optional[object]:
    """The torch.cuda.CUDAGraph capturing on the current stream, when torch can say which."""
    getter = getattr(torch.cuda.CUDAGraph, "get_currently_capturing_graph", None)
    if getter is None:
        return None
    try:
        return getter()
    except RuntimeError:
        return None


def keep_for_graph(operands) -> None:
    """Keeps operands alive as long as the CUDA graph being captured, which reads them at every
    replay."""
    graph = _capturing_graph()
    try:
        _captured.setdefault(graph, []).append(operands)
    except TypeError:  # None, or a graph that cannot be weakly referenced
        _captured_without_graph.append(operands)


def captured_operands(graph) -> list:
    """The operands a captured graph keeps alive (tests)."""
    return _captured.get(graph, [])


def cached(key: Optional[tuple], device: torch.device, build: Callable[[], object]):
    """build()'s operands, from the cache when the key was seen before on this stream (the same
    grads every step) and the operands need no copies or temporaries: no checks, no table built,
    no host-to-device copy.

    While the current stream captures a CUDA graph, the cached operands of the key are used
    whatever stream made them (torch.cuda.graph synchronizes the device before capture, so
    their copy is done). Without any (never used eagerly, or needing copies) they are built
    during capture, their table copied at each replay from staging memory (to_device), and not
    cached (the device table holds its bytes only once the graph has run). Either way the graph
    keeps them alive (keep_for_graph)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        operands = next((o for (_, k), o in _cache.items() if k == key), None) if key else None
        if operands is None:
            operands = build()
        keep_for_graph(operands)
        return operands
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    operands = _cache.get((stream, key)) if key is not None else None
    if operands is not None:
        _cache.move_to_end((stream, key))
        return operands
    operands = build()
    if key is not None and not operands.write_back and not operands.temporaries:
        _cache[(stream, key)] = operands
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return operands


def operands_of(tensors: list[Tensor], op: str, writes: bool) -> Operands:
    """prepare's operands of a list (through the cache)."""
    return cached(key_of(tensors, writes), tensors[0].device, lambda: prepare(tensors, op, writes))


def agc_operands_of(grads: list[Tensor], params: list[Tensor], op: str) -> AgcOperands:
    """prepare_agc's operands of AGC's lists (through the cache)."""
    return cached(agc_key_of(grads, params), grads[0].device, lambda: prepare_agc(grads, params, op))
