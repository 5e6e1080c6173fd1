"""Expert parallelism: each MoE layer's routed experts split over the ranks of an `ep` mesh (rank r holds experts
[r E/ep, (r+1) E/ep) as DTensor shards), tokens sent to the rank of their expert by one all-to-all and the expert
outputs sent back by another (the all-to-all token dispatcher of Megatron-Core; torchtitan's ExpertParallel).

Per MoE layer, on every rank: route (the replicated router), sort the token x expert choices by expert (the
single-device order: expert e's rows are contiguous, experts ascending), exchange the per-expert row counts
(all-to-all of [E] counts), send each EP rank the rows of its experts (all-to-all with uneven splits: rows arrive
source-rank major, expert minor), run the local experts' SwiGLU GEMMs on them, send the outputs back the same
way, and combine the k outputs of each token in the single-device fixed order. The backward of each all-to-all
is the all-to-all with the splits swapped, so each rank's expert gradients sum the contributions of every rank's
tokens (FSDP then reduces them over the ranks holding the same experts, without averaging: see parallelize.py).
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
from torch import nn

from ringlinear.layers.moe import MoE
from ringlinear.ops.moe import expert_counts, routed_experts
from ringlinear.ops.moe.combine import moe_combine, moe_dispatch, sort_by_expert


class _AllToAll(torch.autograd.Function):
    """Rows [sum(send), H] -> [sum(recv), H]: rows send[i] go to rank i, rows recv[i] arrive from rank i.
    Backward: the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, recv: list[int], send: list[int], group) -> torch.Tensor:
        ctx.recv, ctx.send, ctx.group = recv, send, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


def all_to_all_rows(x: torch.Tensor, recv: list[int], send: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, recv, send, group)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's experts of an (unsharded by FSDP, still EP-sharded) expert weight: its DTensor's local shard."""
    return t.to_local() if hasattr(t, "to_local") else t


def expert_parallel_swiglu(xs: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                           w_down: torch.Tensor, group) -> torch.Tensor:
    """xs: [N, H] rows sorted by global expert, counts: [E] rows per expert; w_*: this rank's E/ep experts
    ([E/ep, I, H], [E/ep, H, I]) -> [N, H], row i = SwiGLU expert of row i applied to it, computed on the rank
    that holds that expert."""
    ep = dist.get_world_size(group)
    E = counts.numel()
    local = E // ep
    with torch.no_grad():
        # recv_counts[s * local + e]: rows source rank s sends to my local expert e
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=group)
        send = counts.view(ep, local).sum(1).tolist()  # a host sync: the splits must be known to the host
        recv = recv_counts.view(ep, local).sum(1).tolist()
        # the local expert of each row that arrives (source-rank major, expert minor)
        local_ids = torch.arange(local, device=xs.device).repeat(ep).repeat_interleave(recv_counts)
    xr = all_to_all_rows(xs, recv, send, group)
    # `routed_experts` with k = 1 and weight 1 sorts the arriving rows by local expert (stably: source ranks stay
    # in order), runs the grouped GEMMs and puts the rows back; the weight-1 combine is exact (x * 1.0 in fp32)
    ones = torch.ones(xr.shape[0], 1, dtype=torch.float32, device=xr.device)
    yr = routed_experts(xr, local_ids[:, None], ones, w_gate, w_up, w_down)
    return all_to_all_rows(yr, send, recv, group)


def _ep_moe_forward(self: MoE, x: torch.Tensor, decode: bool = False) -> torch.Tensor:
    """MoE.forward with the routed experts on their EP ranks; routing, dispatch order and combine are the
    single-device ones (`ringlinear.ops.moe.routed_experts`)."""
    idx, w = self.gate(x)
    k = idx.shape[1]
    order, inv = sort_by_expert(idx)
    xs = moe_dispatch(x, order, inv, k)
    counts = expert_counts(idx.reshape(-1), self.gate.weight.shape[0])
    ys = expert_parallel_swiglu(xs, counts, _local(self.gate_proj), _local(self.up_proj), _local(self.down_proj),
                                self.ep_group)
    out = moe_combine(ys, order, inv, w, x.dtype)
    if self.shared_experts is not None:
        out = out + self.shared_experts(x)
    return out


EXPERT_PARAMS = ("gate_proj", "up_proj", "down_proj")


def apply_expert_parallel(model: nn.Module, ep_mesh) -> list[MoE]:
    """Split the routed experts of every MoE layer (MTP layers included) over `ep_mesh`: each expert weight
    becomes a DTensor sharded on the expert dim (the full tensor must be equal on every rank, as the seeded
    initialisation is), and the layer's forward sends tokens to their experts' ranks. Returns the MoE layers."""
    from torch.distributed.tensor import Shard, distribute_tensor

    ep = ep_mesh.size()
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for mod in layers:
        E = mod.gate_proj.shape[0]
        if E % ep:
            raise ValueError(f"expert parallel: num_experts={E} is not divisible by parallelism ep={ep}")
        for name in EXPERT_PARAMS:
            p = getattr(mod, name)
            setattr(mod, name, nn.Parameter(distribute_tensor(p.detach(), ep_mesh, [Shard(0)]),
                                            requires_grad=p.requires_grad))
        mod.ep_group = ep_mesh.get_group()
        mod.forward = types.MethodType(_ep_moe_forward, mod)
    return layers
