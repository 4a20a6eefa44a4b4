"""Triton kernels of backend "triton": multi-tensor norm, scale and clamp over a device table.

Every kernel sees a list of tensors of one dtype as chunks of at most ``CHUNK`` elements, one
program per chunk, described by a device table of int64 (built in fusedclip/triton/tables.py):

    table[c]                 address of chunk c's first element (chunks of every dtype, in order)
    table[n_chunks + c]      its length (1 .. CHUNK)
    table[2 n_chunks + t]    index of tensor t's first chunk (per-tensor statistics)
    table[2 n_chunks + T + t]  tensor t's number of chunks

ALIGNED (constexpr) says every chunk starts on 16 bytes, which lets Triton vectorize the
loads and stores of whole blocks (a partial last block is masked).

A launch covers the chunks of one dtype, [first_chunk, first_chunk + grid). A chunk never spans
two tensors, so a tensor of 10 elements is one program and a tensor of 10^8 elements is ~6,000;
10,000 tensors are one launch.

Scalars that must be exact in float64 (p, max_norm, clamp bounds) travel as the int64 bits of
a float64 (Triton passes Python floats as float32) and are turned back with a bitcast. They are
annotated ``tl.int64`` (Triton would type the bits of 0.0 as int32 and compile a variant for
it), and they and the table's sizes are in ``do_not_specialize``, so that no value compiles a
kernel of its own.

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


@triton.jit(do_not_specialize=["n_chunks", "first_chunk", "p_bits", "max_norm_bits", "eps_bits"])
def norm_chunks(
    table, n_chunks, first_chunk,  # the call's table; this launch's chunks start at first_chunk
    partials,                      # float64 statistic of chunk c -> partials[c]
    ticket,                        # int32 counter of finished programs over every launch of the call
    p_bits: tl.int64,              # p as float64 bits (POWER_SUM)
    statistic,                     # out: the statistic of all chunks (OUT)
    total_norm, coef,              # out, with FINISH: the norm, min(max_norm / (norm + eps), 1) (OUT)
    max_norm_bits: tl.int64, eps_bits: tl.int64,  # float64 bits of max_norm and 1e-6 (FINISH)
    DTYPE: tl.constexpr, ACC: tl.constexpr, OUT: tl.constexpr, KIND: tl.constexpr,
    FINISH: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr, FINAL_BLOCK: tl.constexpr,
):
    r"""Statistic of one chunk; the last program of the call reduces every partial.

    A chunk x of n elements, widened to ACC, this launch's accumulator (float32, float64 for
    float64 data; a list of several dtypes accumulates each in its own, as the CPU backend does)
    gives

    .. math::
        s = \sum x^2,\ \sum |x|,\ \sum |x|^p,\ \max |x|,\ \min |x|,\ \#\{x \neq 0\}

    accumulated in BLOCK lanes and reduced by a fixed tree (``tl.reduce``), so every run gives the
    same bits. max and min drop nan in hardware: nans are counted and make s nan. The terms
    :math:`|x|^p` of a general p are computed and summed in float64 (as std::pow in double on the
    CPU), the chunk's sum rounded to ACC.

    Each program then takes a ticket (an atomic increment, release/acquire). The program that
    takes the last ticket, n_chunks - 1, knows every partial is written: it combines them in
    float64 in a fixed order (lane k takes partials k, k + FINAL_BLOCK, ...; then a tree) and
    writes the statistic in OUT (the call's dtype: float64 when any tensor is float64), and with
    FINISH the norm (the p-th root by float64 pow, IEEE-rounded square root for p = 2) and the
    clip coefficient, computed as torch computes it:
    ``min(max_norm * (1 / (norm + 1e-6)), 1)`` in OUT, nan kept.
    """
    chunk = first_chunk + tl.program_id(0)
    x_ptr, n = _chunk(table, n_chunks, chunk, DTYPE, ALIGNED)
    lanes = tl.arange(0, BLOCK)
    if KIND == MIN:
        acc = tl.full([BLOCK], float("inf"), ACC)
    elif KIND == POWER_SUM:
        acc = tl.full([BLOCK], 0, tl.float64)
    else:
        acc = tl.full([BLOCK], 0, ACC)
    nans = tl.full([BLOCK], 0, tl.int32)
    p = p_bits.to(tl.int64).to(tl.float64, bitcast=True)
    for start in range(0, n, BLOCK):
        mask = start + lanes < n
        if start + BLOCK <= n:  # a whole block: no mask, so that loads are vectorized
            x = tl.load(x_ptr + start + lanes).to(ACC)
        else:
            x = tl.load(x_ptr + start + lanes, mask=mask, other=0.0).to(ACC)
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
    s = _reduce_lanes(acc, nans, KIND)
    tl.store(partials + chunk, s.to(ACC).to(tl.float64))

    # Every thread's store lands before the ticket is taken (barrier + the atomic's release).
    tl.debug_barrier()
    done = tl.atomic_add(ticket, 1, sem="acq_rel")
    if done == n_chunks - 1:
        s64 = _combine_partials(partials, n_chunks, KIND, FINAL_BLOCK, True)
        statistic_value = s64.to(OUT)
        tl.store(statistic, statistic_value)
        if FINISH:
            # IEEE-rounded square root and division, as torch's: float32 sqrt and / are
            # approximate in Triton (float64 ones are exact, and have no _rn form)
            one = tl.full([], 1.0, OUT)
            if KIND == SQUARE_SUM:
                if OUT == tl.float64:
                    norm = tl.sqrt(statistic_value)
                else:
                    norm = tl.sqrt_rn(statistic_value)
            elif KIND == POWER_SUM:
                norm = _pow64(statistic_value.to(tl.float64), 1.0 / p).to(OUT)
            else:
                norm = statistic_value
            tl.store(total_norm, norm)
            eps = eps_bits.to(tl.int64).to(tl.float64, bitcast=True).to(OUT)
            max_norm = max_norm_bits.to(tl.int64).to(tl.float64, bitcast=True).to(OUT)
            if OUT == tl.float64:
                c = one / (norm + eps) * max_norm
            else:
                c = tl.div_rn(one, norm + eps) * max_norm
            tl.store(coef, tl.where(c > 1.0, 1.0, c).to(OUT))


@triton.jit(do_not_specialize=["n_chunks", "n_tensors"])
def per_tensor(
    table, n_chunks, n_tensors,  # the call's table (see the module docstring)
    partials,                       # float64 chunk partials written by norm_chunks
    out,                            # out: per-tensor statistic (ACC)
    KIND: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Statistic of tensor t (program t): its chunk partials combined in float64, in a fixed
    order as in norm_chunks; a tensor with no elements gets the identity (0, or inf for min)."""
    t = tl.program_id(0)
    first = tl.load(table + 2 * n_chunks + t)
    count = tl.load(table + 2 * n_chunks + n_tensors + t)
    s = _combine_partials(partials + first, count, KIND, BLOCK, False)
    tl.store(out + t, s.to(ACC))


@triton.jit(do_not_specialize=["n_chunks", "first_chunk"])
def scale_chunks(
    table, n_chunks, first_chunk,  # the call's table; this launch's chunks start at first_chunk
    coef,                         # a one-element float tensor on the device
    DTYPE: tl.constexpr, ACC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """x = round(x * coef) in place, the product in ACC (float32, float64 for float64 data).

    coef is read from device memory (no host sync); when coef >= 1 the program returns without
    reading or writing anything. A nan coef writes nan, as torch's multiply does.
    """
    c = tl.load(coef)
    if (c < 1.0) | (c != c):
        x_ptr, n = _chunk(table, n_chunks, first_chunk + tl.program_id(0), DTYPE, ALIGNED)
        lanes = tl.arange(0, BLOCK)
        factor = c.to(ACC)
        for start in range(0, n, BLOCK):
            if start + BLOCK <= n:  # a whole block: no mask, so that accesses are vectorized
                x = tl.load(x_ptr + start + lanes).to(ACC)
                tl.store(x_ptr + start + lanes, _round(x * factor, DTYPE))
            else:
                mask = start + lanes < n
                x = tl.load(x_ptr + start + lanes, mask=mask).to(ACC)
                tl.store(x_ptr + start + lanes, _round(x * factor, DTYPE), mask=mask)


@triton.jit(do_not_specialize=["n_chunks", "first_chunk", "lo_bits", "hi_bits"])
def clamp_chunks(
    table, n_chunks, first_chunk,  # the call's table; this launch's chunks start at first_chunk
    lo_bits: tl.int64, hi_bits: tl.int64,  # the bounds as float64 bits
    DTYPE: tl.constexpr, ACC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """x = min(max(x, lo), hi) in place, one pass, compared in ACC with the bounds rounded to
    ACC; nan stays nan (comparisons with nan are false)."""
    chunk = first_chunk + tl.program_id(0)
    x_ptr, n = _chunk(table, n_chunks, chunk, DTYPE, ALIGNED)
    lo = lo_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
    hi = hi_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
    lanes = tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK):
        if start + BLOCK <= n:  # a whole block: no mask, so that accesses are vectorized
            x = tl.load(x_ptr + start + lanes).to(ACC)
            y = tl.where(x < lo, lo, x)
            y = tl.where(y > hi, hi, y)
            tl.store(x_ptr + start + lanes, _round(y, DTYPE))
        else:
            mask = start + lanes < n
            x = tl.load(x_ptr + start + lanes, mask=mask).to(ACC)
            y = tl.where(x < lo, lo, x)
            y = tl.where(y > hi, hi, y)
            tl.store(x_ptr + start + lanes, _round(y, DTYPE), mask=mask)

