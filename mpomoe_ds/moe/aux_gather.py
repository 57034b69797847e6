"""Aux-gather expert parallelism: rebuild the group's experts locally instead of shipping tokens.

Token dispatch (:mod:`mpomoe_ds.moe.token_dispatcher`) sends every routed token
to the rank owning its expert and back: four all-to-alls of ``T * k * D``
values per micro-batch. MPO experts differ only in their auxiliary tensors
(the shared central tensor is on every rank already, or all-gathered with
``moe.shard_central``), which are far smaller. With ``moe.dispatch:
aux_gather`` each rank instead

1. all-gathers the auxiliary tensors and biases of every expert of the layer
   over the expert-parallel group (:class:`AuxGather`; one flat collective per
   layer),
2. rebuilds all E experts with the central tensor and computes its own tokens
   with a local, group-free dispatch (no all-to-all), and
3. in the backward, sums every rank's auxiliary gradients back to the owners
   (the all-gather's adjoint: a reduce-scatter, on gloo an all-to-all of the
   blocks, :func:`mpomoe_ds.parallel.reduce_scatter_flat`), so each owner's
   ``.grad`` equals token dispatch's: the gradient of every token of the
   group that reached its experts.

Ownership, optimizer state and checkpoints are unchanged: the gathered copies
are activations, not parameters. Under gradient accumulation the gather sits
inside the per-step reconstruction (:class:`mpomoe_ds.moe.step_cache.StepReconstruction`),
so it runs once per optimizer step and its adjoint once, in the last backward;
the biases ride in the same collective (the step cache holds them too).

Not supported: expert hooks (the orthogonal expert optimizer of
:mod:`mpomoe_ds.omoe` projects per *local* expert from the inputs its owner
saw; here no rank sees all of an expert's inputs), and plain ``ffn`` experts
(nothing small to ship; the config refuses).
"""

from __future__ import annotations

from typing import Optional

import torch

from mpomoe_ds import parallel
from mpomoe_ds.moe.central import gather_shards


class AuxGather:
    """Differentiable gather of per-expert tensors over the expert-parallel group.

    Shape legend: L local experts, P ranks of the group, E = P * L.
    """

    def __init__(self, ep_group: Optional[parallel.ProcessGroup]) -> None:
        self.ep_group = ep_group

    @property
    def ep_size(self) -> int:
        return parallel.group_size(self.ep_group)

    def gather(self, stacks: list[torch.Tensor]) -> list[torch.Tensor]:
        """(L, ...) stacks of this rank's experts -> (E, ...) stacks of the group's, in global id order.

        Global expert g = ep_rank * L + l, so rank p's block lands in rows
        p*L .. p*L + L - 1. One all-gather carries every stack; gradients flow
        back through its adjoint (summed over the group, each rank keeping its
        own block).
        """
        if self.ep_size == 1 or not stacks:
            return list(stacks)
        flat = torch.cat([s.reshape(-1) for s in stacks])
        full_PN = gather_shards(flat, self.ep_group, flat.numel() * self.ep_size).view(self.ep_size, -1)
        out, offset = [], 0
        for s in stacks:
            block = full_PN.narrow(1, offset, s.numel())
            out.append(block.reshape(self.ep_size * s.shape[0], *s.shape[1:]))
            offset += s.numel()
        return out
