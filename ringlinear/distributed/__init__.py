"""Distributed runtime and parallelisms, applied to a model from outside it."""

from ringlinear.distributed.mesh import ParallelismConfig, TrainMesh, build_mesh
from ringlinear.distributed.parallelize import (
    apply_activation_checkpointing,
    apply_fsdp,
    init_distributed,
    parallelize,
)

__all__ = ["ParallelismConfig", "TrainMesh", "apply_activation_checkpointing", "apply_fsdp", "build_mesh",
           "init_distributed", "parallelize"]
