"""The training device mesh: which ranks shard parameters (FSDP2, `dp_shard`) and which split the routed experts
between them (expert parallel, `ep`), from the train config's `parallelism` object. As in torchtitan, EP ranks are
borrowed from the data-parallel ranks: the mesh is `(efsdp, ep)` with `efsdp = dp_shard / ep`; dense parameters are
sharded over all of it (flattened, `dp`), each expert's parameters over `efsdp` (the ranks that hold that expert).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ringlinear.config_base import ConfigBase


@dataclass
class ParallelismConfig(ConfigBase):
    """`parallelism` in the train config: `{"dp_shard": N, "ep": M}`; the product of the degrees is the number of
    ranks torchrun starts."""

    _where: ClassVar[str] = "parallelism"

    dp_shard: int = -1
    """Ranks FSDP2 shards parameters, gradients and optimizer states over, each training on its own rows
    (-1: every rank, WORLD_SIZE)."""
    ep: int = 1
    """Expert-parallel degree: each MoE layer's routed experts are split over `ep` ranks (num_experts / ep on each)
    and tokens reach them by all-to-all. Taken from the dp_shard ranks (ep divides dp_shard); the dp_shard / ep
    ranks holding the same experts FSDP-shard them."""

    def validate(self) -> None:
        super().validate()
        self.require(self.dp_shard == -1 or self.dp_shard >= 1, "dp_shard", "must be -1 (all ranks) or >= 1")
        self.require(self.ep >= 1, "ep", "must be >= 1")

    def resolve(self, world: int) -> tuple[int, int]:
        """(dp_shard, ep) for `world` ranks, refusing degrees that do not tile them."""
        dp = world if self.dp_shard == -1 else self.dp_shard
        self.require(dp == world, "dp_shard", f"must equal the number of ranks ({world}; -1 takes it): dp_shard is "
                                              "the only data-parallel dimension so far")
        self.require(dp % self.ep == 0, "ep", f"must divide dp_shard={dp} (EP ranks are data-parallel ranks)")
        return dp, self.ep


@dataclass
class TrainMesh:
    """The meshes a parallelized model lives on. `dp`: all ranks (dense parameters, data); `ep`: the ranks one
    token's experts are spread over; `efsdp`: the ranks holding the same experts; `experts`: the 2D `(efsdp, ep)`
    mesh the expert parameters are DTensors on. Without EP (`ep == 1`), `ep`, `efsdp` and `experts` are None."""

    dp: object
    ep: object | None = None
    efsdp: object | None = None
    experts: object | None = None


def build_mesh(config: ParallelismConfig, world: int, device_type: str) -> TrainMesh:
    """The meshes for `world` ranks (the process group must be initialised)."""
    from torch.distributed.device_mesh import init_device_mesh

    dp, ep = config.resolve(world)
    if ep == 1:
        return TrainMesh(dp=init_device_mesh(device_type, (dp,), mesh_dim_names=("dp",)))
    root = init_device_mesh(device_type, (dp // ep, ep), mesh_dim_names=("efsdp", "ep"))
    return TrainMesh(dp=root["efsdp", "ep"]._flatten("dp"), ep=root["ep"], efsdp=root["efsdp"], experts=root)
