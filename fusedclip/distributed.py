"""Clipping across processes: process groups, DTensor grads (FSDP2, tensor parallel), DDP.

A global norm is a reduction of a per-rank statistic taken *before* the root (see
``multi_tensor_norm``): the sum of :math:`|x|^p` (a count for p = 0) adds across ranks
holding disjoint shards, the max (p = inf) takes the max, the min (p = -inf) the min. So each
rank reduces its own shards in one local pass, and one scalar all-reduce per group gives every
rank the global statistic; the root, the clip coefficient and the scale then run on the device,
with no host sync.

What is reduced over what:

* ``process_group`` (a group or a sequence of groups, reduced in turn): the grads given on the
  ranks of the group are disjoint parts of the model (tensor-parallel shards counted once,
  pipeline stages, expert-parallel experts).
* DTensor grads: their local shards, over the mesh dimensions whose placement splits the
  tensor (``Shard``, FSDP2's ``_StridedShard``, any other splitting placement); ``Replicate``
  dimensions hold copies and are never summed. A ``Partial`` placement is a sum
  still pending, and the norm of a sum is not the sum of the norms, so the norm is taken of a
  copy redistributed to ``Replicate`` on those dimensions (one collective over that grad); the
  in-place scale is linear, so the pending local parts are scaled as they are.

Every rank calls every collective exactly once per call, in the same order, also a rank with no
grads (its statistic is the reduction's identity), so no rank waits forever for another. The
statistic travels as float64 on the device that the group's backend needs (CUDA for NCCL, the
CPU for gloo), so ranks whose grads differ in dtype, or that have none, still match.

DDP averages the grads in backward, so after it every rank holds the same full grads and
clipping needs no reduction at all; fusedclip.ddp's hook takes the norm while backward runs.
"""

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fusedclip import _core, _ops, numerics

__all__ = ["get_total_norm", "clip_grad_norm_"]

ProcessGroups = _core.ProcessGroups  # a ProcessGroup or a sequence of them


# --- DTensor grads --------------------------------------------------------------------------------


def has_dtensor(tensors: Sequence[Any]) -> bool:
    dtensor = _core.dtensor_type()
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors)


def as_tensor(total_norm: Tensor) -> Tensor:
    """A norm given as a DTensor (replicated, or partial as torch.nn.utils returns it), whole."""
    dtensor = _core.dtensor_type()
    if dtensor is not None and isinstance(total_norm, dtensor):
        return total_norm.full_tensor()
    return total_norm


def _splits(placement: Any) -> bool:
    """Whether a placement splits the tensor over its mesh dim (each rank holds a disjoint part).

    Decided by what the placement means, not by its class: a DTensor placement either copies the
    tensor (Replicate), holds a pending sum (Partial, and its subclasses), or splits it, whatever
    its layout (Shard, _StridedShard, which FSDP2 gives a tensor-parallel parameter and which is
    not a Shard, and any splitting placement torch adds).
    """
    return not (placement.is_replicate() or placement.is_partial())


def _shard_dims(placements: Sequence[Any]) -> tuple[int, ...]:
    """The mesh dims over which a DTensor's local tensors are disjoint parts (not copies)."""
    return tuple(d for d, p in enumerate(placements) if _splits(p))


class _Parts:
    """The grads of one call, split by what their statistic is reduced over.

    plain: plain tensors (reduced over ``process_group`` only).
    sharded: (mesh, its Shard dims: those to sum over) -> the local tensors whose statistic is
        taken (for a Partial grad, of a copy made whole by resolve_partial).
    local: every DTensor's local tensor, which the scale writes in place.
    meshes: the meshes of the DTensor grads, in first-seen order.
    """

    def __init__(self, grads: Sequence[Tensor]) -> None:
        dtensor = _core.dtensor_type()
        self.plain: list[Tensor] = []
        self.sharded: dict[tuple[Any, tuple[int, ...]], list[Tensor]] = {}
        self.local: list[Tensor] = []
        self.meshes: list[Any] = []
        self._partial: list[Tensor] = []
        for g in grads:
            if dtensor is None or not isinstance(g, dtensor):
                self.plain.append(g)
                continue
            mesh, placements = g.device_mesh, g.placements
            if mesh not in self.meshes:
                self.meshes.append(mesh)
            local = g.to_local()
            self.local.append(local)
            if any(p.is_partial() for p in placements):
                self._partial.append(g)  # made whole by resolve_partial(), after the checks
            else:
                self.sharded.setdefault((mesh, _shard_dims(placements)), []).append(local)

    def resolve_partial(self, foreach: Optional[bool], backend: str) -> None:
        """Adds the whole-sum copies of Partial grads (a collective per grad, on every rank)."""
        from torch.distributed.tensor import Replicate

        if self._partial:  # checked before their collectives (the other grads: see total_norm)
            local = [g.to_local() for g in self._partial]
            _core.group_by_device(local, foreach, backend, writes=False)
        for g in self._partial:
            placements = [Replicate() if p.is_partial() else p for p in g.placements]
            whole = g.redistribute(g.device_mesh, placements).to_local()
            self.sharded.setdefault((g.device_mesh, _shard_dims(placements)), []).append(whole)
        self._partial = []

    def all_plain(self) -> list[Tensor]:
        """What the scale writes: the plain grads and the DTensors' local tensors."""
        return self.plain + self.local


# --- the reduction --------------------------------------------------------------------------------


def reduce_op(norm_type: float) -> str:
    """How statistics combine across ranks: "max" for inf, "min" for -inf, else "sum" (0: counts),
    as torch's functional all_reduce names them."""
    if norm_type == math.inf:
        return "max"
    if norm_type == -math.inf:
        return "min"
    return "sum"


def collective_device(group: Optional["dist.ProcessGroup"]) -> torch.device:
    """Where a tensor must live for a collective of ``group``: the same on every rank.

    The accelerator of a group that has an accelerator backend (NCCL's CUDA, XCCL's XPU; for
    "cpu:gloo,cuda:nccl", CUDA), else the CPU. Not taken from the local grads: a rank with
    none must still choose what the others choose.
    """
    backend = str(dist.get_backend(group))
    if ":" in backend:  # "cpu:gloo,cuda:nccl"
        pairs = [item.split(":") for item in backend.split(",")]
    else:
        pairs = [(d, b) for d, b in dist.Backend.default_device_backend_map.items() if b == backend]
    device_type = next((d for d, b in pairs if d != "cpu" and b != "gloo"), "cpu")
    if device_type == "cpu":
        return torch.device("cpu")
    bound = getattr(group or dist.group.WORLD, "bound_device_id", None)
    if bound is not None:
        return bound
    return torch.device(device_type, torch.get_device_module(device_type).current_device())


class Statistic:
    """A rank's statistic with what the reduction must carry beside it, as one float64 row.

    Column 0 is the statistic. For inf and -inf norms column 1 marks a nan, since MAX and MIN
    all-reduces need not propagate one (gloo's depends on the order of operands). For negative
    norm types the last column marks "has elements": the norm of no elements is 0, which the
    identity of the statistic does not give (0^(1/p) is inf for p < 0; min of nothing is +inf).
    Marks are 1 (SUM, MAX) or -1 (MIN) so that the reduction itself combines them.
    """

    def __init__(self, norm_type: float) -> None:
        self.norm_type = norm_type
        self.op = reduce_op(norm_type)
        self.sign = -1.0 if norm_type == -math.inf else 1.0
        self.nan_column = norm_type in (math.inf, -math.inf)
        self.elements_column = norm_type < 0

    def row(self, statistic: Optional[Tensor], has_elements: bool, device: torch.device) -> Tensor:
        # torch.full, not torch.tensor: a fill on the device, no copy from the host.
        if statistic is None:
            statistic = torch.full((), numerics.statistic_identity(self.norm_type), device=device)
        columns = [statistic.to(device=device, dtype=torch.float64)]
        if self.nan_column:
            columns.append(columns[0].isnan().double() * self.sign)
        if self.elements_column:
            columns.append(torch.full_like(columns[0], self.sign if has_elements else 0.0))
        return torch.stack(columns)

    def combine(self, rows: Tensor) -> Tensor:
        """Rows (k x columns) combined as the all-reduce combines them, in row order."""
        if self.op == "max":
            return rows.amax(0)
        if self.op == "min":
            return rows.amin(0)
        return rows.sum(0)

    def all_reduce(self, rows: Tensor, group: Optional["dist.ProcessGroup"]) -> Tensor:
        """Rows reduced over ``group``, on the group's device (moved there when they are not).

        torch's functional all-reduce, as DTensor's own reductions issue it: collective counters
        (CommDebugMode) see the collectives torch.nn.utils issues, and torch.compile traces it.
        """
        import torch.distributed._functional_collectives as funcol  # not on torch without distributed

        device = collective_device(group)
        on_device = rows if rows.device == device else rows.to(device)
        return funcol.wait_tensor(funcol.all_reduce(on_device, self.op, group or dist.group.WORLD))

    def total_norm(self, row: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The norm from a reduced row, in ``dtype`` on ``device``."""
        row = row.to(device)
        statistic = row[0].to(dtype)
        if self.nan_column:
            statistic = torch.where(row[1] != 0, torch.full_like(statistic, math.nan), statistic)
        total = numerics.total_norm_from_statistic(statistic, self.norm_type, empty=False)
        if self.elements_column:
            total = torch.where(row[-1] != 0, total, torch.zeros_like(total))
        return total


def process_groups(process_group: Optional[ProcessGroups]) -> list:
    """process_group as a list of groups, checked (before any collective or write)."""
    if process_group is None:
        return []
    if isinstance(process_group, dist.ProcessGroup):
        return [process_group]
    _check_member(process_group, "process_group")
    if not isinstance(process_group, Sequence) or isinstance(process_group, (str, bytes)):
        raise TypeError(
            "process_group must be a torch.distributed.ProcessGroup or a sequence of them, got "
            f"{type(process_group).__name__}"
        )
    if not process_group:
        raise ValueError(
            "process_group must name at least one group (pass None to reduce over no group)"
        )
    groups = list(process_group)
    for i, group in enumerate(groups):
        _check_member(group, f"process_group[{i}]")
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(
                f"process_group[{i}] must be a torch.distributed.ProcessGroup, got "
                f"{type(group).__name__}"
            )
        if any(group is other for other in groups[:i]):
            raise ValueError(
                f"process_group[{i}] repeats an earlier group: reducing over a group twice would "
                "count its ranks' statistics twice"
            )
    return groups


def _check_member(group: Any, name: str) -> None:
    """Refuses what torch.distributed.new_group returns on a rank outside the new group."""
    if isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            f"{name} is torch.distributed.GroupMember.NON_GROUP_MEMBER: this rank is not a member of "
            "the group (new_group returns it on the other ranks); only the group's ranks reduce over it"
        )


def _local_statistic(
    tensors: list[Tensor], norm_type: float, foreach: Optional[bool], backend: str
) -> Tensor:
    """The statistic of tensors on this rank. A list of plain tensors goes to the operator whole,
    which validates it itself; the general path validates in Python and groups by device."""
    result = _core.run_as_one_group(tensors, foreach, backend, False,
                                    lambda group: _ops.run("multi_tensor_norm", group[1], group[2], norm_type))
    if result is not None:
        return result[0]
    groups = _core.group_by_device(tensors, foreach, backend, writes=False)
    return _core.statistic(groups, norm_type)


def _local_row(
    tensors: list[Tensor],
    stat: Statistic,
    foreach: Optional[bool],
    backend: str,
    device: torch.device,
) -> Tensor:
    """The row of these tensors on this rank (the identity when there are none)."""
    if not tensors:
        return stat.row(None, False, device)
    statistic = _local_statistic(tensors, stat.norm_type, foreach, backend)
    return stat.row(statistic, any(t.numel() for t in tensors), device)


def _reduce_mesh(mesh: Any, rows_by_key: dict, stat: Statistic) -> Tensor:
    """The statistic of a mesh's grads: each key's row reduced over its Shard dimensions.

    One all-reduce per mesh dimension that any key needs, of the stacked rows of the keys that
    need it: a 2-D (dp, tp) mesh costs two scalar all-reduces however the grads are placed.
    """
    keys = [key for key in rows_by_key if key[0] == mesh]
    rows = [rows_by_key[key] for key in keys]
    device = rows[0].device
    for dim in range(mesh.ndim):
        needs = [i for i, (_, dims) in enumerate(keys) if dim in dims]
        if needs and mesh.size(dim) > 1:  # a dim of one rank has nothing to reduce (as torch)
            reduced = stat.all_reduce(torch.stack([rows[i] for i in needs]), mesh.get_group(dim))
            for j, i in enumerate(needs):
                rows[i] = reduced[j].to(device)
    return stat.combine(torch.stack(rows))


def _output_place(parts: _Parts, process_groups: list) -> tuple[torch.dtype, torch.device]:
    """The returned norm's dtype (the local grads' accumulation dtype) and device (the first
    grad's, else the first group's collective device)."""
    tensors = parts.all_plain()
    if tensors:
        return numerics.accumulate_dtype(tensors), tensors[0].device
    return torch.float32, collective_device(process_groups[0])


def total_norm(
    grads: list[Tensor],
    norm_type: float,
    foreach: Optional[bool],
    backend: str,
    process_group: Optional[ProcessGroups],
) -> tuple[Tensor, _Parts]:
    """The global norm of grads (plain and DTensor) over meshes and process groups.

    Returns the norm on this rank (a plain tensor) and the grads split in parts.
    """
    groups = process_groups(process_group)
    parts = _Parts(grads)
    parts.resolve_partial(foreach, backend)
    stat = Statistic(norm_type)
    dtype, device = _output_place(parts, groups)
    # Every local statistic before the first collective: a grad that the operators refuse
    # raises here, before anything is written, and on every rank that holds the same grads.
    rows_by_key = {
        key: _local_row(tensors, stat, foreach, backend, tensors[0].device)
        for key, tensors in parts.sharded.items()
    }
    rows = []
    if parts.plain or not parts.meshes:
        rows.append(_local_row(parts.plain, stat, foreach, backend, device))
    rows += [_reduce_mesh(mesh, rows_by_key, stat) for mesh in parts.meshes]
    row = stat.combine(torch.stack([r.to(rows[0].device) for r in rows]))
    for group in groups:
        row = stat.all_reduce(row, group)
    return stat.total_norm(row, dtype, device), parts


def scale_(tensors: list[Tensor], coef: Tensor, foreach: Optional[bool], backend: str) -> None:
    """tensors *= coef in place (plain tensors: DTensor grads given by their local tensors).

    A list of plain tensors on coef's device goes to the operator whole, which refuses what it
    cannot write before writing anything; the general path then validates in Python and says why.
    """
    if not tensors:
        return
    if _core.run_as_one_group(tensors, foreach, backend, True, lambda group: _scale_on_its_device(group, coef)):
        return
    _core.scale_groups(_core.group_by_device(tensors, foreach, backend, writes=True), coef)


def _scale_on_its_device(group: _core.Group, coef: Tensor) -> Optional[bool]:
    device, backend, tensors = group
    if coef.device != device:  # the general path moves coef to each device
        return None
    _ops.run("multi_tensor_scale_", backend, tensors, coef)
    return True


def as_returned(total: Tensor, parts: _Parts) -> Tensor:
    """A replicated DTensor when every grad is a DTensor of one mesh (torch's type), else total."""
    if len(parts.meshes) != 1 or parts.plain:
        return total
    from torch.distributed.tensor import DTensor, Replicate

    mesh = parts.meshes[0]
    return DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)


def get_total_norm(
    tensors: list[Tensor],
    norm_type: float,
    foreach: Optional[bool],
    backend: str,
    process_group: Optional[ProcessGroups],
) -> Tensor:
    total, parts = total_norm(tensors, norm_type, foreach, backend, process_group)
    return as_returned(total, parts)


def clip_grad_norm_(
    grads: list[Tensor],
    max_norm: float,
    norm_type: float,
    error_if_nonfinite: bool,
    foreach: Optional[bool],
    backend: str,
    process_group: Optional[ProcessGroups],
) -> Tensor:
    total, parts = total_norm(grads, norm_type, foreach, backend, process_group)
    if error_if_nonfinite:
        _core.raise_if_nonfinite(total, norm_type)  # the same global norm on every rank
    scale_(parts.all_plain(), numerics.clip_coefficient(total, max_norm), foreach, backend)
    return as_returned(total, parts)


def scale_dtensor_grads_(
    grads: list[Tensor], coef: Tensor, foreach: Optional[bool], backend: str
) -> None:
    """grads *= coef for grads among which some are DTensors: their local tensors are scaled
    (a Partial grad's pending parts too: the scale is linear)."""
    scale_(_Parts(grads).all_plain(), coef, foreach, backend)


def local_tensors_to_clamp(grads: list[Tensor]) -> list[Tensor]:
    """The tensors clip_grad_value_ clamps: plain grads, and DTensor grads' local tensors (an
    elementwise clamp of every shard is the clamp of the whole). A Partial grad is refused:
    clamping the parts of a pending sum is not clamping the sum."""
    parts = _Parts(grads)
    if parts._partial:
        raise ValueError(
            "clip_grad_value_: a DTensor gradient has a Partial placement (a sum still pending "
            f"over the mesh: {parts._partial[0].placements}); its parts cannot be clamped one by "
            "one, redistribute it first"
        )
    return parts.all_plain()
