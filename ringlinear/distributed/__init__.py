"""Distributed runtime and parallelisms, applied to a model from outside it."""

from ringlinear.distributed.parallelize import apply_activation_checkpointing, apply_fsdp, init_distributed

__all__ = ["apply_activation_checkpointing", "apply_fsdp", "init_distributed"]
