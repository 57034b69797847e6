"""The shared central tensors of one MPOE layer: replicated, or sharded over expert parallelism.

Owns where a layer's central tensors ("up"/"down", one middle MPO core per
matrix position) live and how the experts get their full values.

    replicated  (default) each central tensor is an ordinary dense parameter
                of its full shape on every rank, all-reduced over data
                parallelism like attention weights.
    sharded     (``moe.shard_central``, ep_size > 1) each rank of the
                expert-parallel group holds 1/ep_size of every central tensor
                (flattened, zero-padded to a multiple of ep_size). The shard is
                a DeepSpeed expert parameter (``allreduce=False`` + the layer's
                ``group_name``), so DeepSpeed reduces its gradient, partitions
                its optimizer state and checkpoints it exactly like an
                expert's. Reconstruction all-gathers the full tensor over the
                expert-parallel group; the backward reduce-scatters its
                gradient (sum) back to the shards. Per rank this saves
                (1 - 1/ep_size) of the central parameters, and of their
                gradients, for one all-gather per rebuild (once per optimizer
                step with per-step reconstruction), the volume ZeRO-2 would
                all-gather after the step for a replicated tensor anyway.

Either way ``state_dict()`` holds the full tensors under ``<layer>.central.up``
/ ``.down``, so checkpoints and exports do not depend on the layout, and a
sharded model's ``state_dict()`` / ``load_state_dict()`` are collective over
the expert-parallel group (DeepSpeed's ``save_checkpoint`` calls them on every
rank). The central gradient mask (:mod:`mpomoe_ds.moe.grad_mask`) always sees the
full gradient of a rank, before any reduction, so masks are layout-independent.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Optional

import torch
from torch import nn

from mpomoe_ds import parallel
from mpomoe_ds.moe.grad_mask import GradientMask


def _all_gather_flat(shard: torch.Tensor, group: parallel.ProcessGroup, numel: int) -> torch.Tensor:
    """The first ``numel`` elements of the group's equal 1-D shards, concatenated in rank order."""
    return parallel.all_gather_flat(shard, group)[:numel]


class _GatherShards(torch.autograd.Function):
    """Differentiable all-gather of equal 1-D shards; the backward sums gradients back to the shards."""

    @staticmethod
    def forward(ctx, shard: torch.Tensor, group: parallel.ProcessGroup, numel: int) -> torch.Tensor:
        ctx.group = group
        return _all_gather_flat(shard, group, numel)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], None, None]:
        world = parallel.group_size(ctx.group)
        shard_numel = -(-grad.numel() // world)
        padded = grad.new_zeros(shard_numel * world)
        padded[:grad.numel()] = grad
        return parallel.reduce_scatter_flat(padded, ctx.group), None, None


def gather_shards(shard: torch.Tensor, group: parallel.ProcessGroup, numel: int) -> torch.Tensor:
    """Differentiable all-gather of the group's equal 1-D shards (first ``numel`` elements); the
    backward sums every rank's gradient and hands each rank its own shard's part (a reduce-scatter)."""
    return _GatherShards.apply(shard, group, numel)


class GatheredCentral(Mapping):
    """{"up": tensor, "down": tensor}: full central tensors, all-gathered on first access.

    A forward that reuses a per-step reconstruction never reads it, so it
    never communicates. Each gathered tensor is a fresh autograd node whose
    backward returns the gradient to the shards.
    """

    def __init__(self, central: "CentralTensors") -> None:
        self._central = central
        self._gathered: dict[str, torch.Tensor] = {}

    def __getitem__(self, matrix: str) -> torch.Tensor:
        if matrix not in self._gathered:
            self._gathered[matrix] = self._central.gather(matrix)
        return self._gathered[matrix]

    def __iter__(self) -> Iterator[str]:
        return iter(self._central.full_shapes)

    def __len__(self) -> int:
        return len(self._central.full_shapes)


class CentralTensors(nn.ParameterDict):
    """The central tensors of one layer, keyed by matrix position; see the module docstring.

    ``self[m]`` is the parameter this rank holds (the full tensor when
    replicated, a flat shard when sharded); :meth:`tensors` gives full values
    for computation, :meth:`full_shapes` their shapes.
    """

    def __init__(self, cores: Mapping[str, torch.Tensor], *, ep_group: Optional[parallel.ProcessGroup] = None,
                 shard: bool = False, group_name: str = "") -> None:
        super().__init__()
        self.ep_group = ep_group
        self.sharded = bool(shard) and parallel.group_size(ep_group) > 1
        self.full_shapes = {m: torch.Size(core.shape) for m, core in cores.items()}
        self.mask = None
        self._state_cache = None
        for m, core in cores.items():
            value = self.local_slice(core.detach()) if self.sharded else core.detach()
            param = nn.Parameter(value.clone().contiguous())
            param.mpo_central = True
            if self.sharded:
                param.allreduce = False  # DeepSpeed's expert-parameter contract
                param.group_name = group_name
            self[m] = param

    # ------------------------------------------------------------------ layout

    @property
    def ep_size(self) -> int:
        return parallel.group_size(self.ep_group) if self.sharded else 1

    def local_slice(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's flat shard of a full central tensor (zero-padded at the end)."""
        world, rank = parallel.group_size(self.ep_group), parallel.group_rank(self.ep_group)
        flat = full.reshape(-1)
        shard_numel = -(-flat.numel() // world)
        start = rank * shard_numel
        shard = flat[start:start + shard_numel]
        if shard.numel() < shard_numel:
            shard = torch.cat([shard, flat.new_zeros(shard_numel - shard.numel())])
        return shard

    # ------------------------------------------------------------------ values

    def gather(self, matrix: str) -> torch.Tensor:
        """The full central tensor of ``matrix`` (all-gathered when sharded; collective)."""
        param = self[matrix]
        shape = self.full_shapes[matrix]
        if not self.sharded:
            return param
        if not torch.is_grad_enabled() or not param.requires_grad:
            return self.gather_detached(matrix)
        full = gather_shards(param, self.ep_group, shape.numel()).view(shape)
        if self.mask is not None:
            self.mask.attach(full, key=list(self.full_shapes).index(matrix))
        return full

    def gather_detached(self, matrix: str) -> torch.Tensor:
        """The full central tensor of ``matrix`` without autograd (collective when sharded)."""
        if not self.sharded:
            return self[matrix].detach()
        shape = self.full_shapes[matrix]
        with torch.no_grad():
            return _all_gather_flat(self[matrix].detach(), self.ep_group, shape.numel()).view(shape)

    def tensors(self) -> Mapping[str, torch.Tensor]:
        """Full central tensors for computation: the parameters, or a lazily gathered view."""
        if not self.sharded:
            return dict(self.items())
        self._state_cache = None
        return GatheredCentral(self)

    def set_gradient_mask(self, mask: Optional[GradientMask]) -> None:
        """Mask each rank's full central gradient (replicated: a hook on the parameter once)."""
        self.mask = mask
        if mask is not None and not self.sharded:
            for key, m in enumerate(self.full_shapes):
                mask.attach(self[m], key=key)

    # ------------------------------------------------------------------ state dict: full tensors

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        if not self.sharded:
            super()._save_to_state_dict(destination, prefix, keep_vars)
            return
        for m, full in self._full_for_state_dict().items():
            destination[prefix + m] = full

    def _full_for_state_dict(self) -> dict[str, torch.Tensor]:
        """Full tensors for ``state_dict()``: gathered, or reused from the previous call.

        DeepSpeed's ``save_checkpoint`` with MoE calls ``state_dict()`` twice:
        first on every expert-checkpoint writer (a whole expert-parallel group,
        so a collective is safe), then once more on data-parallel rank 0 alone
        for the model-states file. The second call must not communicate, so the
        first call's result is kept and reused while this rank's shards are
        unchanged (compared by value: ZeRO updates parameters through flat
        buffers, without bumping version counters). The next forward drops it.
        """
        cached = self._state_cache
        if cached is not None and all(torch.equal(self[m].detach(), shard) for m, shard in cached[0].items()):
            return cached[1]
        full = {m: self.gather_detached(m) for m in self.full_shapes}
        self._state_cache = ({m: self[m].detach().clone() for m in full}, full)
        return full

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        if not self.sharded:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            return
        for m, shape in self.full_shapes.items():
            key = prefix + m
            if key not in state_dict:
                missing_keys.append(key)
                continue
            full = state_dict[key]
            if full.shape != shape:
                error_msgs.append(f"size mismatch for {key}: copying a central tensor of shape {tuple(full.shape)}, "
                                  f"the layer's is {tuple(shape)} (sharded over {self.ep_size} ranks)")
                continue
            with torch.no_grad():
                self[m].copy_(self.local_slice(full.to(self[m].device)))
        if strict:
            for key in state_dict:
                local = key[len(prefix):]
                if key.startswith(prefix) and "." not in local and local not in self.full_shapes:
                    unexpected_keys.append(key)

