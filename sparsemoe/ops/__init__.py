"""Custom operators (`torch.library`), opaque to the compiler, with fake implementations."""

from sparsemoe.ops.grouped_mm import grouped_mm, grouped_weight_grad

__all__ = ["grouped_mm", "grouped_weight_grad"]
