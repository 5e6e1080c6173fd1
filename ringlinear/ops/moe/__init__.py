"""MoE ops: sigmoid group-limited routing and the routed expert computation."""

from ringlinear.ops.moe.experts import expert_counts, routed_experts
from ringlinear.ops.moe.routing import grouped_topk

__all__ = ["expert_counts", "grouped_topk", "routed_experts"]
