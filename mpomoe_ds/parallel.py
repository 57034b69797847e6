"""Process groups for expert parallelism.

This module is the one place that touches DeepSpeed's private group registry
(``deepspeed.utils.groups._*``) and its autograd all-to-all; everything else
receives process groups as arguments. Layout (DeepSpeed's default): the ranks
of an expert-parallel group are consecutive, ``ep_rank = rank % ep_size``, and
expert-data-parallel groups join ranks with the same ep_rank.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel group of this size."""
    return f"ep_size_{ep_size}"


def check_ep_size(ep_size: int, num_experts: int) -> None:
    """Clear errors for expert-parallel sizes that cannot work in this world."""
    if num_experts % ep_size:
        raise ValueError(f"num_experts={num_experts} is not divisible by ep_size={ep_size}; "
                         f"choose ep_size among {[d for d in range(1, num_experts + 1) if num_experts % d == 0]}")
    ws = world_size()
    if ws % ep_size:
        raise ValueError(f"world size {ws} is not divisible by ep_size={ep_size}; launch a multiple of "
                         f"{ep_size} processes or choose ep_size among {[d for d in range(1, ws + 1) if ws % d == 0]}")


def expert_parallel_group(ep_size: int) -> Optional[ProcessGroup]:
    """The expert-parallel group of this size, created on first use; None when ep_size == 1.

    Requires ``deepspeed.init_distributed()`` (or torch.distributed) first when ep_size > 1.
    """
    if ep_size == 1 and not is_distributed():
        return None
    if not is_distributed():
        raise RuntimeError(f"ep_size={ep_size} needs torch.distributed: call deepspeed.init_distributed() "
                           f"before building expert-parallel layers, and launch {ep_size}+ processes")
    from deepspeed.utils import groups

    if world_size() % ep_size:
        raise ValueError(f"world size {world_size()} is not divisible by ep_size={ep_size}")
    name = group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name) if ep_size > 1 else None


def expert_data_parallel_group(ep_size: int) -> Optional[ProcessGroup]:
    """Ranks holding replicas of the same experts (gradients of experts reduce here)."""
    if not is_distributed():
        return None
    from deepspeed.utils import groups

    expert_parallel_group(ep_size)
    return groups._get_expert_data_parallel_group(group_name(ep_size))


def group_rank(group: Optional[ProcessGroup]) -> int:
    return dist.get_rank(group) if group is not None else 0


def group_size(group: Optional[ProcessGroup]) -> int:
    return dist.get_world_size(group) if group is not None else 1


def all_to_all(group: Optional[ProcessGroup], x: torch.Tensor) -> torch.Tensor:
    """Differentiable equal-split all-to-all along dim 0 (identity without a group)."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    from deepspeed.moe.sharded_moe import _AllToAll

    return _AllToAll.apply(group, x.contiguous())


def all_reduce_max(group: Optional[ProcessGroup], values: torch.Tensor) -> torch.Tensor:
    """In-place MAX over the group (no-op without one); returns the tensor."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
    return values


def all_reduce_sum(tensor: torch.Tensor, group: Optional[ProcessGroup] = None) -> torch.Tensor:
    """In-place SUM over ``group`` (the world when None); no-op outside torch.distributed. Returns the tensor."""
    if is_distributed() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor

