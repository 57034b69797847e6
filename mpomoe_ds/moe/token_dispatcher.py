"""Token dispatch: from routed tokens to per-expert buffers on the owning ranks, and back.

Shape legend: T local tokens, K routes per token, D hidden, E global experts,
L local experts (E / ep), P expert-parallel ranks (ep_size), C capacity
(slots per expert per source rank).

Dispatch is index based (gather / scatter-add), linear in T: every route gets a
slot ``e * C + position`` in an (E, C, D) buffer, the buffer goes through one
equal-split all-to-all over the expert-parallel group, and each rank sees
(L, P * C, D): its local experts' slots from every source rank. Combine is the
reverse, then a weighted sum over each token's K routes.

Capacity: with ``dropless`` C is the largest per-expert load on any rank of the
group, so nothing is dropped; otherwise ``C = max(ceil(K * T / E * factor),
min_capacity)``. Either way one MAX all-reduce over the group agrees on C (and
on T), so ranks with unequal token counts cannot hang in the all-to-all.

Without padding (``moe.dropless_impl: segments``, :class:`SegmentDispatcher`):
the (P, L) route counts are exchanged first (a small equal-split
all-to-all), then exactly the routed tokens travel in one all-to-all with
per-rank split sizes, and each rank's experts see R rows (R = the routes they
got), sorted by local expert for a grouped matmul; combine is the reverse.
Computed slots equal routed tokens whatever the skew of the routing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from mpomoe_ds import parallel
from mpomoe_ds.moe.config import MoEConfig


@dataclass
class DispatchPlan:
    """Where each route goes; built once per forward, used by dispatch and combine."""

    capacity: int
    slot_N: torch.Tensor  # flat route n = t*K + k -> slot in (E*C), or E*C when dropped
    source_S: torch.Tensor  # slot -> source token, or T (a zero pad row) when empty
    routed_E: torch.Tensor  # routes per global expert, before drops (local tokens)
    kept_E: torch.Tensor  # routes per global expert that got a slot
    segments_L: Optional[torch.Tensor] = None  # padded slots: no segments (see SegmentPlan)


class TokenDispatcher:
    """Plans, dispatches and combines tokens for one MoE layer.

    The expert-parallel group is passed in (None: everything is local).
    """

    def __init__(self, config: MoEConfig, ep_group: Optional[parallel.ProcessGroup] = None) -> None:
        self.config = config
        self.ep_group = ep_group

    @property
    def ep_size(self) -> int:
        return parallel.group_size(self.ep_group)

    def capacity(self, routed_E: torch.Tensor, num_tokens: int, training: bool) -> int:
        cfg = self.config
        # One MAX all-reduce agrees on both the largest load and the token count.
        stats = torch.stack([routed_E.max(), torch.tensor(num_tokens, device=routed_E.device)]).long()
        max_load, max_tokens = (int(v) for v in parallel.all_reduce_max(self.ep_group, stats))
        if cfg.dropless:
            return max(max_load, 1)
        factor = cfg.capacity_factor if training else cfg.eval_capacity_factor
        return max(math.ceil(cfg.k * max_tokens / cfg.num_experts * factor), cfg.min_capacity, 1)

    def route_order(self, experts_TK: torch.Tensor, probs_TK: torch.Tensor) -> torch.Tensor:
        """Flat routes sorted by expert, and within an expert by priority: first choices
        before second ones, then earlier tokens ("position"), or higher probability first ("probs")."""
        num_tokens, k = experts_TK.shape
        experts_N = experts_TK.reshape(-1)
        if self.config.drop_policy == "probs":
            key_N = -probs_TK.detach().reshape(-1)
        else:
            route_ids = torch.arange(experts_N.numel(), device=experts_N.device)
            key_N = (route_ids % k) * num_tokens + route_ids // k
        order = torch.argsort(key_N, stable=True)
        return order[torch.argsort(experts_N[order], stable=True)]

    def plan(self, experts_TK: torch.Tensor, probs_TK: torch.Tensor, training: bool) -> DispatchPlan:
        num_tokens, k = experts_TK.shape
        num_experts = self.config.num_experts
        experts_N = experts_TK.reshape(-1)
        routed_E = torch.bincount(experts_N, minlength=num_experts)
        capacity = self.capacity(routed_E, num_tokens, training)

        order = self.route_order(experts_TK, probs_TK)
        starts_E = torch.cumsum(routed_E, 0) - routed_E
        position_N = torch.empty_like(experts_N)
        position_N[order] = torch.arange(experts_N.numel(), device=experts_N.device) - starts_E[experts_N[order]]

        kept = position_N < capacity
        scratch = num_experts * capacity
        slot_N = torch.where(kept, experts_N * capacity + position_N, torch.full_like(experts_N, scratch))
        token_N = torch.arange(num_tokens, device=experts_N.device).repeat_interleave(k)
        source_S = torch.full((scratch + 1,), num_tokens, dtype=torch.long, device=experts_N.device)
        source_S.scatter_(0, slot_N, token_N)
        return DispatchPlan(capacity=capacity,
                            slot_N=slot_N,
                            source_S=source_S[:-1],
                            routed_E=routed_E,
                            kept_E=torch.clamp(routed_E, max=capacity))

    def dispatch(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """(T, D) tokens -> (L, P*C, D) slots of this rank's local experts."""
        num_experts, ep = self.config.num_experts, self.ep_size
        padded_TD = torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[1])])
        buffer_ECD = padded_TD.index_select(0, plan.source_S).view(num_experts, plan.capacity, -1)
        received = parallel.all_to_all(self.ep_group, buffer_ECD)  # (P_src, L, C, D) flattened as (E, C, D)
        local = received.view(ep, num_experts // ep, plan.capacity, -1)
        return local.transpose(0, 1).reshape(num_experts // ep, ep * plan.capacity, -1)

    def combine(self, y_LSD: torch.Tensor, plan: DispatchPlan, weights_TK: torch.Tensor) -> torch.Tensor:
        """(L, P*C, D) expert outputs -> (T, D) weighted sum over each token's routes."""
        num_experts, ep = self.config.num_experts, self.ep_size
        num_tokens, k = weights_TK.shape
        dim = y_LSD.shape[-1]
        per_source = y_LSD.view(num_experts // ep, ep, plan.capacity, dim).transpose(0, 1)
        returned = parallel.all_to_all(self.ep_group, per_source.reshape(num_experts, plan.capacity, dim))
        flat_SD = torch.cat([returned.reshape(-1, dim), returned.new_zeros(1, dim)])
        routed_NKD = flat_SD.index_select(0, plan.slot_N).view(num_tokens, k, dim)
        # Weights are fp32; accumulate the K routes in fp32, return the input dtype.
        return (routed_NKD * weights_TK.unsqueeze(-1)).sum(dim=1).to(y_LSD.dtype)

    def valid_slots(self, plan: DispatchPlan) -> torch.Tensor:
        """(L, P*C) bool mask of slots that hold a real token on this rank.

        Positions are filled from 0, so slot c of source p is real iff
        c < kept[p, e]; the kept counts travel in one small all-to-all.
        """
        num_experts, ep = self.config.num_experts, self.ep_size
        kept_PL = parallel.all_to_all(self.ep_group, plan.kept_E.view(ep, -1)).view(ep, num_experts // ep)
        slots_C = torch.arange(plan.capacity, device=kept_PL.device)
        valid_PLC = slots_C.view(1, 1, -1) < kept_PL.unsqueeze(-1)
        return valid_PLC.transpose(0, 1).reshape(num_experts // ep, ep * plan.capacity)


@dataclass
class SegmentPlan:
    """Where each route goes without padding (``moe.dropless_impl: segments``).

    Sent rows are the routes in :meth:`TokenDispatcher.route_order` (grouped by
    global expert, so by destination rank); received rows come source-major
    (P, L) and are regrouped expert-major (L, P) for the grouped matmul.
    """

    order_R: torch.Tensor  # sent row r -> flat route n
    token_R: torch.Tensor  # sent row r -> source token
    rank_N: torch.Tensor  # flat route n -> sent row (inverse of order_R)
    send_P: list[int]  # rows sent to each rank of the group
    recv_P: list[int]  # rows received from each rank
    regroup_R: torch.Tensor  # expert-major row -> received (source-major) row
    ungroup_R: torch.Tensor  # received row -> expert-major row (inverse of regroup_R)
    segments_L: torch.Tensor  # rows per local expert (all sources), the grouped matmul's segments
    routed_E: torch.Tensor  # routes per global expert (local tokens); nothing is dropped


def _inverse(permutation: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(permutation)
    inverse[permutation] = torch.arange(len(permutation), device=permutation.device)
    return inverse


def _block_major_swap(counts_PL: torch.Tensor) -> torch.Tensor:
    """Row index that reads rows stored in (P, L) blocks of ``counts_PL`` rows in (L, P) block order."""
    flat = counts_PL.reshape(-1)
    starts_PL = (torch.cumsum(flat, 0) - flat).view_as(counts_PL)
    counts_LP, starts_LP = counts_PL.t().reshape(-1), starts_PL.t().reshape(-1)
    total = int(flat.sum())
    block_starts = torch.cumsum(counts_LP, 0) - counts_LP
    within = torch.arange(total, device=flat.device) - torch.repeat_interleave(block_starts, counts_LP,
                                                                                output_size=total)
    return torch.repeat_interleave(starts_LP, counts_LP, output_size=total) + within


class SegmentDispatcher(TokenDispatcher):
    """Dropless dispatch without padding: per-expert split sizes, a (R, D) buffer of routed tokens only.

    Each rank sends exactly its routes (sorted by global expert) in one
    variable-split all-to-all, after exchanging the (P, L) route counts in a
    small equal-split one; the experts compute R = routed rows with a grouped
    matmul (:mod:`mpomoe_ds.moe.grouped`). The routes an expert sees, and their
    order within each source rank, are those of the padded dropless path, so
    both compute the same function; only summation order (roundoff) differs.
    """

    def plan(self, experts_TK: torch.Tensor, probs_TK: torch.Tensor, training: bool) -> SegmentPlan:
        num_experts, ep = self.config.num_experts, self.ep_size
        routed_E = torch.bincount(experts_TK.reshape(-1), minlength=num_experts)
        order_R = self.route_order(experts_TK, probs_TK)
        sent_PL = routed_E.view(ep, num_experts // ep)
        recv_PL = parallel.all_to_all(self.ep_group, sent_PL)  # rows from source p for my local expert l
        regroup_R = _block_major_swap(recv_PL)
        return SegmentPlan(order_R=order_R, token_R=order_R // experts_TK.shape[1], rank_N=_inverse(order_R),
                           send_P=sent_PL.sum(1).tolist(), recv_P=recv_PL.sum(1).tolist(),
                           regroup_R=regroup_R, ungroup_R=_inverse(regroup_R),
                           segments_L=recv_PL.sum(0), routed_E=routed_E)

    def dispatch(self, x_TD: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
        """(T, D) tokens -> (R, D) routed rows of this rank's local experts, expert-major."""
        sent_RD = x_TD.index_select(0, plan.token_R)
        received = parallel.all_to_all_variable(self.ep_group, sent_RD, plan.send_P, plan.recv_P)
        return received.index_select(0, plan.regroup_R)

    def combine(self, y_RD: torch.Tensor, plan: SegmentPlan, weights_TK: torch.Tensor) -> torch.Tensor:
        """(R, D) expert outputs -> (T, D) weighted sum over each token's routes."""
        num_tokens, k = weights_TK.shape
        received = y_RD.index_select(0, plan.ungroup_R)
        returned = parallel.all_to_all_variable(self.ep_group, received, plan.recv_P, plan.send_P)
        routed_NKD = returned.index_select(0, plan.rank_N).view(num_tokens, k, -1)
        # Weights are fp32; accumulate the K routes in fp32, return the input dtype (as the padded path).
        return (routed_NKD * weights_TK.unsqueeze(-1)).sum(dim=1).to(y_RD.dtype)

    def valid_slots(self, plan: SegmentPlan) -> torch.Tensor:
        """(R,) all True: every row is a real token (no communication; the experts pad what a hook observes)."""
        return torch.ones(sum(plan.recv_P), dtype=torch.bool, device=plan.segments_L.device)


def build_dispatcher(config: MoEConfig, ep_group: Optional[parallel.ProcessGroup] = None) -> TokenDispatcher:
    """The dispatcher ``moe.dropless_impl`` asks for."""
    if config.dropless and config.dropless_impl == "segments":
        return SegmentDispatcher(config, ep_group)
    return TokenDispatcher(config, ep_group)
