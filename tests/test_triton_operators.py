"""Backend "triton" alone: its rows of the operator table, the features on the five operators of
AGC, per-tensor clipping, gradient health and AMP run with backend "triton" (against backend
"cpu", fewer ATen operators than parameters), and the Triton tables' own rules (alignment,
CUDA-graph lifetimes, programs in any order, staging memory); on CUDA tensors, no host sync and
graph capture.

The five operators' contracts, on every backend, are in test_operator_contracts.py.

Run as tests/test_triton.py runs: without a GPU the kernels run in Triton's interpreter on CPU
tensors (marker ``triton_interpreter``), in the TRITON_INTERPRET=1 subprocess of
test_triton.py::test_interpreted_suite; on a
machine with a GPU the same cases run on CUDA tensors, compiled (marker ``cuda``).
"""

from __future__ import annotations

import gc
import math
import random
import weakref

import pytest
import torch
from torch.utils._pytree import tree_leaves

import fusedclip
from fusedclip import _ops
from helpers import (
    INTERPRETED,
    TRITON_CHUNK as CHUNK,
    assert_bitwise_equal,
    assert_norm_close,
    clone_all,
    count_aten,
    cpu,
    make_grads,
    oracle_norm,
    rand_tensor,
    scaled_by_returned_norm,
    seeded,
)
from test_operator_contracts import agc_inputs, small_calls

_IN_SUBPROCESS = "runs in the TRITON_INTERPRET=1 subprocess of test_triton.py::test_interpreted_suite"


@pytest.fixture(params=[
    pytest.param("cpu", marks=[pytest.mark.triton_interpreter, pytest.mark.skipif(not INTERPRETED, reason=_IN_SUBPROCESS)],
                 id="cpu-interpreted"),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(INTERPRETED, reason="the interpreter takes CPU tensors only")],
                 id="cuda"),
])
def device(request) -> torch.device:
    return torch.device(request.param)


def on(device: torch.device, tensors):
    """Copies on device (new tensors on the CPU too, so the originals stay as they were)."""
    return [t.to(device, copy=True) for t in tensors]


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TRITON = torch.ops.fusedclip_triton
NEW_OPERATORS = ("multi_tensor_unscale_norm", "multi_tensor_agc_", "multi_tensor_scale_per_tensor_",
                 "clip_grad_norm_with_norms_", "monitor_update_")


def test_operator_table_has_triton_kernels():
    for op in NEW_OPERATORS:
        assert "triton" in _ops.NATIVE_BACKENDS[op]
        # Called through torch.ops.fusedclip_triton by fusedclip.operators.call (the route:
        # tests/test_fast_paths.py test_triton_operators_run_through_torch_ops).
        assert _ops.KERNELS[op]["triton"] is not _ops.KERNELS[op]["torch"]
        assert _ops.operator_table()[op]["triton"] == "kernel"


# --- the features on backend "triton" ------------------------------------------------------------------------


def feature_params(device, count: int, seed: int):
    """count parameters (matrices and vectors) with grads, on device."""
    gen = seeded(seed)
    shapes = [(3, 5) if k % 2 else (int(n),) for k, n in enumerate(torch.randint(1, 40, (count,), generator=gen))]
    params = []
    for s in shapes:
        p = torch.nn.Parameter(rand_tensor(s, torch.float32, gen).to(device))
        p.grad = rand_tensor(s, torch.float32, gen, scale=3.0).to(device)
        params.append(p)
    return params


def features(count: int):
    """(name, a function of (params, backend) that runs the feature once) for the features on
    the five operators: fusedclip.AGC, GradientMonitor (its clip and its update),
    clip_grad_norm_with_norms_, PerTensorClip, and clip_grad_norm_ with a GradScaler."""
    monitors: dict = {}
    scalers: dict = {}

    def monitor(params, backend):
        if backend not in monitors:
            monitors[backend] = fusedclip.GradientMonitor([(f"p{i}", p) for i, p in enumerate(params)],
                                                          warmup_steps=2, backend=backend)
        return monitors[backend].clip_grad_norm_(0.5)

    def amp(params, backend):
        if backend not in scalers:
            scaler = torch.amp.GradScaler(params[0].device.type, init_scale=4.0)
            scalers[backend] = (torch.optim.SGD(params, lr=0.0), scaler)
            scaler.scale(torch.ones(()))  # initialises the scale, as scaler.scale(loss) does
        opt, scaler = scalers[backend]
        total = fusedclip.clip_grad_norm_(params, 0.5, grad_scaler=scaler, optimizer=opt, backend=backend)
        scaler.update()  # a few ops on the scale (scaler.step(opt) would be the optimizer's ops)
        return total

    return [
        ("AGC", lambda params, backend: fusedclip.AGC(0.05, backend=backend)(params)),
        ("GradientMonitor", monitor),
        ("clip_grad_norm_with_norms_", lambda params, backend: fusedclip.clip_grad_norm_with_norms_(
            params, 0.5, backend=backend)),
        ("PerTensorClip", lambda params, backend: fusedclip.PerTensorClip(0.5, backend=backend)(params)),
        ("clip_grad_norm_(grad_scaler=)", amp),
    ]


@pytest.mark.triton_interpreter
@pytest.mark.skipif(not INTERPRETED, reason="compares with backend 'cpu' on the same (CPU) tensors")
def test_features_on_triton_match_cpu():
    """Each feature twice on backend "triton" and on backend "cpu": the same results and grads."""
    for name, run in features(8):
        results = {}
        for backend in ("triton", "cpu"):
            params = feature_params(torch.device("cpu"), 8, seed=119)
            outputs = [run(params, backend) for _ in range(2)]
            results[backend] = (outputs, [p.grad for p in params])
        for a, b in zip(tree_leaves(results["triton"]), tree_leaves(results["cpu"])):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


COUNT = 48  # parameters


@pytest.mark.parametrize("feature", range(5), ids=[name for name, _ in features(1)])
def test_features_issue_fewer_aten_ops_than_tensors(device, monkeypatch, feature):
    """Each feature on 48 parameters with backend "triton": its fusedclip_triton operators run,
    and the whole call issues fewer ATen operators than there are parameters."""
    name, run = features(COUNT)[feature]
    params = feature_params(device, COUNT, seed=121)
    run(params, "triton")  # the tables, the monitor's state
    mode = count_aten(monkeypatch, lambda: run(params, "triton"))
    expected = {"AGC": "multi_tensor_agc_", "GradientMonitor": "monitor_update_",
                "clip_grad_norm_with_norms_": "clip_grad_norm_with_norms_",
                "PerTensorClip": "multi_tensor_scale_per_tensor_",
                "clip_grad_norm_(grad_scaler=)": "multi_tensor_unscale_norm"}[name]
    assert expected in mode.fused, mode.fused
    assert len(mode.aten) < COUNT, (name, len(mode.aten), mode.aten)


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED, reason="the interpreter takes CPU tensors only")
@pytest.mark.parametrize("feature", range(5), ids=[name for name, _ in features(1)])
def test_features_under_auto_on_cuda_issue_fewer_aten_ops_than_tensors(monkeypatch, feature):
    """What users get: each feature on 48 CUDA parameters with backend "auto" (the CUDA kernels
    when built for the GPU, else Triton's) issues fewer ATen operators than there are parameters."""
    name, run = features(COUNT)[feature]
    params = feature_params(torch.device("cuda"), COUNT, seed=122)
    run(params, "auto")  # tables, the monitor's state, compiled kernels
    mode = count_aten(monkeypatch, lambda: run(params, "auto"))
    assert len(mode.aten) < COUNT, (name, len(mode.aten), mode.aten)


# --- the tables ---------------------------------------------------------------------------------------


def test_one_unaligned_tensor_leaves_the_others_aligned():
    """A dtype's tensors that start on 16 bytes are one launch (vector loads), an odd view
    another: the launches cover every chunk once, each chunk's alignment as its launch says."""
    from fusedclip.triton import tables

    buffer = torch.zeros(CHUNK + 100)
    tensors = [torch.zeros(2 * CHUNK + 5), buffer[1:CHUNK + 1], torch.zeros(300),
               torch.zeros(7, dtype=torch.bfloat16), buffer[CHUNK + 8:CHUNK + 20]]
    table = tables.prepare(tensors, "test", writes=False, check_first=False).table
    host = table.table.cpu()
    f32 = {launch.aligned: launch for launch in table.launches if launch.dtype == torch.float32}
    assert set(f32) == {True, False} and f32[True].n_chunks == 5 and f32[False].n_chunks == 1
    covered = sorted(c for launch in table.launches for c in range(launch.first_chunk,
                                                                   launch.first_chunk + launch.n_chunks))
    assert covered == list(range(table.n_chunks))
    for launch in table.launches:
        addresses = host[launch.first_chunk:launch.first_chunk + launch.n_chunks]
        assert bool((addresses % 16 == 0).all()) == launch.aligned


def test_unaligned_tensors_norm_and_scale(device):
    buffer = on(device, make_grads([(3 * CHUNK + 50,)], torch.float32, seed=122))[0]
    grads = [buffer[:CHUNK + 3], buffer[CHUNK + 4:2 * CHUNK + 9], buffer[2 * CHUNK + 12:2 * CHUNK + 40]]
    originals = clone_all(cpu(grads))
    truth = oracle_norm(originals, 2.0)
    total = TRITON.clip_grad_norm_(grads, 0.5 * truth, 2.0)
    assert_norm_close(total.cpu(), truth, 1e-5)
    assert_bitwise_equal(cpu(grads), scaled_by_returned_norm(originals, total.cpu(), 0.5 * truth))


def test_captured_operands_live_as_long_as_their_graph(monkeypatch):
    """The operands a captured graph reads are kept by that graph (weakly keyed), released with
    it; where the graph cannot be known they are kept for the process's life."""
    from fusedclip.triton import tables

    class Graph:
        pass

    class Held:
        pass

    capturing, held = [Graph()], Held()
    monkeypatch.setattr(tables, "_capturing_graph", lambda: capturing[0])
    tables.keep_for_graph(held)
    assert tables.captured_operands(capturing[0]) == [held]
    kept = weakref.ref(held)
    del held
    gc.collect()
    assert kept() is not None
    capturing.clear()  # the graph dies
    gc.collect()
    assert kept() is None
    monkeypatch.setattr(tables, "_capturing_graph", lambda: None)
    monkeypatch.setattr(tables, "_captured_without_graph", [])
    tables.keep_for_graph(Held())
    assert len(tables._captured_without_graph) == 1


def test_staging_regions_for_tables_built_during_capture():
    """Pinned memory is reserved outside any capture (a region at least as large as each table
    built eagerly), taken by tables built during capture, and given back when they die; with
    none large enough, a clear error before anything is captured."""
    from fusedclip.triton import tables

    staging = tables._Staging(lambda n: torch.zeros(n, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="warm-up"):
        staging.take(10)
    staging.reserve(10)
    host = torch.arange(10)
    table, region = tables.staged_copy(host, torch.device("cpu"), staging)
    assert torch.equal(table, host) and torch.equal(region, host) and table.data_ptr() != region.data_ptr()
    rest, _ = staging.take(staging.ARENA - 10)
    with pytest.raises(RuntimeError, match="CUDA graph capture"):
        staging.take(1)
    first = region.data_ptr()
    del table
    gc.collect()
    again, _ = staging.take(10)
    assert again.data_ptr() == first
    staging.reserve(3 * staging.ARENA)
    assert staging.take(3 * staging.ARENA)[0].numel() == 3 * staging.ARENA


@pytest.mark.triton_interpreter
@pytest.mark.skipif(not INTERPRETED, reason="patches the interpreter's grid")
def test_programs_in_any_order_give_the_same_bits(monkeypatch):
    """The interpreter runs programs in id order, so the program that finishes a norm is always
    the last one; here they run in a random order (every launch its own), and every operator
    that takes tickets or sums in a later launch gives the same bits."""
    from triton.runtime import interpreter

    def run_all():
        dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float32]
        grads = make_grads([(3 * CHUNK + 5,), (2 * CHUNK + 1,), (100,), (CHUNK,)], dtypes, seed=123)
        outputs = [TRITON.multi_tensor_norm(grads, p, True) for p in (2.0, -math.inf)]
        outputs.append(TRITON.multi_tensor_unscale_norm(grads, torch.tensor(0.25), 2.0))
        outputs += [TRITON.clip_grad_norm_with_norms_(grads, 1.0, 2.0), grads]
        agc_grads, agc_params = agc_inputs([(3, CHUNK + 7), (2 * CHUNK + 3,), (9, 40)], torch.float32,
                                           torch.float32, seed=124)
        return outputs + [TRITON.multi_tensor_agc_(agc_grads, agc_params, 0.05, 1e-3), agc_grads]

    expected = run_all()
    builder = interpreter.interpreter_builder
    set_grid_dim, set_grid_idx = builder.set_grid_dim, builder.set_grid_idx
    gen, orders = random.Random(0), []

    def shuffled_dim(nx, ny, nz):
        orders.append(gen.sample(range(nx), nx))
        set_grid_dim(nx, ny, nz)

    monkeypatch.setattr(builder, "set_grid_dim", shuffled_dim)
    monkeypatch.setattr(builder, "set_grid_idx", lambda x, y, z: set_grid_idx(orders[-1][x], y, z))
    got = run_all()
    assert any(order[-1] != len(order) - 1 for order in orders)  # another program finished
    assert_bitwise_equal(tree_leaves(got), tree_leaves(expected))


# --- CUDA only ---------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED, reason="the interpreter takes CPU tensors only")
def test_operators_are_sync_free():
    cuda = torch.device("cuda")
    for name, args, _ in small_calls(cuda, seed=125, count=40):
        getattr(TRITON, name)(*args)  # compiles, caches the tables
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            getattr(TRITON, name)(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED, reason="the interpreter takes CPU tensors only")
def test_operators_in_a_cuda_graph():
    """Each operator captured on tensors never used before (its table built during capture,
    from staging memory) replays as it runs eagerly on other tensors of the same values; the
    graph keeps its operands."""
    from fusedclip.triton import tables

    cuda = torch.device("cuda")
    eager = small_calls(cuda, seed=126, count=5)  # the same values in other tensors
    for (name, args, written), (_, eager_args, eager_written) in zip(small_calls(cuda, seed=126, count=5), eager):
        expected = getattr(TRITON, name)(*eager_args)  # compiles; reserves staging memory
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = getattr(TRITON, name)(*args)
        held = tables.captured_operands(graph) or tables._captured_without_graph
        if name != "monitor_update_":  # the one without a table
            assert held and not any(o is h for o in tables._cache.values() for h in held)
        graph.replay()
        torch.cuda.synchronize()
        assert_bitwise_equal(cpu(written), cpu(eager_written))
        assert_bitwise_equal(cpu(tree_leaves(out)), cpu(tree_leaves(expected)))
