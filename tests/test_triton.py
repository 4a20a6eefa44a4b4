"""Backend "triton": what the Triton kernels alone do (the operator contracts they share with the
other backends are in test_ops.py, the public API's in test_norms.py, test_api.py, test_compile.py
and test_optim.py, all over the ``backend`` fixture): the interpreted run, the table cache and
its key, spans and copies of non-contiguous grads, float64 pow, refusals, CUDA graphs and
streams, and what the compiler makes of the kernels.

Without a GPU the kernels run in Triton's interpreter on CPU tensors, which needs
TRITON_INTERPRET=1 in the environment before triton is imported. A plain ``pytest tests`` run
therefore runs every case of the suite marked ``triton_interpreter`` (backend "triton" on CPU
tensors: this file's and the shared contracts') in a subprocess started with the variable
(test_interpreted_suite, which fails when any of them fails); in that subprocess they run
directly. On a machine with a GPU the same cases run on CUDA tensors, compiled (marker ``cuda``).
To run the interpreted cases by hand:
``TRITON_INTERPRET=1 python -m pytest -m triton_interpreter tests``.

triton is a test dependency: without it this file fails to import, it is never skipped.
"""

from __future__ import annotations

import collections
import gc
import math
import os
import subprocess
import sys

import pytest
import torch
import triton  # noqa: F401  (a test dependency: missing, the suite fails here)

import fusedclip
from fusedclip import _backends, _ops
from helpers import (
    INTERPRETED,
    InterpretedSuite,
    TRITON_CHUNK as CHUNK,
    Backend,
    assert_bitwise_equal,
    assert_norm_close,
    clone_all,
    cpu,
    make_grads,
    oracle_norm,
    oracle_statistic,
    params_with,
    scaled_by_returned_norm,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CUDA = Backend("triton", torch.device("cuda"))  # the CUDA-only cases (marker ``cuda``)
# Odd sizes, zero-size tensors, and sizes on both sides of a chunk.
SHAPES = [(37,), (0,), (8, 129), (CHUNK - 1,), (CHUNK,), (1,), (3, 0), (CHUNK + 1,), (5, 7)]


# --- the subprocess ---------------------------------------------------------------------------------


@pytest.mark.skipif(INTERPRETED, reason="this is the subprocess")
def test_interpreted_suite():
    """Every ``triton_interpreter`` case of the suite (backend "triton" on CPU tensors: this
    file's and the shared contracts' of test_ops.py and the API tests) under TRITON_INTERPRET=1,
    which must be set before triton is imported, as this process has done already."""
    returncode, stdout, stderr = InterpretedSuite.result()  # started by conftest.py with the run
    assert returncode == 0, f"{stdout[-20000:]}\n{stderr[-5000:]}"
    assert " passed" in stdout and " failed" not in stdout, stdout[-2000:]
    assert " error" not in stdout, stdout[-2000:]


@pytest.mark.triton_interpreter  # also in the interpreted run, where it checks the other branch
def test_backend_status_and_resolution():
    assert fusedclip.backend_status()["triton"] is None
    assert "triton" in fusedclip.available_backends()
    assert _backends.resolve_backend("auto", torch.device("cpu")) == "cpu"
    if INTERPRETED:
        assert _backends.resolve_backend("triton", torch.device("cpu")) == "triton"
    else:
        with pytest.raises(ValueError, match="backend 'triton' cannot run these gradients.*"
                                             "TRITON_INTERPRET=1"):
            fusedclip.get_total_norm([torch.randn(3)], backend="triton")


def test_import_without_triton():
    code = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton is hidden by the test")
sys.meta_path.insert(0, _Block())
import torch, fusedclip
reason = fusedclip.backend_status()["triton"]
assert reason is not None and "hidden by the test" in reason, reason
assert "triton" not in fusedclip.available_backends()
try:
    fusedclip.get_total_norm([torch.randn(3)], backend="triton")
except RuntimeError as error:
    assert "backend 'triton' is not available" in str(error), error
else:
    raise AssertionError("backend='triton' did not raise")
print(float(fusedclip.get_total_norm([torch.ones(4)])))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ), timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2.0"


# --- operators ---------------------------------------------------------------------------------------


def test_more_chunks_than_the_final_reduction_block(triton_backend):
    """1,100 chunks: the last program's reduction loops over its 1,024 lanes twice."""
    grads = make_grads([(3,)] * 1100, torch.float32, seed=8)
    for norm_type in (2.0, -math.inf):
        total, _ = torch.ops.fusedclip_triton.multi_tensor_norm(triton_backend.on(grads), norm_type)
        assert_norm_close(total.cpu(), oracle_norm(grads, norm_type) ** (2 if norm_type == 2.0 else 1), 1e-5)


# --- spans and copies, float64 pow, the table cache, refusals ------------------------------------


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_dense_non_contiguous_grads_are_spans(triton_backend, layout):
    """A grad that fills its memory exactly once (channels_last, transposed) is one flat span:
    never copied, its table cached, left bit for bit when nothing is clipped, and clipped in
    place when it is."""
    from fusedclip.triton import tables as triton_tables

    base = triton_backend.on(make_grads([(3, 5, 4, 7), (CHUNK + 9, 3)], torch.float32, seed=40))
    if layout == "channels_last":
        grads = [base[0].to(memory_format=torch.channels_last), base[1].t().contiguous().t()]
    else:
        grads = [base[0].permute(3, 1, 0, 2), base[1].t()]
    assert not any(g.is_contiguous() for g in grads)
    operands = triton_tables.prepare(grads, "test", writes=True)
    assert not operands.write_back and not operands.temporaries
    originals = clone_all(grads)
    truth = oracle_norm(cpu(originals), 2.0)
    total = fusedclip.clip_grad_norm_(params_with(grads), 2.0 * truth, backend="triton")
    assert_norm_close(total.cpu(), truth, 1e-5)
    assert_bitwise_equal(cpu(grads), cpu(originals))
    cached = len(triton_tables._cache)
    total = fusedclip.clip_grad_norm_(params_with(grads), 0.5 * truth, backend="triton")
    assert len(triton_tables._cache) == cached  # the same list: a hit
    assert_bitwise_equal(cpu(grads), scaled_by_returned_norm(cpu(originals), total.cpu(), 0.5 * truth))


def test_strided_grads_copied_once_and_values_kept_when_not_clipped(triton_backend, monkeypatch):
    """A truly strided grad goes through one contiguous copy per clip (the norm reads what the
    scale writes); when nothing is clipped the copy written back holds the same bits."""
    base = triton_backend.on(make_grads([(3 * CHUNK + 6,)], torch.bfloat16, seed=41))[0]
    grads = [base[::3], triton_backend.on(make_grads([(100,)], torch.bfloat16, seed=42))[0]]
    originals = clone_all(grads)
    whole = base.clone()
    truth = oracle_norm(cpu(originals), 2.0)
    copies = []
    contiguous = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous",
                        lambda self, *a, **k: copies.append(self) or contiguous(self, *a, **k))
    torch.ops.fusedclip_triton.clip_grad_norm_(grads, 2.0 * truth, 2.0)
    assert len(copies) == 1
    assert_bitwise_equal(cpu([base]), cpu([whole]))
    total = torch.ops.fusedclip_triton.clip_grad_norm_(grads, 0.5 * truth, 2.0)
    assert_bitwise_equal(cpu(grads), scaled_by_returned_norm(cpu(originals), total.cpu(), 0.5 * truth))
    assert_bitwise_equal(cpu([base[1::3], base[2::3]]), cpu([whole[1::3], whole[2::3]]))


@pytest.mark.parametrize("norm_type", [3.5, 0.5, -1.5, 1.25])
def test_general_p_matches_float64_oracle(triton_backend, norm_type):
    """|x|^p and the root in float64 (pow): float64 data within 1e-13 of the float64 oracle, and
    float32 data (subnormals included) within float32's own rounding."""
    grads = make_grads([(CHUNK + 5,), (300,)], torch.float64, seed=44, scale=3.0)
    truth = oracle_norm(grads, norm_type)
    total = torch.ops.fusedclip_triton.clip_grad_norm_(triton_backend.on(grads), 1e300, norm_type)
    assert float(total) == pytest.approx(truth, rel=1e-13, abs=0)
    grads = make_grads([(CHUNK + 5,), (300,)], torch.float32, seed=46)
    if 0 < norm_type < 1:  # sums of |x|^p of subnormals (|x| ~ 1e-39) stay normal floats
        grads.append(make_grads([(2000,)], torch.float32, seed=45)[0] * 1e-39)
    per_truth = [oracle_statistic(g, norm_type) for g in grads]
    _, per = torch.ops.fusedclip_triton.multi_tensor_norm(triton_backend.on(grads), norm_type, True)
    for value, want in zip(per.tolist(), per_truth):
        assert value == pytest.approx(want, rel=2e-7, abs=0)
    total = torch.ops.fusedclip_triton.clip_grad_norm_(triton_backend.on(grads), 1e30, norm_type)
    assert float(total) == pytest.approx(oracle_norm(grads, norm_type), rel=2e-7, abs=0)


def test_table_cache_follows_addresses(triton_backend):
    """A list seen before reuses its table; new tensors at other addresses get their own."""
    from fusedclip.triton import tables as triton_tables

    grads = triton_backend.on(make_grads([(100,), (CHUNK + 1,)], torch.float32, seed=19))
    first = float(fusedclip.get_total_norm(grads, backend="triton"))
    cached = len(triton_tables._cache)
    assert float(fusedclip.get_total_norm(grads, backend="triton")) == first
    assert len(triton_tables._cache) == cached
    for seed in range(3):
        other = triton_backend.on(make_grads([(100,), (CHUNK + 1,)], torch.float32, seed=20 + seed))
        assert_norm_close(fusedclip.get_total_norm(other, backend="triton").cpu(),
                          oracle_norm(cpu(other), 2.0), 1e-5)


@pytest.mark.parametrize("native", [True, False], ids=["tensor_spans", "python"])
def test_cache_key_tells_apart_what_changes_the_operands(native, monkeypatch):
    """The table cache's key, read by fusedclip::tensor_spans (csrc/cpu/tensor_spans.cpp) or in
    Python: equal for lists whose operands are the same (a dense tensor is one span whatever its
    strides), different when an address, a size, a dtype or the density differs; no key (so no
    hit, which would skip the checks) for a tensor without an address or an inference tensor to
    write outside inference mode."""
    from fusedclip.triton import tables as triton_tables

    if native and not triton_tables._native_spans():
        pytest.skip("fusedclip._C is not loaded")
    monkeypatch.setattr(triton_tables, "_has_native_spans", native)

    def key(tensors, writes=False):
        return triton_tables.key_of(tensors, writes)

    a = torch.randn(3, 4)
    z = torch.randn(8)
    b = torch.randn(5).to(torch.bfloat16)
    assert key([a, b]) == key([a, b]) and key([a, b]) != key([b, a])
    assert key([a]) == key([a.t()]) == key([a.view(12)])  # dense: one span, any strides
    assert key([a]) != key([a[:, ::2]])  # fewer elements, not dense
    assert key([z[:4]]) != key([z[::2]])  # same address and size: dense against strided
    assert key([z[:4]]) != key([z.view(torch.int32)[:4]])  # same span, another dtype
    assert key([z[:4]]) != key([z[1:5]])  # another address
    assert key([a], writes=True) != key([a], writes=False)
    with torch.inference_mode():
        frozen = torch.randn(4)
        assert key([a, frozen], writes=True) is not None  # written inside inference mode: allowed
    assert key([a, frozen], writes=True) is None
    assert key([a, frozen], writes=False) is not None
    assert key([a, torch.ones(3).to_sparse()]) is None
    if native:
        spans = torch.ops.fusedclip.tensor_spans.default([a, z[::2], torch.empty(0)]).tolist()
        assert [s[0] for s in spans[:2]] == [a.data_ptr(), z.data_ptr()]
        assert [(s[1] >> 16, s[1] & 1) for s in spans] == [(12, 1), (4, 0), (0, 1)]


def test_cache_hit_skips_checks_and_table(triton_backend, monkeypatch):
    """A list seen before takes its operands from the cache: nothing is checked or built."""
    from fusedclip.triton import tables as triton_tables

    # An empty cache: a table depends only on addresses, sizes and dtypes, so an earlier test's
    # list at the same (reused) addresses would otherwise make the last call below a hit.
    monkeypatch.setattr(triton_tables, "_cache", collections.OrderedDict())
    grads = triton_backend.on(make_grads([(100,), (CHUNK + 1,), (7, 3)], torch.float32, seed=47))
    first = torch.ops.fusedclip_triton.multi_tensor_norm(grads, 2.0)[0]

    def refuse(*args, **kwargs):
        raise AssertionError("operands built on a cache hit")

    monkeypatch.setattr(triton_tables, "prepare", refuse)
    assert torch.equal(torch.ops.fusedclip_triton.multi_tensor_norm(grads, 2.0)[0], first)
    with pytest.raises(AssertionError, match="cache hit"):  # another list: a miss
        torch.ops.fusedclip_triton.multi_tensor_norm(grads[:2], 2.0)


def test_bad_input_raises_before_writing(triton_backend):
    device = triton_backend.device
    grads = triton_backend.on(make_grads([(10,), (5,)], torch.float32, seed=21))
    originals = clone_all(grads)
    expanded = torch.randn(1, device=device).expand(4)
    # Refused as the C++ operators refuse (csrc/tensor_checks.h): TypeError for what the kernels
    # do not take, ValueError for what they cannot write; RuntimeError would mean "maybe written".
    with pytest.raises(ValueError, match="internally overlapping"):
        torch.ops.fusedclip_triton.multi_tensor_scale_(grads + [expanded], torch.tensor(0.5, device=device))
    with pytest.raises(TypeError, match="complex"):
        torch.ops.fusedclip_triton.multi_tensor_clamp_(grads + [torch.randn(3, dtype=torch.complex64, device=device)], -1.0, 1.0)
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.fusedclip_triton.clip_grad_norm_(grads + [torch.ones(3, dtype=torch.int32, device=device)], 0.1, 2.0)
    with pytest.raises(TypeError, match="layout"):  # no address: the cache key refuses it too
        torch.ops.fusedclip_triton.clip_grad_norm_(grads + [torch.ones(3, device=device).to_sparse()], 0.1, 2.0)
    with pytest.raises(ValueError, match="norm_type must not be nan"):
        torch.ops.fusedclip_triton.clip_grad_norm_(grads, 0.1, float("nan"))
    with pytest.raises(ValueError, match="max_norm"):
        fusedclip.clip_grad_norm_(params_with(grads), -1.0, backend="triton")
    assert_bitwise_equal(cpu(grads), cpu(originals))


# --- CUDA only -------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED, reason="the interpreter takes CPU tensors only")
def test_clip_in_a_cuda_graph():
    source = make_grads(SHAPES, torch.float32, seed=24)
    grads = CUDA.on(source)
    params = params_with(grads)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up off the default stream, as capture requires
            fusedclip.clip_grad_norm_(params, 0.1, backend="triton")
    torch.cuda.current_stream().wait_stream(stream)
    from fusedclip.triton import tables as triton_tables

    warmed = list(triton_tables._cache.values())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total = fusedclip.clip_grad_norm_(params, 0.1, backend="triton")
    held = triton_tables.captured_operands(graph) or triton_tables._captured_without_graph
    assert any(held[-1] is o for o in warmed)  # the warm-up's table
    for seed in range(triton_tables._CACHE_SIZE + 4):  # evicts it from the cache; reuses memory
        other = CUDA.on(make_grads([(100,), (CHUNK + 3,)], torch.float32, seed=200 + seed))
        fusedclip.get_total_norm(other, backend="triton")
    for scale in (1.0, 3.0, 1e-9):  # clips, clips, does not clip
        inputs = [s * scale for s in source]
        for g, s in zip(grads, inputs):
            g.copy_(s)
        graph.replay()
        torch.cuda.synchronize()
        truth = oracle_norm(inputs, 2.0)
        assert_norm_close(total.cpu(), truth, 1e-5)
        assert_bitwise_equal(cpu(grads), scaled_by_returned_norm(inputs, total.cpu(), 0.1))


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED, reason="the interpreter takes CPU tensors only")
def test_cuda_graph_tables_outlive_the_cache():
    """A graph captured on grads never used before builds their table during capture (copied
    at each replay from staging memory reserved before the capture): kept apart (the cache is
    untouched), kept by the graph, it still replays correctly after the cache has turned over,
    and its staging region is given back with the graph."""
    from fusedclip.triton import tables as triton_tables

    source = make_grads(SHAPES, torch.float32, seed=48)
    warm_up = CUDA.on(source)  # kept alive: the grads below cannot take their addresses
    fusedclip.clip_grad_norm_(params_with(warm_up), 0.1, backend="triton")  # compiles, reserves staging
    torch.cuda.synchronize()
    grads = CUDA.on(source)
    params = params_with(grads)
    cached = dict(triton_tables._cache)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total = fusedclip.clip_grad_norm_(params, 0.1, backend="triton")
    assert triton_tables._cache.keys() == cached.keys()
    held = triton_tables.captured_operands(graph) or triton_tables._captured_without_graph[-1:]
    assert len(held) == 1 and not any(held[0] is o for o in cached.values())  # built during capture
    region = held[0].table.host_copy
    assert region.is_pinned() and any(region.data_ptr() >= a.data_ptr() and
                                      region.data_ptr() < a.data_ptr() + a.numel() * 8
                                      for a in triton_tables._staging._arenas)
    for seed in range(triton_tables._CACHE_SIZE + 4):  # evicts every entry; reuses freed memory
        other = CUDA.on(make_grads([(100,), (CHUNK + 3,)], torch.float32, seed=100 + seed))
        fusedclip.get_total_norm(other, backend="triton")
    for scale in (1.0, 1e-9):  # clips, does not clip
        inputs = [s * scale for s in source]
        for g, s in zip(grads, inputs):
            g.copy_(s)
        graph.replay()
        torch.cuda.synchronize()
        assert_norm_close(total.cpu(), oracle_norm(inputs, 2.0), 1e-5)
        assert_bitwise_equal(cpu(grads), scaled_by_returned_norm(inputs, total.cpu(), 0.1))
    if triton_tables.captured_operands(graph):  # a torch that names the capturing graph
        free = len(triton_tables._staging._free)
        del graph, held, region
        gc.collect()
        assert len(triton_tables._staging._free) == free + 1


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED, reason="the interpreter takes CPU tensors only")
def test_tables_are_per_stream():
    """The first use of a list on another stream builds that stream's own table (ordered after
    its own copy), and gives the same result."""
    from fusedclip.triton import tables as triton_tables

    grads = CUDA.on(make_grads(SHAPES, torch.float32, seed=49))
    first = fusedclip.get_total_norm(grads, backend="triton")
    cached = len(triton_tables._cache)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        second = fusedclip.get_total_norm(grads, backend="triton")
    torch.cuda.current_stream().wait_stream(stream)
    assert len(triton_tables._cache) == min(cached + 1, triton_tables._CACHE_SIZE)
    assert torch.equal(first, second)


# The kernels' size arguments (never specialized) and their int64 arguments besides float64 bits.
SIZE_ARGS = ("n_chunks", "first_chunk", "n_tensors", "index", "n_partials", "coef_stride", "n_pieces",
             "first_piece", "n_parts", "n_long", "n", "warmup_steps", "vanish_steps")
INT64_ARGS = ("warmup_steps", "vanish_steps")


def _all_kernels():
    from fusedclip.triton import kernels

    return (kernels.norm_chunks, kernels.per_tensor, kernels.scale_chunks, kernels.clamp_chunks,
            kernels.agc_pieces, kernels.agc_long_rows, kernels.monitor_update)


@pytest.mark.skipif(INTERPRETED, reason="reads the compiled kernels' parameters")
def test_kernel_scalars_compile_one_variant():
    """Sizes and float64 bit patterns never specialize a kernel (an int 1 or a multiple of 16
    would), and the bits are typed int64 whatever their value (0.0's bits would be int32)."""
    for fn in _all_kernels():
        for param in fn.params:
            if param.name in SIZE_ARGS or param.name.endswith("_bits"):
                assert param.do_not_specialize, (fn, param.name)
            if param.name.endswith("_bits") or param.name in INT64_ARGS:
                assert param.annotation_type == "i64", (fn, param.name)


# --- compiled for a GPU, without one ------------------------------------------------------------------


@pytest.mark.skipif(INTERPRETED, reason="compiles the kernels; the interpreter has no compiler")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_kernels_compile_for_sm90():
    """Every kernel compiles (Triton's own ptxas, no GPU needed) for an H100's sm_90 in the
    variants the launchers use; whole blocks of aligned bf16 are loaded and stored 16 bytes at a
    time (the norm, its unscaled form, the scales, AGC's rows); general p takes float64 pow; and
    GradientMonitor's update, compiled as fusedclip_triton::monitor_update_ compiles it, has no fused multiply-add
    (which it would have with fusion on)."""
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fusedclip.triton import kernels

    fixed = {"table": "*i64", "partials": "*fp64", "ticket": "*i32", "inv_scale": "*fp32", "found_inf": "*fp32",
             "unit_sq": "*fp64", "parts": "*fp64", "coefs": "*fp64", "count": "*i64", "below": "*i64",
             "explosions": "*i64", "exploding": "*i1", "vanishing": "*i1"}

    def compile_kernel(fn, acc, fp_fusion=True, **constexprs):
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_bits") or name in INT64_ARGS:
                signature[name] = "i64"
            elif name in fixed:
                signature[name] = fixed[name]
            elif name in ("statistic", "total_norm", "coef", "out", "norms", "mean", "var"):
                signature[name] = "*fp64" if acc == tl.float64 else "*fp32"
            else:
                assert name in SIZE_ARGS, name
                signature[name] = "i32"
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        options = {"num_warps": 8, "enable_fp_fusion": fp_fusion}
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)

    for dtype in (tl.float32, tl.float64, tl.float16, tl.bfloat16):
        acc = tl.float64 if dtype == tl.float64 else tl.float32
        for aligned in (False, True):
            vector = dtype == tl.bfloat16 and aligned
            for per_tensor in (False, True):
                compiled = compile_kernel(kernels.scale_chunks, acc, DTYPE=dtype, ACC=acc, ALIGNED=aligned,
                                          BLOCK=2048, PER_TENSOR=per_tensor)
                assert not vector or "st.global.v4.b32" in compiled.asm["ptx"], per_tensor
            compiled = compile_kernel(kernels.clamp_chunks, acc, DTYPE=dtype, ACC=acc, ALIGNED=aligned, BLOCK=2048)
            assert not vector or "st.global.v4.b32" in compiled.asm["ptx"]
            for pdtype in {dtype, tl.float32}:  # a parameter may have another dtype than its grad
                pacc = tl.float64 if pdtype == tl.float64 else tl.float32
                compiled = compile_kernel(kernels.agc_pieces, acc, DTYPE=dtype, ACC=acc, PDTYPE=pdtype, PACC=pacc,
                                          ALIGNED=aligned, BLOCK=2048)
                if vector:
                    assert "ld.global.v4.b32" in compiled.asm["ptx"] and "st.global.v4.b32" in compiled.asm["ptx"]
        for out in {acc, tl.float64}:  # a float64 tensor in the list makes the output float64
            for kind in range(6):
                for unscale in (False, True) if out == acc else (False,):  # unscaled: one output dtype
                    norm = compile_kernel(kernels.norm_chunks, out, DTYPE=dtype, ACC=acc, OUT=out,
                                          KIND=kind, FINISH=not unscale, UNSCALE=unscale, ALIGNED=True,
                                          BLOCK=2048, FINAL_BLOCK=1024)
                    if dtype == tl.bfloat16:
                        assert "ld.global.v4.b32" in norm.asm["ptx"], (kind, unscale)
                    if kind == kernels.POWER_SUM.value:  # |x|^p and the root: float64 pow
                        assert "__nv_pow" in norm.asm["llir"] and "lg2.approx" not in norm.asm["ptx"]
    for acc in (tl.float32, tl.float64):
        for kind in range(6):
            for root in (False, True):
                compile_kernel(kernels.per_tensor, acc, KIND=kind, ACC=acc, ROOT=root, TOTAL=False, BLOCK=1024)
        compile_kernel(kernels.per_tensor, acc, KIND=kernels.SQUARE_SUM.value, ACC=acc, ROOT=False, TOTAL=True,
                       BLOCK=1024)  # AGC's sums
        for has_explode in (False, True):
            monitor = compile_kernel(kernels.monitor_update, acc, fp_fusion=False, T=acc, HAS_EXPLODE=has_explode,
                                     BLOCK=1024)
            assert "fma.rn" not in monitor.asm["ptx"], has_explode
        fused = compile_kernel(kernels.monitor_update, acc, T=acc, HAS_EXPLODE=True, BLOCK=1024)
        assert "fma.rn" in fused.asm["ptx"]  # the check above can fail
    compile_kernel(kernels.agc_long_rows, tl.float64, BLOCK=1024)
