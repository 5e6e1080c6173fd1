"""MoE ops: sigmoid group-limited routing and the routed expert computation (grouped GEMMs for any batch;
`fused_routing.py` and `fused_moe.py`: one-kernel router top-k and experts for decode-sized batches)."""

from ringlinear.ops.moe.experts import expert_counts, routed_experts
from ringlinear.ops.moe.routing import grouped_topk

__all__ = ["DECODE_MAX_PAIRS", "expert_counts", "grouped_topk", "routed_experts"]

# token x expert choices the fused decode kernels take: their alignment sorts all pairs in one program, the keys
# packing the pair index in 16 bits
DECODE_MAX_PAIRS = 8192
