from ringlinear.ops.cross_entropy.chunked import linear_cross_entropy
from ringlinear.ops.cross_entropy.naive import naive_linear_cross_entropy

__all__ = ["linear_cross_entropy", "naive_linear_cross_entropy"]
