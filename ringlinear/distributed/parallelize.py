"""How a single-device model becomes a distributed or memory-saving one, applied from outside the model
(torchtitan's parallelize.py): the process group from the torchrun environment (`init_distributed`); data
parallelism with FSDP2 (`apply_fsdp`: each decoder layer, and each MTP decoder layer, its own shard group, then
the root; fp32 sharded master parameters, bf16 compute through `MixedPrecisionPolicy`, gradients reduced in
fp32); activation checkpointing per decoder layer (`apply_activation_checkpointing`).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from ringlinear.model import DecoderLayer


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from the torchrun environment; a single process needs none of it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def apply_fsdp(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """Shard `model` (a RingLinearForCausalLM with fp32 parameters) over the default process group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    # Routers compute in fp32 (router_dtype): their own group keeps fp32 parameters.
    mp_router = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for name, mod in model.named_modules():
        if name.endswith("mlp.gate"):
            fully_shard(mod, mesh=mesh, mp_policy=mp_router)
    # MTP: only its decoder layer is a unit; its norms and eh_proj stay with the root, because `loss` calls
    # `mtp.final_layernorm` after the MTP forward, when a unit of its own would have resharded it
    for block in list(model.model.layers) + [m.layer for m in model.model.mtp]:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # the trainer calls `model.loss(...)`, not `model(...)`: it must run the root's unshard/reshard hooks too
    register_fsdp_forward_method(model, "loss")
    return model


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (torch.utils.checkpoint, non-reentrant). Routers count their
    tokens twice (forward + recompute): the balancing update and load ratios only use relative loads."""
    for mod in model.modules():
        if isinstance(mod, DecoderLayer):
            fwd = type(mod).forward
            mod.forward = functools.partial(lambda f, m, x, ctx: checkpoint(f, m, x, ctx, use_reentrant=False), fwd, mod)
