"""Triton kernels of backend "triton": the fusedclip operators over device tables.

Every kernel sees a list of tensors of one dtype as chunks of at most ``CHUNK`` elements, one
program per chunk, described by a device table of int64 (built in fusedclip/triton/tables.py):

    table[c]                   address of chunk c's first element (chunks of every dtype, in order)
    table[n_chunks + c]        its length (1 .. CHUNK)
    table[2 n_chunks + c]      the index of its tensor in the list (per-tensor coefficients)
    table[3 n_chunks + t]      index of tensor t's first chunk (per-tensor statistics)
    table[3 n_chunks + T + t]  tensor t's number of chunks

ALIGNED (constexpr) says every chunk of the launch starts on 16 bytes, which lets Triton
vectorize the loads and stores of whole blocks (a partial last block is masked); a dtype's
aligned and unaligned chunks are separate launches.

A launch covers chunks of one dtype, [first_chunk, first_chunk + grid). A chunk never spans
two tensors, so a tensor of 10 elements is one program and a tensor of 10^8 elements is ~6,000;
10,000 tensors are one launch.

AGC (``agc_pieces``) has a table of its own, of *pieces*: runs of whole rows (units) of at most
CHUNK elements, or one part of a row longer than CHUNK (tables.py, build_agc_table):

    table[c], [P + c]          address of piece c's first gradient element; its row length
                               (a part's length for a part of a long row)
    table[2P + c]              the unit of its first row (whole rows), or its long row's index
    table[3P + c], [4P + c]    address of its first parameter element; its number of rows
    table[5P + c]              the index of its part (parts of long rows), or -1 (whole rows)
    table[6P + s], [6P + S + s], [6P + 2S + s], [6P + 3S + s]
                               long row s: its unit, its first part, its number of parts, and
                               flags (1: the gradient accumulates in float64, 2: the parameter)
    table[6P + 4S + t], [6P + 4S + T + t]   tensor t's first unit and number of units

Its first three rows are laid out as a chunk table's, so that the parts of long rows are scaled
by ``scale_chunks`` (PER_TENSOR, one coefficient per long row).

Scalars that must be exact in float64 (p, max_norm, clamp bounds, AGC's factors, the monitor's
thresholds) travel as the int64 bits of a float64 (Triton passes Python floats as float32) and
are turned back with a bitcast (``_from_bits``). They are annotated ``tl.int64`` (Triton would
type the bits of 0.0 as int32 and compile a variant for it), and they and the table's sizes are
in ``do_not_specialize``, so that no value compiles a kernel of its own.

Triton compiles them for GPU tensors. In a process started with TRITON_INTERPRET=1, Triton's
interpreter (numpy underneath) runs them on CPU tensors instead: that is how the test suite
runs these kernels on a machine without a GPU. The variable must be set before triton is
imported (it decides what ``triton.jit`` and triton.language's own functions are).
"""

import triton
import triton.language as tl

from fusedclip.numerics import NormKind

# Kinds of statistic (constexpr KIND, fusedclip.numerics.NormKind): sum x^2, sum |x|, sum |x|^p,
# max |x|, min |x|, count x != 0.
SQUARE_SUM = tl.constexpr(NormKind.SQUARE_SUM.value)
ABS_SUM = tl.constexpr(NormKind.ABS_SUM.value)
POWER_SUM = tl.constexpr(NormKind.POWER_SUM.value)
MAX = tl.constexpr(NormKind.MAX.value)
MIN = tl.constexpr(NormKind.MIN.value)
COUNT = tl.constexpr(NormKind.COUNT.value)

# In-place element-wise operations of _transform (constexpr OP).
SCALE = tl.constexpr(0)
CLAMP = tl.constexpr(1)

# Reductions are tl.reduce with the combine functions of tl.sum / tl.max / tl.min: the same
# reductions when compiled, and one numpy call each in the interpreter, where calling tl.sum
# (itself a Triton function) costs milliseconds. max and min drop nan, as hardware does.
_SUM = tl.standard._sum_combine
_MAX = tl.standard._elementwise_max
_MIN = tl.standard._elementwise_min

# The interpreter has no libdevice: there float64 pow is exp2(p log2 x) in numpy's float64.
# (triton.jit reads the same knob to decide whether it interprets.)
_INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))
if not _INTERPRETED:
    from triton.language.extra import libdevice


# --- helpers ----------------------------------------------------------------------------------------


@triton.jit
def _from_bits(bits):
    """The float64 whose int64 bits are ``bits`` (see the module docstring)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _pow64(x, p):
    """x^p in float64 (x >= 0): libdevice's pow (correctly rounded to ~1 ulp), as std::pow;
    0 -> 0 for p > 0 and inf for p < 0."""
    if _INTERPRETED:
        return tl.exp2(p * tl.log2(x))
    else:
        return libdevice.pow(x, p)


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """x (float32 or float64) rounded to DTYPE, to nearest even.

    bfloat16 is rounded with integer operations, as c10::BFloat16 does: the same bits as the
    hardware's conversion, and the only correct ones in Triton's interpreter, whose float32 to
    bfloat16 cast truncates. The integer work is free in a memory-bound kernel.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)  # nan stays a (quiet) nan
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _reduce_lanes(acc, nans, KIND: tl.constexpr):
    """acc's lanes reduced by KIND's combine in a fixed tree; nan when a lane counted a nan
    (max and min drop nan in hardware)."""
    if KIND == MAX:
        s = tl.reduce(acc, 0, _MAX)
    elif KIND == MIN:
        s = tl.reduce(acc, 0, _MIN)
    else:
        s = tl.reduce(acc, 0, _SUM)
    return tl.where(tl.reduce(nans, 0, _SUM) > 0, float("nan"), s)


@triton.jit
def _chunk(table, n_chunks, chunk, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """(pointer to chunk's first element, its length) from the table."""
    address = tl.load(table + chunk)
    n = tl.load(table + n_chunks + chunk)
    x_ptr = address.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        x_ptr = tl.multiple_of(x_ptr, 16)
    return x_ptr, n


@triton.jit
def _statistic(x_ptr, n, p, inv, KIND: tl.constexpr, ACC: tl.constexpr, UNSCALE: tl.constexpr,
               BLOCK: tl.constexpr):
    r"""(s, bad): the statistic of x[0:n] widened to ACC (of x * inv, inv in ACC, with UNSCALE),

    .. math::
        s = \sum x^2,\ \sum |x|,\ \sum |x|^p,\ \max |x|,\ \min |x|,\ \#\{x \neq 0\}

    accumulated in BLOCK lanes and reduced by a fixed tree (``tl.reduce``), so every run gives the
    same bits; and, with UNSCALE, the number of x (before the product) that are inf or nan (else
    0). max and min drop nan in hardware: nans are counted and make s nan. The terms
    :math:`|x|^p` of a general p are computed and summed in float64 (as std::pow in double on the
    CPU)."""
    lanes = tl.arange(0, BLOCK)
    if KIND == MIN:
        acc = tl.full([BLOCK], float("inf"), ACC)
    elif KIND == POWER_SUM:
        acc = tl.full([BLOCK], 0, tl.float64)
    else:
        acc = tl.full([BLOCK], 0, ACC)
    nans = tl.full([BLOCK], 0, tl.int32)
    bad = tl.full([BLOCK], 0, tl.int32)
    for start in range(0, n, BLOCK):
        mask = start + lanes < n
        if start + BLOCK <= n:  # a whole block: no mask, so that loads are vectorized
            x = tl.load(x_ptr + start + lanes).to(ACC)
        else:
            x = tl.load(x_ptr + start + lanes, mask=mask, other=0.0).to(ACC)
        if UNSCALE:  # the check reads x itself, as torch's unscale_ does
            bad += ((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32)
            x = x * inv
        a = tl.abs(x)
        if KIND == SQUARE_SUM:
            acc += x * x
        elif KIND == ABS_SUM:
            acc += a
        elif KIND == POWER_SUM:
            acc += tl.where(mask, _pow64(a.to(tl.float64), p), 0.0)
        elif KIND == COUNT:
            acc += (x != 0.0).to(ACC)  # nan != 0: counted, as torch counts it
        elif KIND == MAX:
            acc = tl.maximum(acc, a)
            nans += (a != a).to(tl.int32)
        else:
            acc = tl.minimum(acc, tl.where(mask, a, float("inf")))
            nans += (a != a).to(tl.int32)
    return _reduce_lanes(acc, nans, KIND), tl.reduce(bad, 0, _SUM)


@triton.jit
def _combine_partials(partials, count, KIND: tl.constexpr, BLOCK: tl.constexpr, VOLATILE: tl.constexpr):
    """The float64 partials partials[0:count] combined in a fixed order (lane-wise over blocks of
    BLOCK, then a fixed tree), nan if any is nan; the identity (0, or inf for min) when count is 0.
    VOLATILE reads past the cache: partials written by other programs of the same launch."""
    lanes = tl.arange(0, BLOCK)
    if KIND == MIN:
        total = tl.full([BLOCK], float("inf"), tl.float64)
    else:
        total = tl.full([BLOCK], 0, tl.float64)
    nans = tl.full([BLOCK], 0, tl.int32)
    for start in range(0, count, BLOCK):
        mask = start + lanes < count
        if KIND == MIN:
            v = tl.load(partials + start + lanes, mask=mask, other=float("inf"), volatile=VOLATILE)
            total = tl.minimum(total, v)
        elif KIND == MAX:
            v = tl.load(partials + start + lanes, mask=mask, other=0.0, volatile=VOLATILE)
            total = tl.maximum(total, v)
        else:
            v = tl.load(partials + start + lanes, mask=mask, other=0.0, volatile=VOLATILE)
            total += v
        nans += (v != v).to(tl.int32)
    return _reduce_lanes(total, nans, KIND)


@triton.jit
def _root(s, p, KIND: tl.constexpr, OUT: tl.constexpr):
    """The norm from its statistic s (in OUT): the IEEE-rounded square root for p = 2 (float32
    sqrt is approximate in Triton; the float64 one is exact), float64 pow for another finite p
    (then rounded to OUT), s itself otherwise."""
    if KIND == SQUARE_SUM:
        if OUT == tl.float64:
            return tl.sqrt(s)
        else:
            return tl.sqrt_rn(s)
    elif KIND == POWER_SUM:
        return _pow64(s.to(tl.float64), 1.0 / p).to(OUT)
    else:
        return s


@triton.jit
def _transform(x_ptr, n, a, b, OP: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr,
               BLOCK: tl.constexpr):
    """x[0:n] = round(x * a) (SCALE) or round(min(max(x, a), b)) (CLAMP) in place, computed in
    ACC (a and b in ACC); nan stays nan through the clamp (comparisons with nan are false)."""
    lanes = tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK):
        whole = start + BLOCK <= n  # a whole block: no mask, so that accesses are vectorized
        if whole:
            x = tl.load(x_ptr + start + lanes).to(ACC)
        else:
            x = tl.load(x_ptr + start + lanes, mask=start + lanes < n).to(ACC)
        if OP == SCALE:
            y = x * a
        else:
            y = tl.where(x < a, a, x)
            y = tl.where(y > b, b, y)
        if whole:
            tl.store(x_ptr + start + lanes, _round(y, DTYPE))
        else:
            tl.store(x_ptr + start + lanes, _round(y, DTYPE), mask=start + lanes < n)


@triton.jit
def _writes(c):
    """Whether scaling by coefficient c writes: not for c >= 1 (an identity); nan writes nan."""
    return (c < 1.0) | (c != c)


# --- the norm -------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n_chunks", "first_chunk", "p_bits", "max_norm_bits", "eps_bits"])
def norm_chunks(
    table, n_chunks, first_chunk,  # the call's table; this launch's chunks start at first_chunk
    partials,                      # float64 statistic of chunk c -> partials[c]
    ticket,                        # int32 [counter of finished programs over every launch, found]
    p_bits: tl.int64,              # p as float64 bits (POWER_SUM)
    statistic,                     # out: the statistic of all chunks (OUT)
    total_norm, coef,              # out, with FINISH: the norm, min(max_norm / (norm + eps), 1) (OUT)
    max_norm_bits: tl.int64, eps_bits: tl.int64,  # float64 bits of max_norm and 1e-6 (FINISH)
    inv_scale, found_inf,          # UNSCALE: a one-element float tensor; out: float32 1. or 0.
    DTYPE: tl.constexpr, ACC: tl.constexpr, OUT: tl.constexpr, KIND: tl.constexpr,
    FINISH: tl.constexpr, UNSCALE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
    FINAL_BLOCK: tl.constexpr,
):
    r"""Statistic of one chunk (``_statistic``); the last program of the call reduces every partial.

    A chunk's elements are widened to ACC, this launch's accumulator (float32, float64 for
    float64 data; a list of several dtypes accumulates each in its own, as the CPU backend does),
    and with UNSCALE multiplied by inv_scale (rounded to ACC), as torch's unscale_ computes the
    unscaled gradients; a chunk holding an inf or nan (before the product) sets ticket[1]. The
    chunk's statistic is rounded to ACC.

    Each program then takes a ticket (an atomic increment, release/acquire). The program that
    takes the last ticket, n_chunks - 1, knows every partial is written: it combines them in
    float64 in a fixed order (lane k takes partials k, k + FINAL_BLOCK, ...; then a tree) and
    writes the statistic in OUT (the call's dtype: float64 when any tensor is float64), with
    UNSCALE found_inf, and with FINISH the norm (``_root``) and the clip coefficient, computed as
    torch computes it: ``min(max_norm * (1 / (norm + 1e-6)), 1)`` in OUT, nan kept.
    """
    chunk = first_chunk + tl.program_id(0)
    x_ptr, n = _chunk(table, n_chunks, chunk, DTYPE, ALIGNED)
    p = _from_bits(p_bits)
    if UNSCALE:
        inv = tl.load(inv_scale).to(ACC)
    else:
        inv = tl.full([], 1.0, ACC)
    s, bad = _statistic(x_ptr, n, p, inv, KIND, ACC, UNSCALE, BLOCK)
    tl.store(partials + chunk, s.to(ACC).to(tl.float64))
    if UNSCALE:
        if bad > 0:
            tl.store(ticket + 1, 1)

    # Every thread's store lands before the ticket is taken (barrier + the atomic's release).
    tl.debug_barrier()
    done = tl.atomic_add(ticket, 1, sem="acq_rel")
    if done == n_chunks - 1:
        s64 = _combine_partials(partials, n_chunks, KIND, FINAL_BLOCK, True)
        statistic_value = s64.to(OUT)
        tl.store(statistic, statistic_value)
        if UNSCALE:
            tl.store(found_inf, (tl.load(ticket + 1, volatile=True) > 0).to(tl.float32))
        if FINISH:
            norm = _root(statistic_value, p, KIND, OUT)
            tl.store(total_norm, norm)
            eps = _from_bits(eps_bits).to(OUT)
            max_norm = _from_bits(max_norm_bits).to(OUT)
            # IEEE-rounded division, as torch's: float32 / is approximate in Triton
            one = tl.full([], 1.0, OUT)
            if OUT == tl.float64:
                c = one / (norm + eps) * max_norm
            else:
                c = tl.div_rn(one, norm + eps) * max_norm
            tl.store(coef, tl.where(c > 1.0, 1.0, c).to(OUT))


@triton.jit(do_not_specialize=["index", "n_tensors", "n_partials", "p_bits"])
def per_tensor(
    table, index, n_tensors,  # tensor t's first partial and count: table[index + t], [index + T + t]
    partials, n_partials,     # float64 partials (chunks, or AGC's units), n_partials in all
    out,                      # out: per-tensor statistic, or norm with ROOT (ACC)
    statistic,                # out, with TOTAL: the statistic of all n_partials partials (ACC)
    p_bits: tl.int64,         # p as float64 bits (ROOT)
    KIND: tl.constexpr, ACC: tl.constexpr, ROOT: tl.constexpr, TOTAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Statistic of tensor t (program t): its partials combined in float64, in a fixed order as
    in norm_chunks, rounded to ACC; a tensor with no elements gets the identity (0, or inf for
    min). With ROOT its norm instead (``_root`` of the statistic; 0 for a tensor with no elements,
    whatever p). With TOTAL program 0 also combines all the partials (written by earlier
    launches) into ``statistic``."""
    t = tl.program_id(0)
    first = tl.load(table + index + t)
    count = tl.load(table + index + n_tensors + t)
    s = _combine_partials(partials + first, count, KIND, BLOCK, False).to(ACC)
    if ROOT:
        s = tl.where(count == 0, 0.0, _root(s, _from_bits(p_bits), KIND, ACC))
    tl.store(out + t, s)
    if TOTAL:
        if t == 0:
            tl.store(statistic, _combine_partials(partials, n_partials, KIND, BLOCK, False).to(ACC))


# --- in-place transforms -------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n_chunks", "first_chunk", "coef_stride"])
def scale_chunks(
    table, n_chunks, first_chunk,  # the call's table; this launch's chunks start at first_chunk
    coef, coef_stride,             # a float tensor on the device; PER_TENSOR: one per tensor
    DTYPE: tl.constexpr, ACC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
    PER_TENSOR: tl.constexpr,
):
    """x = round(x * coef) in place, the product in ACC (float32, float64 for float64 data);
    with PER_TENSOR, the chunk's tensor t (table row 2) takes coef[t * coef_stride].

    coef is read from device memory (no host sync); when it is >= 1 the program returns without
    reading or writing anything. A nan coef writes nan, as torch's multiply does.
    """
    chunk = first_chunk + tl.program_id(0)
    if PER_TENSOR:
        c = tl.load(coef + tl.load(table + 2 * n_chunks + chunk) * coef_stride)
    else:
        c = tl.load(coef)
    c = c.to(tl.float64)  # exact; compared as the CPU compares it (fp16 and bf16 compare alike)
    if _writes(c):
        x_ptr, n = _chunk(table, n_chunks, chunk, DTYPE, ALIGNED)
        factor = c.to(ACC)
        _transform(x_ptr, n, factor, factor, SCALE, DTYPE, ACC, BLOCK)


@triton.jit(do_not_specialize=["n_chunks", "first_chunk", "lo_bits", "hi_bits"])
def clamp_chunks(
    table, n_chunks, first_chunk,  # the call's table; this launch's chunks start at first_chunk
    lo_bits: tl.int64, hi_bits: tl.int64,  # the bounds as float64 bits
    DTYPE: tl.constexpr, ACC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """x = min(max(x, lo), hi) in place, one pass, compared in ACC with the bounds rounded to
    ACC; nan stays nan (comparisons with nan are false)."""
    x_ptr, n = _chunk(table, n_chunks, first_chunk + tl.program_id(0), DTYPE, ALIGNED)
    lo = _from_bits(lo_bits).to(ACC)
    hi = _from_bits(hi_bits).to(ACC)
    _transform(x_ptr, n, lo, hi, CLAMP, DTYPE, ACC, BLOCK)


# --- adaptive gradient clipping (AGC) ------------------------------------------------------------


@triton.jit
def _agc_coefficient(grad_sq, param_sq, clip_factor, eps):
    """AGC's coefficient of a unit from its sums of squares (float64, each already rounded to
    its tensor's accumulator type), computed in float64 as the CPU kernel computes it:
    W* = clip_factor * max(||W||, eps); 1 when ||G|| < W*, else W* / max(||G||, 1e-6). A nan
    norm fails the comparison and gives nan (std::max keeps its first argument when the
    comparison fails)."""
    param_norm = tl.sqrt(param_sq)
    max_norm = clip_factor * tl.where(param_norm < eps, eps, param_norm)
    grad_norm = tl.sqrt(grad_sq)
    floor = tl.full([], 1e-6, tl.float64)
    c = max_norm / tl.where(grad_norm < floor, floor, grad_norm)
    return tl.where(grad_norm < max_norm, 1.0, c)


@triton.jit
def _square_sum(x_ptr, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """sum x^2 of x[0:n], accumulated in ACC and rounded to it, as float64."""
    s, _ = _statistic(x_ptr, n, 2.0, 1.0, SQUARE_SUM, ACC, False, BLOCK)
    return s.to(ACC).to(tl.float64)


@triton.jit
def _round_to_accumulator(s, is_float64):
    """s (float64) rounded to float32 unless is_float64."""
    return tl.where(is_float64, s, s.to(tl.float32).to(tl.float64))


@triton.jit(do_not_specialize=["n_pieces", "first_piece", "n_parts", "clip_factor_bits", "eps_bits"])
def agc_pieces(
    table, n_pieces, first_piece,  # the AGC table (module docstring); this launch's pieces
    unit_sq,                       # out: float64 sum of squares of each unit's gradient
    parts, n_parts,                # out: float64 sums of squares of long rows' parts (grads, params)
    clip_factor_bits: tl.int64, eps_bits: tl.int64,
    DTYPE: tl.constexpr, ACC: tl.constexpr, PDTYPE: tl.constexpr, PACC: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """One piece of unit-wise AGC: whole rows clipped in place, or one part of a long row measured.

    A piece of whole rows (units of at most CHUNK elements) is the whole work of its units: for
    each row, the sums of squares of the gradient (accumulated in ACC) and of the parameter (in
    PACC, its own dtype's accumulator), the coefficient (``_agc_coefficient``), the gradient's
    sum in unit_sq, and the row scaled in place (from the cache: it was just read) when it clips.
    A part of a long row stores its two sums in parts[part] and parts[n_parts + part]: the
    row's coefficient comes from ``agc_long_rows``, its scale from ``scale_chunks``.
    """
    piece = first_piece + tl.program_id(0)
    g_ptr, length = _chunk(table, n_pieces, piece, DTYPE, False)
    p_ptr = tl.load(table + 3 * n_pieces + piece).to(tl.pointer_type(PDTYPE))
    part = tl.load(table + 5 * n_pieces + piece)
    if part < 0:
        unit = tl.load(table + 2 * n_pieces + piece)
        rows = tl.load(table + 4 * n_pieces + piece)
        clip_factor = _from_bits(clip_factor_bits)
        eps = _from_bits(eps_bits)
        for r in range(0, rows):
            g_row = g_ptr + r * length
            p_row = p_ptr + r * length
            if ALIGNED:  # every row starts on 16 bytes (tables.py checks the row's size)
                g_row = tl.multiple_of(g_row, 16)
                p_row = tl.multiple_of(p_row, 16)
            grad_sq = _square_sum(g_row, length, ACC, BLOCK)
            c = _agc_coefficient(grad_sq, _square_sum(p_row, length, PACC, BLOCK), clip_factor, eps)
            tl.store(unit_sq + unit + r, grad_sq)
            if _writes(c):
                factor = c.to(ACC)
                _transform(g_row, length, factor, factor, SCALE, DTYPE, ACC, BLOCK)
    else:
        if ALIGNED:
            g_ptr = tl.multiple_of(g_ptr, 16)
            p_ptr = tl.multiple_of(p_ptr, 16)
        tl.store(parts + part, _square_sum(g_ptr, length, ACC, BLOCK))
        tl.store(parts + n_parts + part, _square_sum(p_ptr, length, PACC, BLOCK))


@triton.jit(do_not_specialize=["index", "n_long", "n_parts", "clip_factor_bits", "eps_bits"])
def agc_long_rows(
    table, index, n_long,  # long row s: table[index + s] (unit), [+ S] first part, [+ 2S] count, [+ 3S] flags
    unit_sq, parts, n_parts, coefs,  # out: unit_sq[unit], coefs[s]
    clip_factor_bits: tl.int64, eps_bits: tl.int64, BLOCK: tl.constexpr,
):
    """Long row s (program s): its parts' sums combined in float64 in a fixed order and rounded
    to each tensor's accumulator type (a long row's sum is one statistic, as a short row's), the
    gradient's in unit_sq, and the row's AGC coefficient in coefs[s]."""
    s = tl.program_id(0)
    unit = tl.load(table + index + s)
    first = tl.load(table + index + n_long + s)
    count = tl.load(table + index + 2 * n_long + s)
    flags = tl.load(table + index + 3 * n_long + s)
    grad_sq = _round_to_accumulator(_combine_partials(parts + first, count, SQUARE_SUM, BLOCK, False),
                                    (flags & 1) != 0)
    param_sq = _round_to_accumulator(_combine_partials(parts + n_parts + first, count, SQUARE_SUM, BLOCK,
                                                       False), (flags & 2) != 0)
    tl.store(unit_sq + unit, grad_sq)
    tl.store(coefs + s, _agc_coefficient(grad_sq, param_sq, _from_bits(clip_factor_bits),
                                         _from_bits(eps_bits)))


# --- GradientMonitor's update --------------------------------------------------------------------


@triton.jit(do_not_specialize=["n", "warmup_steps", "vanish_steps", "ema_weight_bits", "z_squared_bits",
                               "explode_bits", "vanish_bits"])
def monitor_update(
    norms, mean, var, count, below, explosions, exploding, vanishing, n,
    ema_weight_bits: tl.int64, z_squared_bits: tl.int64, explode_bits: tl.int64, vanish_bits: tl.int64,
    warmup_steps: tl.int64, vanish_steps: tl.int64,
    T: tl.constexpr, HAS_EXPLODE: tl.constexpr, BLOCK: tl.constexpr,
):
    """GradientMonitor's per-step update of entries [pid * BLOCK, ...) (fusedclip.reference's
    monitor_update_ defines it; csrc/cpu/monitor.cpp repeats it op by op): every operation in T,
    the norms' dtype, rounded on its own, with the float arguments rounded to T once (the host
    computes 1 - alpha and z_threshold^2 in float64). Compiled without contraction into fused
    multiply-adds (launch.py), so that the bits are the CPU kernel's."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(norms + offsets, mask=mask, other=0.0)
    mu = tl.load(mean + offsets, mask=mask, other=0.0)
    sigma2 = tl.load(var + offsets, mask=mask, other=0.0)
    seen = tl.load(count + offsets, mask=mask, other=0)
    finite = tl.abs(x) < float("inf")
    warm = seen >= warmup_steps
    deviation = tl.where(finite, x - mu, 0.0)
    square = deviation * deviation
    spread = sigma2 + tl.full([], 1e-12, T)
    spike = (deviation > 0.0) & (square > _from_bits(z_squared_bits).to(T) * spread)
    explodes = (~finite) | (warm & spike)
    if HAS_EXPLODE:
        explodes = explodes | (x > _from_bits(explode_bits).to(T))
    one = tl.full([], 1.0, T)
    if T == tl.float64:
        first_weight = one / (seen + 1).to(T)
    else:
        first_weight = tl.div_rn(one, (seen + 1).to(T))
    weight = tl.where(warm, _from_bits(ema_weight_bits).to(T), first_weight)
    weight = tl.where(finite, weight, 0.0)
    keep = one - weight
    factor = tl.where(warm, keep * keep, keep)
    tl.store(mean + offsets, mu + weight * deviation, mask=mask)
    tl.store(var + offsets, sigma2 + weight * (factor * square - sigma2), mask=mask)
    tl.store(count + offsets, seen + finite.to(tl.int64), mask=mask)
    low = tl.where(x < _from_bits(vanish_bits).to(T), tl.load(below + offsets, mask=mask, other=0) + 1, 0)
    tl.store(below + offsets, low, mask=mask)
    flagged = tl.load(explosions + offsets, mask=mask, other=0)
    tl.store(explosions + offsets, flagged + explodes.to(tl.int64), mask=mask)
    tl.store(exploding + offsets, explodes, mask=mask)
    tl.store(vanishing + offsets, low >= vanish_steps, mask=mask)
