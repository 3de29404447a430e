"""Expert parallelism over torch.distributed (gloo on CPU, NCCL on GPU), applied from outside the model.

    groups = init_parallel(ep_size=2)          # under torchrun: RANK, WORLD_SIZE, ... from the environment
    model = shard_experts(model, groups)       # each MoE keeps E / ep_size experts; all-to-all dispatch
    loss.backward(); sync_gradients(model, groups); optimizer.step()
    state = full_state_dict(model, groups)     # full [E, ...] expert tensors: loads on any world size
"""

from sparsemoe.parallel.comm import ExpertParallelError, all_reduce_sum, all_to_all_rows
from sparsemoe.parallel.groups import ParallelGroups, init_parallel, make_groups
from sparsemoe.parallel.moe import ExpertParallelMoE
from sparsemoe.parallel.shard import expert_parameters, shard_experts
from sparsemoe.parallel.state import (
    clip_grad_norm,
    full_optimizer_state,
    full_state_dict,
    local_state_dict,
    shard_optimizer_state,
    sync_gradients,
)

__all__ = [
    "ExpertParallelError",
    "ExpertParallelMoE",
    "ParallelGroups",
    "all_reduce_sum",
    "all_to_all_rows",
    "clip_grad_norm",
    "expert_parameters",
    "full_optimizer_state",
    "full_state_dict",
    "init_parallel",
    "local_state_dict",
    "make_groups",
    "shard_experts",
    "shard_optimizer_state",
    "sync_gradients",
]
