"""MoE ops: sigmoid group-limited routing and the routed expert computation."""

from ringlinear.ops.moe.experts import routed_experts
from ringlinear.ops.moe.routing import grouped_topk

__all__ = ["grouped_topk", "routed_experts"]
