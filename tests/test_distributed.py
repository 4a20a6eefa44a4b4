"""Distributed clipping with real processes on gloo (world sizes 2 and 4).

Starting processes is the expensive part (each imports torch), so one group of processes per
world size runs every case below in turn and writes, per rank, which cases failed and why; each
pytest test then checks one case on every rank. Every rank builds the *global* data from the same
seed, so the single-process float64 oracle (helpers.oracle_norm) sees exactly what the ranks
hold between them.

A case that fails on some ranks only can leave the others waiting in a collective: the groups
time out (gloo's timeout) and the whole run is bounded, so a bug fails the tests, never hangs.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import fusedclip
from fusedclip import ddp as fddp
from fusedclip import distributed as fd


def world():
    """The default group (read after init_process_group, in the ranks)."""
    return dist.group.WORLD

from helpers import (
    assert_norm_close,
    assert_scaled_like_oracle,
    expected_dtype,
    make_grads,
    oracle_coef,
    oracle_norm,
    params_with,
    seeded,
)

# 3.5 and -2 exercise the root; "inf" the string form.
NORM_TYPES = (2.0, 1.0, 3.5, 0.0, math.inf, -math.inf, -2.0, "inf")
WORLD_SIZES = (2, 4)
CASE_TIMEOUT_S = 60  # gloo collectives give up after this
RUN_TIMEOUT_S = 420  # a whole world size, start-up included

CASES = {}  # gloo, every world size
NCCL_CASES = {}  # NCCL, one GPU


CASE_WORLD_SIZES = {}  # a case run at some world sizes only


def case(fn=None, *, world_sizes=WORLD_SIZES):
    def register(fn):
        CASES[fn.__name__] = fn
        CASE_WORLD_SIZES[fn.__name__] = world_sizes
        return fn

    return register(fn) if fn is not None else register


def nccl_case(fn):
    NCCL_CASES[fn.__name__] = fn
    return fn


def rtol_of(dtypes, norm_type) -> float:
    if all(d == torch.float64 for d in dtypes):
        return 1e-10
    p = float(norm_type)
    return 1e-5 if p in (0.0, 1.0, 2.0) or math.isinf(p) else 1e-4


def whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor made whole (for checks), a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, fusedclip._core.dtensor_type() or ()) else t


# --- process groups -------------------------------------------------------------------------------

DTYPES = (torch.float32, torch.bfloat16, torch.float64, torch.float16, torch.float32)
SHAPES = [(7, 5), (0,), (1000,), (3, 0), (1,), (64, 33), (9,), (2, 2, 3), (17,), (5,)]


def global_grads(seed=0, dtypes=(torch.float32,)):
    """The grads of the whole model (every rank builds the same), dtypes in turn."""
    dts = [dtypes[i % len(dtypes)] for i in range(len(SHAPES))]
    return make_grads(SHAPES, dts, seed=seed)


def my_share(items, rank, world_size, skip_last_rank=False):
    """Disjoint shares of items: i goes to rank i % n (n ranks, the last one left out if asked)."""
    n = world_size - 1 if skip_last_rank else world_size
    return [x for i, x in enumerate(items) if i % n == rank] if rank < n else []


@case
def process_group_every_norm_type(rank, world_size):
    for backend in ("cpu", "torch"):
        for dtypes in ((torch.float32,), DTYPES):
            grads = global_grads(seed=1, dtypes=dtypes)
            for norm_type in NORM_TYPES:
                rtol = rtol_of(dtypes, norm_type)
                expected = oracle_norm(grads, norm_type)
                mine = my_share(grads, rank, world_size)
                total = fusedclip.get_total_norm(
                    mine, norm_type, process_group=world(), backend=backend
                )
                assert_norm_close(total, expected, rtol)
                assert total.dtype == expected_dtype([g.dtype for g in mine])
                for max_norm in (0.5 * expected if expected else 1.0, 2.0 * expected + 1.0):
                    local = [g.clone() for g in mine]
                    total = fusedclip.clip_grad_norm_(
                        params_with(local), max_norm, norm_type,
                        process_group=world(), backend=backend,
                    )
                    assert_norm_close(total, expected, rtol)
                    assert_scaled_like_oracle(local, mine, expected, max_norm, rtol)


@case
def ranks_without_grads(rank, world_size):
    grads = global_grads(seed=2)
    for norm_type in NORM_TYPES:
        expected = oracle_norm(grads, norm_type)
        # The last rank has none; then only rank 0 has any.
        for mine in (
            my_share(grads, rank, world_size, skip_last_rank=True),
            grads if rank == 0 else [],
        ):
            total = fusedclip.get_total_norm(mine, norm_type, process_group=world())
            assert_norm_close(total, expected, rtol_of([torch.float32], norm_type))
            params = params_with([g.clone() for g in mine] + [None])
            total = fusedclip.clip_grad_norm_(params, 1.0, norm_type, process_group=world())
            assert_norm_close(total, expected, rtol_of([torch.float32], norm_type))
            assert_scaled_like_oracle(
                [p.grad for p in params[:-1]], mine, expected, 1.0, rtol_of(DTYPES[:1], norm_type)
            )
        # No grads anywhere, or only empty ones: the norm of no elements is 0, whatever p.
        for mine in ([], [torch.zeros(0)] if rank % 2 else []):
            total = fusedclip.get_total_norm(mine, norm_type, process_group=world())
            assert float(total) == 0.0 and total.dtype == torch.float32, (norm_type, total)
            params = params_with(mine)
            total = fusedclip.clip_grad_norm_(params, 1.0, norm_type, process_group=world())
            assert float(total) == 0.0, (norm_type, total)


@case
def nonfinite_on_one_rank(rank, world_size):
    # On each rank in turn: a MAX or MIN all-reduce need not propagate nan whatever its place.
    for bad, owner in [(b, r) for b in (math.nan, math.inf) for r in range(world_size)]:
        for norm_type in (2.0, 1.0, math.inf, -math.inf, 0.0, 3.5):
            grads = global_grads(seed=3)
            index = next(i for i, g in enumerate(grads) if i % world_size == owner and g.numel())
            grads[index].view(-1)[0] = bad
            expected = oracle_norm(grads, norm_type)
            mine = my_share(grads, rank, world_size)
            total = fusedclip.get_total_norm(mine, norm_type, process_group=world())
            assert_norm_close(total, expected, 1e-4)
            if not math.isfinite(expected):  # every rank raises, none is left waiting
                with pytest.raises(RuntimeError, match="non-finite"):
                    fusedclip.clip_grad_norm_(
                        params_with(mine), 1.0, norm_type, error_if_nonfinite=True,
                        process_group=world(),
                    )


@case
def bad_arguments_raise_before_any_collective(rank, world_size):
    grads = my_share(global_grads(seed=4), rank, world_size)
    originals = [g.clone() for g in grads]
    params = params_with(grads)
    with pytest.raises(TypeError, match=r"process_group\[1\]"):
        fusedclip.clip_grad_norm_(params, 0.01, process_group=[dist.group.WORLD, "world"])
    with pytest.raises(ValueError, match=r"process_group\[1\] repeats"):  # would count twice
        fusedclip.get_total_norm(grads, process_group=[world(), world()])
    # new_group on a rank outside the group returns GroupMember.NON_GROUP_MEMBER (-100)
    first_only = dist.new_group([0])
    if rank != 0:
        for value in (first_only, [world(), first_only]):
            with pytest.raises(ValueError, match="not a member of"):
                fusedclip.clip_grad_norm_(params, 0.01, process_group=value)
    sparse = torch.randn(4).to_sparse()
    with pytest.raises(TypeError, match="layout"):
        fusedclip.clip_grad_norm_(params + params_with([sparse]), 0.01, process_group=world())
    # A grad that cannot be written in place: refused by the scale, after the all-reduce (so
    # every rank completes it) and before anything is written.
    expanded = torch.randn(1).expand(4)
    with pytest.raises(ValueError, match="overlapping"):
        fusedclip.clip_grad_norm_(params + params_with([expanded]), 0.01, process_group=world())
    for g, o in zip(grads, originals):
        assert torch.equal(g, o)
    # The ranks are still in step: a collective that every rank enters completes.
    total = fusedclip.get_total_norm(grads, process_group=world())
    assert_norm_close(total, oracle_norm(global_grads(seed=4), 2.0), 1e-5)


# --- Megatron-style model parallelism -------------------------------------------------------------


@case
def megatron_counting_with_tp_and_pp_groups(rank, world_size):
    """Tensor parallel x pipeline parallel. Counted once: TP-sharded weights (disjoint across TP
    ranks), TP-duplicated params (layer norms, identical on TP ranks) on TP rank 0 only, the tied
    embedding (on the first and the last stage) on the first stage only; every grad is scaled."""
    tp = 2
    pp = world_size // tp
    tp_rank, stage = rank % tp, rank // tp
    tp_groups = [dist.new_group([s * tp + t for t in range(tp)]) for s in range(pp)]
    pp_groups = [dist.new_group([s * tp + t for s in range(pp)]) for t in range(tp)]
    tp_group, pp_group = tp_groups[stage], pp_groups[tp_rank]

    gen = seeded(5)
    embedding = torch.randn(16, 6, generator=gen)  # the tied embedding's (reduced) grad
    stages = [
        {"weight": torch.randn(12, 6, generator=gen), "norm": torch.randn(6, generator=gen)}
        for _ in range(pp)
    ]
    unique = [embedding] + [t for s in stages for t in (s["weight"], s["norm"])]

    mine = stages[stage]
    weight_shard = mine["weight"].chunk(tp)[tp_rank].clone()
    norm_copy = mine["norm"].clone()
    local = {"weight": weight_shard, "norm": norm_copy}
    counted = [weight_shard] + ([norm_copy] if tp_rank == 0 else [])
    embedding_shard = embedding.chunk(tp)[tp_rank]  # vocab-parallel: sharded over TP
    if stage == 0:
        local["embedding"] = embedding_shard.clone()
        counted.append(local["embedding"])
    if stage == pp - 1 and pp > 1:
        local["embedding_tied_copy"] = embedding_shard.clone()  # not counted: stage 0 counts it

    for norm_type in NORM_TYPES:
        expected = oracle_norm(unique, norm_type)
        total = fusedclip.get_total_norm(counted, norm_type, process_group=[tp_group, pp_group])
        assert_norm_close(total, expected, rtol_of([torch.float32], norm_type))
    before = {k: v.clone() for k, v in local.items()}
    total = fusedclip.get_total_norm(counted, 2.0, process_group=[tp_group, pp_group])
    fusedclip.clip_grads_with_norm_(params_with(list(local.values())), 1.0, total)
    expected = oracle_norm(unique, 2.0)
    assert_scaled_like_oracle(list(local.values()), list(before.values()), expected, 1.0, 1e-5)


# --- DTensor grads --------------------------------------------------------------------------------


def dtensor_check(grads_global, make_local, norm_types=NORM_TYPES, max_norm_factor=0.5, atol=None):
    """get_total_norm and clip_grad_norm_ on DTensor grads (built by make_local from the global
    tensors) against the oracle of the global tensors. atol: the absolute tolerance of the
    scaled grads (Partial grads: each part is scaled and rounded before the pending sum)."""
    from torch.distributed.tensor import DTensor, Replicate

    for norm_type in norm_types:
        rtol = rtol_of([g.dtype for g in grads_global], norm_type)
        expected = oracle_norm(grads_global, norm_type)
        dgrads = make_local(grads_global)
        total = fusedclip.get_total_norm(dgrads, norm_type)
        assert isinstance(total, DTensor) and all(p == Replicate() for p in total.placements)
        assert_norm_close(total.full_tensor(), expected, rtol)
        max_norm = max_norm_factor * expected if expected else 1.0
        total = fusedclip.clip_grad_norm_(params_with(dgrads), max_norm, norm_type)
        assert_norm_close(whole(total), expected, rtol)
        if atol is None:
            scaled = [g.full_tensor() for g in dgrads]
            assert_scaled_like_oracle(scaled, grads_global, expected, max_norm, rtol)
            continue
        for g, e in zip(dgrads, grads_global):
            want = e.double() * oracle_coef(expected, max_norm)
            torch.testing.assert_close(g.full_tensor().double(), want, rtol=1e-5, atol=atol)


@case
def dtensor_fully_sharded_1d(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    # Uneven and empty shards: dim 0 of size 1, 3 and 0 leave some ranks an empty local tensor.
    shapes = [(7, 5), (1,), (3, 4), (0, 2), (130,), (6,)]
    grads = make_grads(shapes, [torch.float32, torch.bfloat16, torch.float32, torch.float32,
                                torch.float16, torch.float64], seed=6)

    def shard(gs):
        return [distribute_tensor(g.clone(), mesh, [Replicate() if i == 5 else Shard(0)])
                for i, g in enumerate(gs)]

    dtensor_check(grads, shard)

    # A norm from torch (a DTensor, Partial or not) scales DTensor grads as a plain one would.
    # (torch's norm of bf16/fp16 grads is rounded to their dtype: scale by its value.)
    dgrads = shard(grads)
    torch_total = torch.nn.utils.get_total_norm(dgrads)
    max_norm = 0.5 * oracle_norm(grads, 2.0)
    fusedclip.clip_grads_with_norm_(params_with(dgrads), max_norm, torch_total)
    scaled = [g.full_tensor() for g in dgrads]
    assert_scaled_like_oracle(scaled, grads, float(torch_total.full_tensor()), max_norm, 1e-5)
    # clip_grad_value_ clamps every shard.
    dgrads = shard(grads)
    fusedclip.clip_grad_value_(params_with(dgrads), 0.5)
    for g, e in zip(dgrads, grads):
        assert torch.equal(g.full_tensor(), e.clamp(-0.5, 0.5))
    # error_if_nonfinite reads the global norm: every rank raises, none waits.
    dgrads = shard(grads)
    dgrads[0].to_local().view(-1)[:1] = math.inf if rank == 0 else 1.0
    with pytest.raises(RuntimeError, match="non-finite"):
        fusedclip.get_total_norm(dgrads, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        fusedclip.clip_grad_norm_(params_with(dgrads), 1.0, error_if_nonfinite=True)


@case(world_sizes=(2,))
def dtensor_grads_in_the_features(rank, world_size):
    """FSDP2-style DTensor grads (Shard(0), uneven and empty shards) in the features above the
    four functions: ClipOptimizer on every path, AutoClip and ZClip clip them as clip_grad_norm_
    does (against the same feature on the whole tensors in one process); the per-tensor features
    refuse them before anything is written or reduced."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    shapes = [(7, 5), (1,), (3, 4), (130,)]
    grads = make_grads(shapes, [torch.float32, torch.float32, torch.float64, torch.float32], seed=9)
    values = make_grads(shapes, [torch.float32, torch.float32, torch.float64, torch.float32], seed=10)
    max_norm = 0.3 * oracle_norm(grads, 2.0)

    def dparams():
        params = [torch.nn.Parameter(distribute_tensor(v.clone(), mesh, [Shard(0)])) for v in values]
        for p, g in zip(params, grads):
            p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        return params

    def plain_params():
        params = [torch.nn.Parameter(v.clone()) for v in values]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        return params

    # (torch's fused SGD has no DTensor kernel; its fused AdamW has.)
    for fused, fold in ((False, "auto"), (True, False), (True, True)):
        ours, theirs = dparams(), plain_params()
        total = fusedclip.ClipOptimizer(torch.optim.AdamW(ours, lr=0.1, fused=fused), max_norm, fold=fold).step()
        expected = fusedclip.clip_grad_norm_(theirs, max_norm)
        torch.optim.AdamW(theirs, lr=0.1).step()
        assert_norm_close(whole(total), float(expected), 1e-6)
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-6, atol=1e-7)
    # GradScaler's step with DTensor grads: refused before anything, with what to do instead
    ours = dparams()
    opt = fusedclip.ClipOptimizer(torch.optim.AdamW(ours, lr=0.1, fused=True), max_norm)
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)
    with pytest.raises(TypeError, match="unscale_"):
        opt.step()
    for p, v, g in zip(ours, values, grads):
        assert torch.equal(p.full_tensor(), v) and torch.equal(p.grad.full_tensor(), g)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    opt.step()  # without the scaler's scale, the same optimizer steps

    for make in (lambda: fusedclip.AutoClip(percentile=50.0),
                 lambda: fusedclip.ZClip(max_grad_norm=max_norm, warmup_steps=2)):
        ours_clip, theirs_clip = make(), make()
        for _ in range(3):
            ours, theirs = dparams(), plain_params()
            total = ours_clip(ours)
            expected = theirs_clip(theirs)
            assert_norm_close(whole(total), float(expected), 1e-6)
            for p, q in zip(ours, theirs):
                torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-6, atol=1e-7)

    named = lambda params: [(f"p{i}", p) for i, p in enumerate(params)]  # noqa: E731
    for name, call in (
        ("get_norms", lambda ps: fusedclip.get_norms([p.grad for p in ps])),
        ("clip_grad_norm_with_norms_", lambda ps: fusedclip.clip_grad_norm_with_norms_(ps, 0.1)),
        ("PerTensorClip", lambda ps: fusedclip.PerTensorClip(0.1)(ps)),
        ("AGC", lambda ps: fusedclip.AGC(0.001)(ps)),
        ("GradientMonitor", lambda ps: fusedclip.GradientMonitor(named(ps)).clip_grad_norm_(0.1)),
    ):
        ours = dparams()
        with pytest.raises(TypeError, match="DTensor"):
            call(ours)
        for p, g in zip(ours, grads):
            assert torch.equal(p.grad.full_tensor(), g), name


def mesh_2d(world_size):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp", "tp"))


@case
def dtensor_2d_tensor_parallel(rank, world_size):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = mesh_2d(world_size)
    placements = [
        (Shard(0), Shard(1)),  # FSDP x column-parallel
        (Shard(0), Shard(0)),  # FSDP x row-parallel (nested on dim 0)
        (Shard(0), Replicate()),  # FSDP only (a layer norm, replicated over tp)
        (Replicate(), Shard(0)),  # tensor parallel only
        (Replicate(), Replicate()),
    ]
    shapes = [(8, 6), (9, 5), (7,), (5, 3), (4,)]
    grads = make_grads(shapes, torch.float32, seed=7)

    def shard(gs):
        return [distribute_tensor(g.clone(), mesh, list(p)) for g, p in zip(gs, placements)]

    dtensor_check(grads, shard)


@case
def dtensor_partial(rank, world_size):
    """Partial grads (sums pending over a mesh dim): the norm is the norm of the sum."""
    from torch.distributed.tensor import DTensor, Partial, Shard

    mesh = mesh_2d(world_size)
    tp_size = world_size // 2
    dp_rank, tp_rank = rank // tp_size, rank % tp_size
    grads = make_grads([(6, 4), (5,)], torch.float32, seed=8)

    def parts_of(g, n, seed):
        # n random parts summing to g (exactly: the last is g minus the others, in float64).
        gen = seeded(seed)
        others = [torch.randn(g.shape, generator=gen, dtype=torch.float64) for _ in range(n - 1)]
        last = g.double() - sum(others, torch.zeros_like(g, dtype=torch.float64))
        return [t.to(g.dtype) for t in others + [last]]

    def make(gs):
        # grads[0]: (Shard(0) over dp, Partial over tp); grads[1]: Partial over both dims.
        g0 = gs[0].chunk(2)[dp_rank]
        local0 = parts_of(g0, tp_size, 9 + dp_rank)[tp_rank]
        local1 = parts_of(gs[1], world_size, 10)[rank]
        return [
            DTensor.from_local(local0.clone(), mesh, [Shard(0), Partial()], run_check=False),
            DTensor.from_local(local1.clone(), mesh, [Partial(), Partial()], run_check=False),
        ]

    # The parts round to float32, so the whole differs from grads by rounding: use the whole.
    exact = [whole(g) for g in make(grads)]
    # Parts of size ~1 each scaled and rounded (2**-24 relative), then summed: a few 1e-7.
    dtensor_check(exact, make, norm_types=(2.0, 1.0, math.inf, -math.inf, 0.0, 3.5), atol=1e-6)
    with pytest.raises(ValueError, match="Partial"):
        fusedclip.clip_grad_value_(params_with(make(grads)), 0.5)


@case
def dtensor_mixed_meshes_and_plain(rank, world_size):
    """Data-parallel grads on one mesh, expert grads on another, plain replicated grads."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dp_mesh = init_device_mesh("cpu", (world_size,))
    ep_mesh = mesh_2d(world_size)
    dp = make_grads([(9, 3), (4,)], torch.float32, seed=11)
    experts = make_grads([(4, 6, 2)], torch.bfloat16, seed=12)
    plain = make_grads([(5,), (2, 3)], torch.float32, seed=13)
    everything = dp + experts + plain
    for norm_type in NORM_TYPES:
        rtol = rtol_of([torch.float32], norm_type)
        expected = oracle_norm(everything, norm_type)
        grads = (
            [distribute_tensor(g.clone(), dp_mesh, [Shard(0)]) for g in dp]
            + [distribute_tensor(g.clone(), ep_mesh, [Shard(0), Shard(1)]) for g in experts]
            + [g.clone() for g in plain]
        )
        total = fusedclip.get_total_norm(grads, norm_type)
        assert type(total) is torch.Tensor  # several meshes: a plain tensor
        assert_norm_close(total, expected, rtol)
        total = fusedclip.clip_grad_norm_(params_with(grads), 0.5 * expected + 1e-3, norm_type)
        assert_norm_close(total, expected, rtol)
        scaled = [whole(g) for g in grads]
        assert_scaled_like_oracle(scaled, everything, expected, 0.5 * expected + 1e-3, rtol)


@case
def dtensor_with_pipeline_group(rank, world_size):
    """Pipeline stages, each sharding its own layers over a data-parallel submesh: the DTensor
    grads reduce over their mesh, then process_group adds the stages (torchtitan's layout)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    stages = world_size // 2
    mesh = init_device_mesh("cpu", (stages, 2), mesh_dim_names=("pp", "dp"))
    stage = rank // 2
    shapes = [(5, 3), (4,), (1,)]
    per_stage = [make_grads(shapes, torch.float32, seed=40 + s) for s in range(stages)]
    everything = [g for gs in per_stage for g in gs]
    for norm_type in NORM_TYPES:
        rtol = rtol_of([torch.float32], norm_type)
        expected = oracle_norm(everything, norm_type)
        grads = [distribute_tensor(g.clone(), mesh["dp"], [Shard(0)]) for g in per_stage[stage]]
        total = fusedclip.get_total_norm(grads, norm_type, process_group=mesh.get_group("pp"))
        assert_norm_close(whole(total), expected, rtol)
        max_norm = 0.5 * expected + 1e-3
        total = fusedclip.clip_grad_norm_(
            params_with(grads), max_norm, norm_type, process_group=mesh.get_group("pp")
        )
        assert_norm_close(whole(total), expected, rtol)
        scaled = [g.full_tensor() for g in grads]
        assert_scaled_like_oracle(scaled, per_stage[stage], expected, max_norm, rtol)


@case
def fsdp2_fully_shard(rank, world_size):
    """A real FSDP2 model on a CPU mesh with gloo, against the same model in one process fed
    every rank's batch (FSDP2 averages grads over ranks, as the mean of the losses does)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))

    def model():
        torch.manual_seed(14)
        return torch.nn.Sequential(
            torch.nn.Linear(6, 11), torch.nn.Tanh(), torch.nn.Linear(11, 3), torch.nn.Linear(3, 1)
        ).double()

    batches = [
        torch.randn(5, 6, generator=seeded(100 + r), dtype=torch.float64)
        for r in range(world_size)
    ]
    reference = model()
    sum(reference(x).square().sum() for x in batches).div(world_size).backward()
    expected_grads = [p.grad for p in reference.parameters()]

    sharded = model()
    for layer in sharded:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    for norm_type in NORM_TYPES:
        sharded.zero_grad()
        sharded(batches[rank]).square().sum().backward()
        expected = oracle_norm(expected_grads, norm_type)
        total = fusedclip.get_total_norm([p.grad for p in sharded.parameters()], norm_type)
        assert_norm_close(total.full_tensor(), expected, 1e-9)
        total = fusedclip.clip_grad_norm_(sharded.parameters(), 0.1, norm_type)
        assert_norm_close(total.full_tensor(), expected, 1e-9)
        assert_scaled_like_oracle(
            [p.grad.full_tensor() for p in sharded.parameters()], expected_grads, expected, 0.1,
            1e-9,
        )


def assert_same_on_every_rank(total: torch.Tensor) -> None:
    """Every rank holds the same norm (bit for bit): ranks then scale their shards alike."""
    mine = float(whole(total))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    assert all(v == mine or (v != v and mine != mine) for v in every), every


@case
def dtensor_strided_shard(rank, world_size):
    """_StridedShard (FSDP2's data-parallel placement of a tensor-parallel parameter) splits the
    tensor over its mesh dim as Shard does, although it is not a Shard: it is reduced."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh = init_device_mesh("cpu", (world_size,))
    arange = torch.arange(1.0, 9.0)
    g = distribute_tensor(arange.clone(), mesh, [_StridedShard(0, split_factor=2)])
    total = fusedclip.get_total_norm([g])
    assert_norm_close(total.full_tensor(), oracle_norm([arange], 2.0), 1e-6)
    assert_same_on_every_rank(total)

    grads = make_grads([(8, 3), (12,), (4, 4)], [torch.float32, torch.bfloat16, torch.float64], seed=16)
    placements = [[_StridedShard(0, split_factor=2)], [_StridedShard(0, split_factor=3)], [Shard(1)]]

    def shard(gs):
        return [distribute_tensor(g.clone(), mesh, p) for g, p in zip(gs, placements)]

    dtensor_check(grads, shard)
    for norm_type in NORM_TYPES:
        assert_same_on_every_rank(fusedclip.get_total_norm(shard(grads), norm_type))


def comm_counts(fn) -> dict:
    """{collective op: count} of what fn() issues, as CommDebugMode counts it."""
    from torch.distributed.tensor.debug import CommDebugMode

    mode = CommDebugMode()
    with mode:
        fn()
    return {op: n for op, n in mode.get_comm_counts().items() if n}


@case
def dtensor_collectives_as_torch(rank, world_size):
    """fusedclip issues torch's functional all-reduce, as many as torch.nn.utils does: one per
    mesh dim of more than one rank for clip_grad_norm_, and for get_total_norm once its norm is made whole."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    funcol = torch.ops.c10d_functional.all_reduce
    mesh = mesh_2d(world_size)
    grads = make_grads([(8, 6), (9, 5), (7,)], torch.float32, seed=17)
    placements = [(Shard(0), Shard(1)), (Shard(0), Shard(0)), (Shard(0), Replicate())]

    def params():  # built outside the counted calls (distribute_tensor scatters)
        return params_with(distribute_tensor(g.clone(), mesh, list(p)) for g, p in zip(grads, placements))

    for norm_type in (2.0, 1.0, math.inf):
        ps, qs = params(), params()
        theirs = comm_counts(lambda: torch.nn.utils.clip_grad_norm_(ps, 0.1, norm_type, foreach=True))
        ours = comm_counts(lambda: fusedclip.clip_grad_norm_(qs, 0.1, norm_type))
        dims = sum(mesh.size(d) > 1 for d in range(mesh.ndim))  # a dim of one rank: none
        assert ours == theirs == {funcol: dims}, (ours, theirs)
        ps, qs = [p.grad for p in params()], [p.grad for p in params()]
        theirs = comm_counts(lambda: torch.nn.utils.get_total_norm(ps, norm_type).full_tensor())
        ours = comm_counts(lambda: fusedclip.get_total_norm(qs, norm_type).full_tensor())
        assert ours == theirs, (ours, theirs)
    # A process group: one functional all-reduce per group, none in place.
    plain = my_share(global_grads(seed=18), rank, world_size)
    second = dist.new_group(list(range(world_size)))  # another group (here of the same ranks)
    for norm_type in (2.0, math.inf):
        counts = comm_counts(lambda: fusedclip.get_total_norm(plain, norm_type, process_group=world()))
        assert counts == {funcol: 1}, counts
        counts = comm_counts(
            lambda: fusedclip.clip_grad_norm_(params_with([g.clone() for g in plain]), 0.1,
                                              norm_type, process_group=[world(), second])
        )
        assert counts == {funcol: 2}, counts


@case
def dtensor_compiled_traces_the_collectives(rank, world_size):
    """torch.compile(fullgraph=True) of a clip of DTensor grads: the functional all-reduce is in
    the graph, and the results are eager's."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = mesh_2d(world_size)
    grads = make_grads([(8, 6), (9, 5), (7,)], torch.float32, seed=20)
    placements = [(Shard(0), Shard(1)), (Shard(0), Shard(0)), (Shard(0), Replicate())]

    def params():  # DTensor parameters with DTensor grads, as FSDP2 makes them
        out = []
        for g, p in zip(grads, placements):
            param = distribute_tensor(torch.zeros_like(g), mesh, list(p)).requires_grad_()
            param.grad = distribute_tensor(g.clone(), mesh, list(p))
            out.append(param)
        return out

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda ps: fusedclip.clip_grad_norm_(ps, 0.1), backend=backend, fullgraph=True)
    eager, traced = params(), params()
    expected = fusedclip.clip_grad_norm_(eager, 0.1)
    total = compiled(traced)
    assert torch.equal(whole(total), whole(expected))
    for p, q in zip(traced, eager):
        assert torch.equal(p.grad.full_tensor(), q.grad.full_tensor())
    targets = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert any("all_reduce" in t for t in targets), targets
    torch._dynamo.reset()


class TensorParallelMLP(torch.nn.Module):
    """Two column-/row-parallel pairs around a layer norm (replicated over tp), float64."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(19)
        self.up, self.down = torch.nn.Linear(6, 8), torch.nn.Linear(8, 6)
        self.norm = torch.nn.LayerNorm(6)
        self.up2, self.down2 = torch.nn.Linear(6, 4, bias=False), torch.nn.Linear(4, 3)
        self.double()

    def forward(self, x):
        h = self.norm(self.down(torch.relu(self.up(x))) + x)
        return self.down2(torch.tanh(self.up2(h))).square().sum()


@case(world_sizes=(4,))  # a (dp, tp) = (2, 2) mesh
def fsdp2_with_tensor_parallel(rank, world_size):
    """FSDP2 over dp of a tensor-parallel model (parallelize_module, then fully_shard): the
    column-parallel weights get _StridedShard over dp, and the layer norm, not tensor-parallel,
    lives on the dp mesh alone (torch.nn.utils.get_total_norm refuses that mix of meshes). Every
    norm type against one process."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh = mesh_2d(world_size)
    dp_rank = mesh.get_local_rank("dp")
    batches = [torch.randn(5, 6, generator=seeded(200 + r), dtype=torch.float64) for r in range(2)]
    reference = TensorParallelMLP()
    sum(reference(x) for x in batches).div(2).backward()
    expected_grads = [p.grad for p in reference.parameters()]

    model = parallelize_module(TensorParallelMLP(), mesh["tp"], {
        "up": ColwiseParallel(), "down": RowwiseParallel(),
        "up2": ColwiseParallel(), "down2": RowwiseParallel(),
    })
    fully_shard(model, mesh=mesh["dp"])
    placements = [p.grad_placements if hasattr(p, "grad_placements") else p.placements
                  for p in model.parameters()]
    assert any(isinstance(pl, _StridedShard) for ps in placements for pl in ps), placements
    for norm_type in NORM_TYPES:
        model.zero_grad()
        model(batches[dp_rank]).backward()
        expected = oracle_norm(expected_grads, norm_type)
        grads = [p.grad for p in model.parameters()]
        total = fusedclip.get_total_norm(grads, norm_type)
        assert_norm_close(whole(total), expected, 1e-9)
        assert_same_on_every_rank(total)
        max_norm = 0.5 * expected if expected else 1.0
        total = fusedclip.clip_grad_norm_(model.parameters(), max_norm, norm_type)
        assert_norm_close(whole(total), expected, 1e-9)
        assert_same_on_every_rank(total)
        assert_scaled_like_oracle(
            [p.grad.full_tensor() for p in model.parameters()], expected_grads, expected, max_norm,
            1e-9,
        )


# --- DDP ------------------------------------------------------------------------------------------


def ddp_model_and_reference(world_size, bucket_cap_mb=25.0):
    from torch.nn.parallel import DistributedDataParallel

    def model():
        torch.manual_seed(15)
        return torch.nn.Sequential(
            torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
            torch.nn.Linear(64, 2),
        )

    ddp = DistributedDataParallel(model(), bucket_cap_mb=bucket_cap_mb)
    return ddp, model()


def batches_of(step, world_size):
    return [torch.randn(4, 8, generator=seeded(1000 * step + r)) for r in range(world_size)]


def reference_grads(reference, batches):
    """The averaged grads of one process fed every batch (float32, as the ranks compute)."""
    reference.zero_grad()
    for x in batches:
        (reference(x).square().sum() / len(batches)).backward()
    return [p.grad.clone() for p in reference.parameters()]


@case
def ddp_then_clip(rank, world_size):
    """DDP averages grads: clipping after it needs no process_group and equals clipping the
    averaged grads in one process."""
    ddp, reference = ddp_model_and_reference(world_size)
    for norm_type in NORM_TYPES:
        ddp.zero_grad()
        batches = batches_of(1, world_size)
        ddp(batches[rank]).square().sum().backward()
        averaged = reference_grads(reference, batches)
        expected = oracle_norm(averaged, norm_type)
        grads = [p.grad for p in ddp.parameters()]
        before = [g.clone() for g in grads]
        total = fusedclip.clip_grad_norm_(ddp.parameters(), 0.3 * expected + 1e-3, norm_type)
        # float32 sums in other orders: the DDP grads differ from the reference's by rounding.
        assert_norm_close(total, expected, 1e-4)
        max_norm = 0.3 * expected + 1e-3
        assert_scaled_like_oracle(grads, before, oracle_norm(before, norm_type), max_norm, 1e-5)
        for g, a in zip(before, averaged):
            torch.testing.assert_close(g, a, rtol=1e-5, atol=1e-6)


@case
def ddp_norm_hook(rank, world_size):
    """The hook's norm, taken bucket by bucket during backward, equals clipping after backward;
    several buckets (a tiny bucket_cap_mb), two iterations (DDP rebuilds its buckets after the
    first), and the grads DDP produces are unchanged by the hook."""
    for norm_type in (2.0, 1.0, math.inf, -math.inf, 0.0, 3.5):
        ddp, reference = ddp_model_and_reference(world_size, bucket_cap_mb=0.001)
        plain, _ = ddp_model_and_reference(world_size, bucket_cap_mb=0.001)
        state = fddp.NormHookState(norm_type=norm_type)
        ddp.register_comm_hook(state, fddp.allreduce_norm_hook)
        for step in (1, 2):
            batches = batches_of(step, world_size)
            for m in (ddp, plain):
                m.zero_grad()
                m(batches[rank]).square().sum().backward()
            if step == 2:  # DDP's first backward has one bucket; then bucket_cap_mb holds
                buckets = len(state._statistics)
                assert buckets >= 2, f"expected several buckets, got {buckets}"
            after_backward = fusedclip.get_total_norm([p.grad for p in ddp.parameters()], norm_type)
            total = state.clip_grad_norm_(ddp.parameters(), 0.2 * float(after_backward) + 1e-3)
            assert_norm_close(total, float(after_backward), 1e-5)
            averaged = reference_grads(reference, batches)
            assert_norm_close(total, oracle_norm(averaged, norm_type), 1e-4)
            max_norm = 0.2 * float(after_backward) + 1e-3
            expected = fusedclip.clip_grad_norm_(plain.parameters(), max_norm, norm_type)
            assert_norm_close(expected, float(after_backward), 1e-5)
            for p, q in zip(ddp.parameters(), plain.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
            with pytest.raises(RuntimeError, match="no gradient bucket"):
                state.total_norm()  # read once per backward


@case
def ddp_norm_hook_with_pipeline_group(rank, world_size):
    """Each pipeline stage runs DDP over its data-parallel group; the norm adds the stages."""
    from torch.nn.parallel import DistributedDataParallel

    dp = 2
    stages = world_size // dp
    stage, dp_rank = rank // dp, rank % dp
    dp_groups = [dist.new_group([s * dp + r for r in range(dp)]) for s in range(stages)]
    pp_groups = [dist.new_group([s * dp + r for s in range(stages)]) for r in range(dp)]

    def stage_model(s):
        torch.manual_seed(20 + s)
        return torch.nn.Linear(5, 7)

    ddp = DistributedDataParallel(
        stage_model(stage), process_group=dp_groups[stage], bucket_cap_mb=0.0001
    )
    state = fddp.NormHookState(process_group=dp_groups[stage])
    ddp.register_comm_hook(state, fddp.allreduce_norm_hook)
    batches = [torch.randn(3, 5, generator=seeded(30 + r)) for r in range(dp)]
    ddp(batches[dp_rank]).square().sum().backward()
    averaged = []
    for s in range(stages):
        ref = stage_model(s)
        for x in batches:
            (ref(x).square().sum() / dp).backward()
        averaged += [p.grad for p in ref.parameters()]
    total = state.total_norm(process_group=pp_groups[dp_rank])
    assert_norm_close(total, oracle_norm(averaged, 2.0), 1e-5)


# --- NCCL, one GPU (skipped without one) ---------------------------------------------------------


@nccl_case
def nccl_process_group(rank, world_size):
    """The statistic on CUDA for NCCL, no host sync (a rank without grads too)."""
    device = torch.device("cuda", rank)
    grads = global_grads(seed=1, dtypes=DTYPES)
    for norm_type in NORM_TYPES:
        rtol = rtol_of(DTYPES, norm_type)
        expected = oracle_norm(grads, norm_type)
        on_gpu = [g.to(device) for g in grads]
        params = params_with(on_gpu)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            total = fusedclip.get_total_norm(on_gpu, norm_type, process_group=world())
            clipped = fusedclip.clip_grad_norm_(params, 0.5 * expected + 1e-3, norm_type,
                                                process_group=world())
            nothing = fusedclip.get_total_norm([], norm_type, process_group=world())
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert total.device == device and clipped.device == device
        assert nothing.device.type == "cuda" and float(nothing) == 0.0
        assert_norm_close(total, expected, rtol)
        assert_norm_close(clipped, expected, rtol)
        scaled = [p.grad.cpu() for p in params]
        assert_scaled_like_oracle(scaled, grads, expected, 0.5 * expected + 1e-3, rtol)


@nccl_case
def nccl_dtensor_and_ddp_hook(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.nn.parallel import DistributedDataParallel

    mesh = init_device_mesh("cuda", (world_size,))
    grads = make_grads([(7, 5), (3,)], torch.float32, seed=16)
    dtensor_check(grads, lambda gs: [distribute_tensor(g.cuda(), mesh, [Shard(0)]) for g in gs])

    torch.manual_seed(17)
    layers = [torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2)]
    model = torch.nn.Sequential(*layers).cuda()
    ddp = DistributedDataParallel(model, device_ids=[rank], bucket_cap_mb=0.001)
    state = fddp.NormHookState()
    ddp.register_comm_hook(state, fddp.allreduce_norm_hook)
    for _ in range(2):
        ddp.zero_grad()
        ddp(torch.randn(4, 8, device="cuda")).square().sum().backward()
        after = fusedclip.get_total_norm([p.grad for p in ddp.parameters()])
        assert_norm_close(state.clip_grad_norm_(ddp.parameters(), 1e-2), float(after), 1e-5)


# --- the runner -----------------------------------------------------------------------------------


def _worker(rank: int, world_size: int, init_file: str, out_dir: str, backend: str) -> None:
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=timedelta(seconds=CASE_TIMEOUT_S),
    )
    failures = {}
    for name, fn in (NCCL_CASES if backend == "nccl" else CASES).items():
        if backend != "nccl" and world_size not in CASE_WORLD_SIZES[name]:
            continue
        try:
            fn(rank, world_size)
        except BaseException:  # noqa: BLE001 (reported to the parent, case by case)
            failures[name] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(failures, f)
    dist.destroy_process_group()


_RESULTS: dict[tuple[str, int], dict[int, dict[str, str]]] = {}


def run_world(world_size: int, backend: str = "gloo") -> dict[int, dict[str, str]]:
    """{rank: {case: traceback}} of the failures, running every case once per world size."""
    if (backend, world_size) in _RESULTS:
        return _RESULTS[backend, world_size]
    import time

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")  # a fresh rendezvous per group: no port to find
        context = mp.start_processes(
            _worker, args=(world_size, init_file, tmp, backend), nprocs=world_size, join=False,
            start_method="spawn",
        )
        try:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while not context.join(timeout=5):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"world size {world_size}: ranks did not finish in {RUN_TIMEOUT_S} s"
                    )
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        results = {}
        for rank in range(world_size):
            with open(os.path.join(tmp, f"rank{rank}.json")) as f:
                results[rank] = json.load(f)
    _RESULTS[backend, world_size] = results
    return results


def assert_case_passed(results, name):
    failed = {rank: r[name] for rank, r in results.items() if name in r}
    assert not failed, "\n".join(f"rank {rank}:\n{tb}" for rank, tb in failed.items())


@pytest.mark.parametrize(
    "name, world_size",
    [(name, size) for size in WORLD_SIZES for name in CASES if size in CASE_WORLD_SIZES[name]],
)
def test_gloo(name, world_size):
    assert_case_passed(run_world(world_size), name)


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(NCCL_CASES))
def test_nccl_one_gpu(name):
    if not dist.is_nccl_available():
        pytest.skip("torch was built without NCCL")
    assert_case_passed(run_world(1, backend="nccl"), name)
