"""The reference backend: a per-token Python loop, slow and obvious; the oracle for every other backend.

Legend: T tokens, D model width, E experts, N plan rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsemoe.dispatch.plan import DispatchPlan
from sparsemoe.experts import Experts


def reference_forward(x_TD: Tensor, plan: DispatchPlan, experts: Experts) -> Tensor:
    """y[t] = sum over token t's kept assignments n of weight[n] * expert[e_n](x[t]); float32 [T, D]."""
    T, D = x_TD.shape
    E = plan.num_experts
    rows_of_token: list[list[int]] = [[] for _ in range(T)]
    expert_of_row = plan.expert_ids.tolist()
    for n, (t, e) in enumerate(zip(plan.token_ids.tolist(), expert_of_row)):
        if e < E:  # rows with expert id E were dropped by capacity
            rows_of_token[t].append(n)
    outputs = []
    for t in range(T):
        y_t = x_TD.new_zeros(D, dtype=torch.float32)
        for n in rows_of_token[t]:
            y_t = y_t + plan.weights[n] * experts.expert(x_TD[t : t + 1], expert_of_row[n])[0].float()
        outputs.append(y_t)
    if not outputs:
        return x_TD.new_zeros(0, D, dtype=torch.float32)
    return torch.stack(outputs)
