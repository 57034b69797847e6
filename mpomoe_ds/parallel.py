"""Process groups and every collective of the package.

This module is the one place that touches DeepSpeed's private group registry
(``deepspeed.utils.groups._*``), its autograd all-to-all, and the collectives
of ``torch.distributed`` (tests/test_layout.py fails if another module calls
one); everything else receives process groups as arguments.

Device placement: each collective takes tensors on the caller's device and
returns them there, and sends them on the *communication device* of the
group's backend: the accelerator for NCCL/HCCL/..., the CPU for gloo/MPI/CCL.
So a CPU counter is all-reduced under NCCL and a CUDA tensor under gloo; a
tensor already on the communication device is not copied. Layout (DeepSpeed's default): the ranks
of an expert-parallel group are consecutive, ``ep_rank = rank % ep_size``, and
expert-data-parallel groups join ranks with the same ep_rank.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

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


# --------------------------------------------------------------------------- placement

CPU_BACKENDS = ("gloo", "mpi", "ccl")  # backends that communicate host memory


def device_for_backend(backend: str, accelerator: Callable[[], torch.device]) -> torch.device:
    """Where ``backend`` communicates: the CPU for host backends, else ``accelerator()``."""
    return torch.device("cpu") if backend.lower() in CPU_BACKENDS else accelerator()


def _accelerator_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def communication_device(group: Optional[ProcessGroup] = None) -> torch.device:
    """The device the group's backend sends tensors from (see the module docstring)."""
    return device_for_backend(str(dist.get_backend(group)), _accelerator_device)


def _active(group: Optional[ProcessGroup]) -> bool:
    """Whether a collective over ``group`` (None: the world) has anything to do."""
    return is_distributed() and dist.get_world_size(group) > 1


def _reduce_op(op: str) -> Any:
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"unknown reduction {op!r}; choose one of {sorted(ops)}")
    return ops[op]


# --------------------------------------------------------------------------- traffic accounting

# Bytes this rank sent, per collective, as a bandwidth-optimal (ring / pairwise) algorithm moves them:
# all-to-all (P-1)/P of its input, all-gather (P-1) shards, reduce-scatter (P-1)/P of its input,
# all-reduce twice that. Benchmarks read it to compare dispatch modes; counting is always on (cheap).
_TRAFFIC: dict[str, int] = {}


def _count(op: str, nbytes: int, group: Optional[ProcessGroup], fraction: float) -> None:
    world = dist.get_world_size(group)
    _TRAFFIC[op] = _TRAFFIC.get(op, 0) + int(nbytes * fraction * (world - 1) / world)


def traffic() -> dict[str, int]:
    """Bytes sent by this rank per collective kind since the last :func:`reset_traffic`."""
    return dict(_TRAFFIC)


def reset_traffic() -> None:
    _TRAFFIC.clear()


# --------------------------------------------------------------------------- collectives


def all_reduce(values: torch.Tensor, group: Optional[ProcessGroup] = None, op: str = "sum") -> torch.Tensor:
    """``values`` reduced over the group (None: the world), on ``values``' device.

    Reduces in place when ``values`` is already contiguous on the
    communication device; the input is otherwise left alone. Identity outside
    torch.distributed or in a group of one.
    """
    if not _active(group):
        return values
    sent = values.to(communication_device(group)).contiguous()
    _count("all_reduce", sent.nbytes, group, 2.0)
    dist.all_reduce(sent, op=_reduce_op(op), group=group)
    return sent.to(values.device)


def all_reduce_max(group: Optional[ProcessGroup], values: torch.Tensor) -> torch.Tensor:
    """MAX over the group (identity without one), on ``values``' device."""
    return values if group is None else all_reduce(values, group, op="max")


def all_gather(tensor: torch.Tensor, group: Optional[ProcessGroup] = None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all ranks), in group-rank order, on ``tensor``'s device."""
    if not _active(group):
        return [tensor]
    sent = tensor.to(communication_device(group)).contiguous()
    parts = [torch.empty_like(sent) for _ in range(dist.get_world_size(group))]
    _count("all_gather", sent.nbytes * len(parts), group, 1.0)
    dist.all_gather(parts, sent, group=group)
    return [p.to(tensor.device) for p in parts]


def all_gather_flat(shard: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """The group's equal 1-D shards concatenated in rank order, on ``shard``'s device."""
    if not _active(group):
        return shard
    sent = shard.to(communication_device(group)).contiguous()
    full = sent.new_empty(sent.numel() * dist.get_world_size(group))
    _count("all_gather", full.nbytes, group, 1.0)
    dist.all_gather_single(full, sent, group=group)
    return full.to(shard.device)


def reduce_scatter_flat(padded: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """This rank's 1/world slice of the group's sum of ``padded`` (1-D, length divisible by the group size)."""
    if not _active(group):
        return padded
    world = dist.get_world_size(group)
    if padded.numel() % world:
        raise ValueError(f"reduce_scatter_flat: {padded.numel()} elements do not split into {world} shards; pad first")
    shard_numel = padded.numel() // world
    sent = padded.to(communication_device(group)).contiguous()
    _count("reduce_scatter", sent.nbytes, group, 1.0)
    if str(dist.get_backend(group)).lower() in CPU_BACKENDS:
        shard = _reduce_scatter_by_all_to_all(sent, group, shard_numel)
    else:
        shard = sent.new_empty(shard_numel)
        dist.reduce_scatter_single(shard, sent, group=group)
    return shard.to(padded.device)


def _reduce_scatter_by_all_to_all(sent: torch.Tensor, group: ProcessGroup, shard_numel: int) -> torch.Tensor:
    """Reduce-scatter for backends without one (gloo): block p of every rank goes to rank p, which sums them.

    Sends what a ring reduce-scatter sends, (P-1)/P of the input, half of the
    all-reduce-and-slice it replaces. The blocks are summed in rank order, so
    the result does not depend on arrival order.
    """
    received_PN = torch.empty_like(sent)
    dist.all_to_all_single(received_PN, sent, group=group)
    blocks = received_PN.view(-1, shard_numel)
    shard = blocks[0].clone()
    for block in blocks[1:]:
        shard.add_(block)
    return shard


def all_gather_object(obj: Any, group: Optional[ProcessGroup] = None) -> list[Any]:
    """Every rank's picklable ``obj`` in group-rank order (``[obj]`` outside torch.distributed)."""
    if not _active(group):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def barrier(group: Optional[ProcessGroup] = None) -> None:
    """Wait for every rank of the group (no-op outside torch.distributed)."""
    if _active(group):
        dist.barrier(group=group)


def shutdown() -> None:
    """End of a process: wait for every rank, then destroy all process groups (no-op outside torch.distributed).

    Without it, gloo's worker threads can still hold work objects when the
    interpreter finalises; destroying them then aborts the process
    ("terminate called without an active exception", SIGABRT after a
    successful run; pytorch/pytorch#179291). Call once, where communication
    is over, never between in-process runs that reuse DeepSpeed's groups.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_to_all(group: Optional[ProcessGroup], x: torch.Tensor) -> torch.Tensor:
    """Differentiable equal-split all-to-all along dim 0 (identity without a group), on ``x``'s device."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    from deepspeed.moe.sharded_moe import _AllToAll

    device = communication_device(group)
    sent = x.to(device).contiguous()
    _count("all_to_all", sent.nbytes, group, 1.0)
    out = _AllToAll.apply(group, sent)
    if out.requires_grad:  # the backward is the same all-to-all of the gradient
        out.register_hook(lambda grad: _count("all_to_all", grad.nbytes, group, 1.0))
    return out.to(x.device)


class _AllToAllVariable(torch.autograd.Function):
    """``all_to_all_single`` with split sizes; its gradient is the reverse exchange (splits swapped)."""

    @staticmethod
    def forward(ctx: Any, group: ProcessGroup, x: torch.Tensor, input_splits: list[int],
                output_splits: list[int]) -> torch.Tensor:
        ctx.group, ctx.splits = group, (input_splits, output_splits)
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x, output_split_sizes=output_splits, input_split_sizes=input_splits,
                               group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None, None]:
        input_splits, output_splits = ctx.splits
        return None, _AllToAllVariable.apply(ctx.group, grad.contiguous(), output_splits, input_splits), None, None


def all_to_all_variable(group: Optional[ProcessGroup], x: torch.Tensor, input_splits: list[int],
                        output_splits: list[int]) -> torch.Tensor:
    """Differentiable all-to-all along dim 0 with per-rank split sizes, on ``x``'s device.

    Rows ``input_splits[p]`` of ``x`` (in order) go to group rank p; the result
    holds ``output_splits[q]`` rows from each rank q, in rank order. The split
    sizes must agree across ranks (exchange the counts first, e.g. with
    :func:`all_to_all`). Identity without a group.
    """
    if group is None or dist.get_world_size(group) == 1:
        return x
    if len(input_splits) != dist.get_world_size(group) or sum(input_splits) != x.shape[0]:
        raise ValueError(f"all_to_all_variable: input_splits {input_splits} do not split {x.shape[0]} rows "
                         f"over {dist.get_world_size(group)} ranks")
    device = communication_device(group)
    sent = x.to(device).contiguous()
    _count("all_to_all", sent.nbytes, group, 1.0)
    out = _AllToAllVariable.apply(group, sent, list(input_splits), list(output_splits))
    if out.requires_grad:  # the backward is the reverse exchange of the gradient
        out.register_hook(lambda grad: _count("all_to_all", grad.nbytes, group, 1.0))
    return out.to(x.device)


def zero_full_tensor(param: torch.Tensor, state_key: Optional[str] = None) -> Optional[torch.Tensor]:
    """The full fp32 value (``state_key`` None) or optimizer state of a ZeRO-1/2 partitioned parameter.

    Collective over the parameter's data-parallel group (DeepSpeed's
    ``safe_get_full_*``: an all-reduce of the partitions): every rank of that
    group calls it for the same parameters in the same order. None for a
    parameter the ZeRO optimizer does not hold (frozen, or ZeRO 0).
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if not hasattr(param, "_hp_mapping"):
        return None
    if state_key is None:
        return safe_get_full_fp32_param(param)
    return safe_get_full_optimizer_state(param, state_key)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself outside torch.distributed)."""
    if not _active(None):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
