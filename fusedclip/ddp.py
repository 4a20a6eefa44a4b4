"""DDP: the norm taken while backward runs.

DDP averages the grads in backward, so after it every rank holds the same full grads and
clipping needs no reduction at all. :func:`allreduce_norm_hook` goes further: it takes each
bucket's statistic as soon as that bucket's all-reduce completes, overlapping the norm with the
rest of backward, so that after backward only a scalar combine and the scale remain.
"""

# Annotations evaluated (no `from __future__ import annotations` in this file): DDP checks that
# a hook's are dist.GradBucket and Future[Tensor].
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from fusedclip import _backends, _core, _ops, clip, distributed, numerics

__all__ = ["NormHookState", "allreduce_norm_hook"]


class NormHookState:
    r"""State of :func:`allreduce_norm_hook`: the statistics of the buckets reduced so far.

    After backward, :meth:`total_norm` combines them (no pass over the grads, no collective)
    and :meth:`clip_grad_norm_` also scales the grads::

        state = NormHookState(norm_type=2.0)
        ddp_model.register_comm_hook(state, allreduce_norm_hook)
        loss.backward()
        total = state.clip_grad_norm_(ddp_model.parameters(), max_norm=1.0)

    Args:
        process_group: the group DDP averages over (None: the default group).
        norm_type: p of the norm, as in :func:`fusedclip.get_total_norm`.
        backend: the fusedclip backend of the bucket statistics ("auto", "cpu", "torch").

    The norm covers the grads DDP reduces (every parameter that requires a grad and that DDP
    does not ignore), averaged: the norm that clipping after backward computes. (With
    ``find_unused_parameters``, a parameter unused on every rank counts as zeros here but has no
    grad after backward: the norms differ only for norm types -inf and below 0.)
    """

    def __init__(
        self,
        process_group: Optional["dist.ProcessGroup"] = None,
        norm_type: Union[float, str] = 2.0,
        backend: str = "auto",
    ) -> None:
        self.process_group = process_group
        self.norm_type = _core.norm_type(norm_type)
        self.backend = backend
        self._statistics: dict[int, Tensor] = {}

    def record(self, index: int, bucket_buffer: Tensor) -> None:
        """Takes the statistic of a reduced bucket (called by the hook's callback)."""
        backend = _backends.resolve_backend(self.backend, bucket_buffer.device)
        statistic, _ = _ops.run("multi_tensor_norm", backend, [bucket_buffer], self.norm_type)
        self._statistics[index] = statistic

    def total_norm(self, process_group: Optional[_core.ProcessGroups] = None) -> Tensor:
        r"""The norm of the grads reduced since the last call, from the bucket statistics.

        ``process_group``: groups to reduce the norm over besides DDP's (a pipeline-parallel
        group when each stage runs its own DDP), as in :func:`fusedclip.get_total_norm`.
        Raises RuntimeError when no bucket was reduced (before backward, or under no_sync).
        """
        if not self._statistics:
            raise RuntimeError(
                "NormHookState.total_norm: no gradient bucket was reduced since the last call "
                "(call it after a backward of the DDP model that registered allreduce_norm_hook, "
                "outside no_sync)"
            )
        statistics = [self._statistics[i] for i in sorted(self._statistics)]
        self._statistics = {}
        dtype = numerics.accumulate_dtype(statistics)
        statistic = numerics.combine_statistics(
            torch.stack([s.to(dtype) for s in statistics]), self.norm_type
        )
        groups = distributed.process_groups(process_group)
        if not groups:
            return numerics.total_norm_from_statistic(statistic, self.norm_type, empty=False)
        stat = distributed.Statistic(self.norm_type)
        row = stat.row(statistic, True, statistic.device)
        for group in groups:
            row = stat.all_reduce(row, group)
        return stat.total_norm(row, dtype, statistic.device)

    def clip_grad_norm_(
        self,
        parameters: _core.TensorOrTensors,
        max_norm: float,
        error_if_nonfinite: bool = False,
        *,
        process_group: Optional[_core.ProcessGroups] = None,
    ) -> Tensor:
        """Scales the grads of ``parameters`` by min(max_norm / (norm + 1e-6), 1), where norm is
        :meth:`total_norm`; returns the norm. As fusedclip.clip_grad_norm_ after backward."""
        total = self.total_norm(process_group)
        if error_if_nonfinite:
            _core.raise_if_nonfinite(total, self.norm_type)
        clip.clip_grads_with_norm_(parameters, max_norm, total, backend=self.backend)
        return total


def allreduce_norm_hook(
    state: NormHookState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: DDP's default all-reduce (average), then the bucket's statistic.

    Register with ``ddp_model.register_comm_hook(state, allreduce_norm_hook)``. The statistic
    is taken in the all-reduce's callback, when the averaged bucket is ready and while backward
    still runs; see :class:`NormHookState`.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    index = bucket.index()
    if index == 0:  # the first bucket of a backward: drop what an unread backward left
        state._statistics = {}
    reduced = default_hooks.allreduce_hook(state.process_group, bucket)

    def record(future: torch.futures.Future) -> Tensor:
        buffer = future.value()
        state.record(index, buffer)
        return buffer

    return reduced.then(record)
