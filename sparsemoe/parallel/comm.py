"""Collectives used by expert parallelism, with autograd and with errors that say what happened.

Legend: N rows sent by this rank, M rows received, D row width, R ranks in the group.

`all_to_all_rows` is `torch.distributed.all_to_all_single` with uneven splits, differentiable: its
backward is the reverse exchange (each gradient row goes back to the rank that sent the input row).
A collective that fails because a peer exited, or because a peer never arrived before the process
group's timeout, is re-raised as `ExpertParallelError` naming the operation and this rank, so a run
whose peer died stops with one readable line instead of hanging or dumping a transport error.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


class ExpertParallelError(RuntimeError):
    """A collective of the expert-parallel layer failed (a peer exited or timed out)."""


@contextmanager
def collective(what: str, group: Optional[dist.ProcessGroup]) -> Iterator[None]:
    """Re-raise a failed collective as one clear `ExpertParallelError`."""
    try:
        yield
    except ExpertParallelError:
        raise
    except RuntimeError as err:  # gloo and NCCL report dead or late peers as RuntimeError subclasses
        rank = dist.get_rank() if dist.is_initialized() else -1
        size = dist.get_world_size(group) if dist.is_initialized() else -1
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExpertParallelError(
            f"{what} failed on rank {rank} (group of {size} ranks): a peer process exited or did not "
            f"arrive within the process-group timeout [{type(err).__name__}: {first_line}]"
        ) from err


def _exchange(x_ND: Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group) -> Tensor:
    out_MD = x_ND.new_empty((sum(out_splits), *x_ND.shape[1:]))
    with collective("all-to-all of token rows", group):
        dist.all_to_all_single(out_MD, x_ND.contiguous(), list(out_splits), list(in_splits), group=group)
    return out_MD


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _exchange(x_ND, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad_MD: Tensor):
        # The reverse exchange: what this rank received from rank j goes back to rank j.
        return _exchange(grad_MD, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def all_to_all_rows(x_ND: Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group=None) -> Tensor:
    """Send rows x[in_splits[j] block] to rank j; return the rows received, source rank by source rank.

    Every rank of `group` must call this with consistent splits (what i sends to j is what j expects
    from i); `exchange_counts` is how the ranks agree on them.
    """
    return _AllToAllRows.apply(x_ND, list(out_splits), list(in_splits), group)


def exchange_counts(counts_RL: Tensor, group=None) -> Tensor:
    """counts_RL[j, l]: rows this rank sends for expert l of rank j -> recv_RL[i, l]: rows rank i sends us."""
    recv_RL = torch.empty_like(counts_RL)
    with collective("all-to-all of per-expert row counts", group):
        dist.all_to_all_single(recv_RL.view(-1), counts_RL.contiguous().view(-1), group=group)
    return recv_RL


def all_reduce_sum(t: Tensor, group=None) -> Tensor:
    """Sum of `t` over the ranks of `group` (a new tensor; `t` is left as it was)."""
    out = t.detach().clone()
    with collective("all-reduce", group):
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out
