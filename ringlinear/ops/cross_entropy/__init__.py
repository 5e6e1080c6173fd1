from ringlinear.ops.cross_entropy.chunked import linear_cross_entropy
from ringlinear.ops.cross_entropy.naive import linear_cross_entropy_ref

__all__ = ["linear_cross_entropy", "linear_cross_entropy_ref"]
