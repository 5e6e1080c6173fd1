"""How a single-device model becomes a distributed or memory-saving one, applied from outside the model
(torchtitan's parallelize.py): the process group from the torchrun environment (`init_distributed`); expert
parallelism (`expert_parallel.py`) and FSDP2 on a device mesh (`parallelize`, `apply_fsdp`: each router, decoder
layer and MTP decoder layer its own shard group, routed experts over the ranks that hold them, then the root;
fp32 sharded master parameters, bf16 compute through `MixedPrecisionPolicy`, gradients summed in fp32);
activation checkpointing per decoder layer (`apply_activation_checkpointing`).
"""

from __future__ import annotations

import atexit
import functools
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from ringlinear.model import DecoderLayer


def _destroy_process_groups() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from the torchrun environment; a single process needs none of it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        # ours to end: groups left to the interpreter's teardown can abort the process at exit ("terminate called
        # without an active exception" from a gloo thread), after a run that succeeded
        atexit.register(_destroy_process_groups)
    rank = dist.get_rank()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def apply_fsdp(model: nn.Module, compute_dtype: torch.dtype, mesh=None) -> nn.Module:
    """Shard `model` (a RingLinearForCausalLM with fp32 parameters) with FSDP2 over `mesh` (a TrainMesh; default:
    every rank of the default process group, no expert parallelism). Units: each router (fp32 compute), each
    decoder layer (and MTP decoder layer), the root; under expert parallelism also each MoE layer's routed experts
    over `mesh.efsdp` (already EP-sharded DTensors) and its shared experts over `mesh.dp`.

    Gradients are summed, never averaged, over ranks (divide factor 1): the trainer scales each rank's loss by
    1 / (targets in the global step), so the sum is the mean gradient; under EP an expert's gradient already sums
    every rank's tokens (the all-to-all backward), which an average over `efsdp` would shrink by `ep`."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from ringlinear.distributed.mesh import TrainMesh
    from ringlinear.layers.moe import MoE

    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = TrainMesh(dp=init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("dp",)))
    dp = mesh.dp
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    # Routers compute in fp32 (router_dtype): their own group keeps fp32 parameters.
    mp_router = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for name, mod in model.named_modules():
        if name.endswith("mlp.gate"):
            fully_shard(mod, mesh=dp, mp_policy=mp_router)
    if mesh.ep is not None:
        for mod in model.modules():
            if isinstance(mod, MoE):
                if mod.shared_experts is not None:
                    fully_shard(mod.shared_experts, mesh=dp, mp_policy=mp)
                fully_shard(mod, mesh=mesh.efsdp, mp_policy=mp)  # what is left in it: the routed experts
    # MTP: only its decoder layer is a unit; its norms and eh_proj stay with the root, because `loss` calls
    # `mtp.final_layernorm` after the MTP forward, when a unit of its own would have resharded it
    for block in list(model.model.layers) + [m.layer for m in model.model.mtp]:
        fully_shard(block, mesh=dp, mp_policy=mp)
    fully_shard(model, mesh=dp, mp_policy=mp)
    # the trainer calls `model.loss(...)`, not `model(...)`: it must run the root's unshard/reshard hooks too
    register_fsdp_forward_method(model, "loss")
    for mod in model.modules():
        if isinstance(mod, FSDPModule):
            mod.set_gradient_divide_factor(1.0)
            if dp.device_type != "cuda":  # gloo has no PREMUL_SUM: reduce with a plain sum (the factor is 1)
                mod.set_force_sum_reduction_for_comms(True)
    return model


def parallelize(model: nn.Module, mesh, compute_dtype: torch.dtype) -> nn.Module:
    """The single-device `model` in its distributed form on `mesh` (a TrainMesh): experts split over `mesh.ep`
    when it has one, then FSDP2."""
    if mesh.ep is not None:
        from ringlinear.distributed.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, mesh.ep)
    return apply_fsdp(model, compute_dtype, mesh)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (torch.utils.checkpoint, non-reentrant). Routers count their
    tokens twice (forward + recompute): the balancing update and load ratios only use relative loads."""
    for mod in model.modules():
        if isinstance(mod, DecoderLayer):
            fwd = type(mod).forward
            mod.forward = functools.partial(lambda f, m, x, ctx: checkpoint(f, m, x, ctx, use_reentrant=False), fwd, mod)
