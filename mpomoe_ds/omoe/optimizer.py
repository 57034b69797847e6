"""The orthogonal expert optimizer: phases, projector collectives, cost and checkpoint state.

:class:`OrthogonalExpertOptimizer` runs the method of :mod:`mpomoe_ds.omoe`
around an ordinary optimizer as a participant of the MoE step protocol
(:class:`mpomoe_ds.moe.step.MoEStep`): ``begin_step`` switches phase (and runs
the phase change's collectives), ``expert_hooks`` hands each layer its
:class:`~mpomoe_ds.omoe.hooks.LayerHooks` for the step, ``end_step`` records
inputs or projects the applied update.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from mpomoe_ds import parallel
from mpomoe_ds.config import ConfigError
from mpomoe_ds.moe.experts import MoEExperts
from mpomoe_ds.moe.layer import moe_layers
from mpomoe_ds.omoe.config import PHASES, OMoEConfig
from mpomoe_ds.omoe.hooks import LayerHooks

GRADIENT_ON_MPO_WARNING = (
    "omoe.projection='gradient' with MPO experts projects dL/dW_e, but the multilinear core map and Adam's "
    "per-coordinate scaling undo it: the applied change of W_e leaked 0.31 into the other experts' inputs vs 0.33 "
    "without OMoE (issue 17, 4 experts, Adam). Use omoe.projection='null_space' for an orthogonal applied update")


def check_update_mode_supported(engine: Any) -> None:
    """Refuse ``projection="update"`` where the optimizer keeps master weights we cannot reach.

    ``engine`` is a DeepSpeed engine (duck-typed). Plain torch optimizers need no check.
    """
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
    mixed = any(getattr(engine, f, lambda: False)() for f in ("fp16_enabled", "bfloat16_enabled"))
    if stage > 0 or mixed:
        raise ConfigError(f"omoe.projection='update' with ZeRO stage {stage}"
                          f"{' and fp16/bf16' if mixed else ''}: the optimizer's fp32 master weights would "
                          f"overwrite the correction; use omoe.projection='gradient', or ZeRO 0 in fp32")


@dataclass
class OMoECost:
    """What OMoE adds, per rank (fp32 bytes; MACs are multiply-adds).

    projector_bytes: mean projectors held in the orthogonal phase,
        sum over layers and matrices of L * I^2 * 4 (doubled with reset="never",
        which also keeps each expert's own P_j).
    record_bytes: the accumulating phase's per-step input sums, K * L * (I + 1) * 4.
    snapshot_bytes: "update" projection's copy of the projected matrices, L * I * O * 4;
        "null_space": its fp32 copy of the auxiliary cores (L * n_aux * 4) and
        of the central (n_central * 4) per projected matrix, held through each orthogonal step.
    basis_bytes: "null_space" only: the protected bases Q, L * I * r * 4 per matrix
        (zero-padded to r = the protected rank), held through the orthogonal phase.
    orth_step_macs: projection per orthogonal step, L * I^2 * O per matrix per layer
        (per micro-batch with "gradient", since the hook runs in every backward);
        "null_space": the correction of :func:`mpomoe_ds.omoe.null_space.correction_macs`,
        ~(newton_iters (5 cg_iters + 3) + 3) reconstructions of the L experts' matrix plus
        (2 newton_iters (cg_iters + 1) + 1) products L * I * r * O with Q.
    acc_step_macs: recording the mean inputs per accumulating step, ~L * S * I (S slots).
    phase_change_macs: OWM recursion (~2 K L I^2) plus the mean projectors, per cycle;
        "null_space" adds the eigendecomposition for Q, counted as L * I^3 (order of magnitude).
    collectives_per_cycle: all-reduces per cycle (EP sum of projectors when
        ep_size > 1; expert-data-parallel sum of the input records when replicas exist).
    comm_bytes_per_cycle: payload of those all-reduces (a ring moves ~2x this per rank).
    comm_bytes_per_step: the same averaged over the cycle's steps.
    """

    projector_bytes: int
    record_bytes: int
    snapshot_bytes: int
    basis_bytes: int
    orth_step_macs: int
    acc_step_macs: int
    phase_change_macs: int
    collectives_per_cycle: int
    comm_bytes_per_cycle: int
    comm_bytes_per_step: float
    per_layer: dict[str, dict[str, int]]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class OrthogonalExpertOptimizer:
    """Runs OMoE around an ordinary optimizer.

    Usage: a participant of the MoE step protocol, which tells it when each
    optimizer step (all micro-batches of a global batch) begins and ends::

        omoe = OrthogonalExpertOptimizer(model, config.omoe, ep_group=..., expert_dp_group=...)
        moe_step = MoEStep(model, participants=[omoe])
        for step in range(start, steps):
            moe_step.begin_step(step)    # phase switch (+ its collectives) happens here
            ...                          # micro-batches: forward, backward, optimizer step
            moe_step.end_step(step)      # record inputs / project the applied update

    In accumulating steps its hooks record the inputs each expert sees, in
    orthogonal steps they project gradients; between steps (evaluation) no
    hook runs. Checkpoint with :meth:`state_dict`, one file per rank
    (projectors are per local expert).

    Args:
        model: any module containing :class:`MoEExperts` containers (the
            lead's ``MPOEMoE`` layers, a DeepSpeed engine's ``module``...).
        config: :class:`OMoEConfig`.
        ep_group: the expert-parallel group (None when ep_size == 1).
        expert_dp_group: ranks holding replicas of the same experts (None or a
            size-1 group when there are none).
    """

    def __init__(self, model: nn.Module, config: OMoEConfig, ep_group: Optional[Any] = None,
                 expert_dp_group: Optional[Any] = None) -> None:
        self.config = config
        self.ep_group = ep_group
        self.expert_dp_group = expert_dp_group
        containers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoEExperts)]
        if not containers:
            raise ValueError("OMoE found no MoEExperts in the model: build MoE layers first")
        centrals = {id(layer.experts): layer.central for _, layer in moe_layers(model)}
        self.layers: dict[str, LayerHooks] = {}
        if config.projection == "gradient" and any(experts.is_mpo for _, experts in containers):
            warnings.warn(GRADIENT_ON_MPO_WARNING, stacklevel=2)
        for name, experts in containers:
            if experts.num_experts < 2:
                raise ConfigError(f"omoe.enabled: layer {name} has {experts.num_experts} expert; OMoE projects "
                                  f"each expert against the others and needs num_experts >= 2")
            if config.projection == "update" and experts.is_mpo:
                raise ConfigError("omoe.projection='update' needs plain experts (moe.expert_type='ffn'): an MPO "
                                  "expert's W is not a parameter; use omoe.projection='gradient'")
            self.layers[name] = LayerHooks(config, name, experts, centrals.get(id(experts)))
        self.phase = "off"
        self.cycle = -1
        self.position = 0
        self._in_step: Optional[int] = None
        self.counters = {"collectives": 0, "comm_bytes": 0, "phase_changes": 0}
        self._by_experts = {id(state.experts): state for state in self.layers.values()}

    # ---- StepParticipant (mpomoe_ds.moe.step)

    def expert_hooks(self, layer: nn.Module) -> Optional[LayerHooks]:
        """This step's hooks for ``layer``'s experts: none while OMoE is off (disabled or before start_step)."""
        if self.phase == "off":
            return None
        return self._by_experts.get(id(layer.experts))

    @property
    def ep_size(self) -> int:
        return parallel.group_size(self.ep_group)

    @property
    def expert_dp_size(self) -> int:
        return parallel.group_size(self.expert_dp_group)

    # ---- step API

    def begin_step(self, step: int) -> str:
        """Enter optimizer step ``step``: switch phase if due (collectives only then); returns the phase."""
        phase, cycle, position = self.config.phase_at(step)
        if phase == "accumulate" and (self.phase != "accumulate" or cycle != self.cycle):
            self._start_cycle(first=self.cycle < 0)
        elif phase == "orthogonal" and (self.phase != "orthogonal" or cycle != self.cycle):
            if self.phase != "accumulate" or cycle != self.cycle:
                # Jumped into an orthogonal phase without its accumulating phase
                # (e.g. started mid-cycle without OMoE state): nothing recorded,
                # so project with whatever projectors exist (identity after a reset).
                self._start_cycle(first=self.cycle < 0)
            self._finish_accumulating()
        elif phase == "off":
            for state in self.layers.values():
                state.mean_projector = {m: None for m in state.in_dim}
        self._set_phase(phase, cycle, position)
        if phase == "orthogonal" and self.config.projection == "update":
            for state in self.layers.values():
                state.take_snapshot()
        if phase == "orthogonal" and self.config.projection == "null_space":
            for state in self.layers.values():
                state.take_null_space_snapshot()
        self._in_step = step
        return phase

    def end_step(self, step: int) -> None:
        """Close optimizer step ``step`` (after the optimizer step)."""
        if self._in_step != step:
            raise RuntimeError(f"end_step({step}) without begin_step({step}) (last was {self._in_step})")
        if self.phase == "accumulate":
            alpha = self.config.alpha_at(self.position)
            for state in self.layers.values():
                state.record_step(alpha)
        elif self.phase == "orthogonal" and self.config.projection == "update":
            for state in self.layers.values():
                state.project_applied_update()
        elif self.phase == "orthogonal" and self.config.projection == "null_space":
            for state in self.layers.values():
                state.project_null_space()
        self._in_step = None

    def _set_phase(self, phase: str, cycle: int, position: int) -> None:
        self.phase, self.cycle, self.position = phase, cycle, position
        for state in self.layers.values():
            state.phase = phase

    def _start_cycle(self, first: bool) -> None:
        reset = first or self.config.reset == "cycle"
        for state in self.layers.values():
            state.start_cycle(reset)

    def _finish_accumulating(self) -> None:
        """Projectors from the phase's inputs, then the mean projectors of the others.

        At most two collectives: the input records over the expert-data-parallel
        group, the projector sums over the expert-parallel group.
        """
        names = [(n, m) for n, s in self.layers.items() for m in s.in_dim]
        sums, counts = {}, {}
        for n, m in names:
            sums[n, m], counts[n, m] = self.layers[n].stacked_records(m)
        if self.expert_dp_size > 1:
            flat = self._all_reduce([t for key in names for t in (sums[key], counts[key])], self.expert_dp_group)
            for i, key in enumerate(names):
                sums[key], counts[key] = flat[2 * i], flat[2 * i + 1]
        for name, state in self.layers.items():
            state.build_projectors({m: sums[name, m] for m in state.in_dim},
                                   {m: counts[name, m] for m in state.in_dim}, self.config.normalize_inputs)
        local = [self.layers[n].local_projector_sum(m) for n, m in names]
        totals = self._all_reduce(local, self.ep_group) if self.ep_size > 1 else local
        keep = self.config.reset == "never"
        for name, state in self.layers.items():
            state.set_mean_projectors({m: totals[names.index((name, m))] for m in state.in_dim}, keep)
            if self.config.projection == "null_space":
                state.set_bases()
        self.counters["phase_changes"] += 1

    def _all_reduce(self, tensors: Sequence[torch.Tensor], group: Any) -> list[torch.Tensor]:
        """One SUM all-reduce of several tensors through a flat buffer."""
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        flat = parallel.all_reduce(flat, group)
        self.counters["collectives"] += 1
        self.counters["comm_bytes"] += flat.numel() * flat.element_size()
        out, offset = [], 0
        for t in tensors:
            out.append(flat[offset:offset + t.numel()].view_as(t).to(t.dtype))
            offset += t.numel()
        return out

    # ---- reporting

    def stats(self) -> dict[str, float]:
        """Scalars for logging (names prefixed ``omoe/``)."""
        out = {"omoe/phase": float(PHASES.index(self.phase)), "omoe/cycle": float(self.cycle),
               **{f"omoe/{k}": float(v) for k, v in self.counters.items()}}
        for name, state in self.layers.items():
            for m, pbar in state.mean_projector.items():
                if pbar is not None:
                    # Fraction of input directions expert i may still move in, mean over local experts.
                    free = torch.diagonal(pbar, dim1=-2, dim2=-1).sum(-1).mean() / state.in_dim[m]
                    out[f"omoe/{name}.{m}/free_fraction"] = float(free)
                if m in state.grad_kept and self.phase == "orthogonal":
                    out[f"omoe/{name}.{m}/grad_kept"] = float(state.grad_kept[m])
                if m in state.leak:
                    # ||Q^T dW|| / ||dW|| of the last orthogonal step's applied change, mean / max over local experts.
                    out[f"omoe/{name}.{m}/leak"] = float(state.leak[m].mean())
                    out[f"omoe/{name}.{m}/leak_max"] = float(state.leak[m].max())
                    basis = state.basis[m]
                    out[f"omoe/{name}.{m}/protected_rank"] = float((basis.norm(dim=1) > 0).sum(-1).float().mean())
        return out

    def cost(self, slots_per_expert: int = 0, micro_batches: int = 1) -> OMoECost:
        """Memory, compute and communication OMoE adds on this rank (see :class:`OMoECost`)."""
        cfg = self.config
        fp32 = 4
        keep = 2 if cfg.reset == "never" else 1
        per_layer: dict[str, dict[str, int]] = {}
        tot = dict(projector_bytes=0, record_bytes=0, snapshot_bytes=0, basis_bytes=0, orth_step_macs=0,
                   acc_step_macs=0, phase_change_macs=0, ep_bytes=0, dp_bytes=0)
        for name, state in self.layers.items():
            for m in state.in_dim:
                L, I, O = state.num_local, state.in_dim[m], state.out_dim[m]
                row = {
                    "projector_bytes": keep * L * I * I * fp32,
                    "record_bytes": cfg.acc_steps * L * (I + 1) * fp32,
                    "snapshot_bytes": L * I * O * fp32 if cfg.projection == "update" else 0,
                    "basis_bytes": 0,
                    "orth_step_macs": L * I * I * O * (micro_batches if cfg.projection == "gradient" else 1),
                    "acc_step_macs": L * slots_per_expert * I * micro_batches,
                    "phase_change_macs": 2 * cfg.acc_steps * L * I * I + L * I * I,
                    "ep_bytes": I * I * fp32 if self.ep_size > 1 else 0,
                    "dp_bytes": cfg.acc_steps * L * (I + 1) * fp32 if self.expert_dp_size > 1 else 0,
                }
                if cfg.projection == "null_space":
                    row.update(state.null_space_cost(m))
                    row["phase_change_macs"] += L * I ** 3
                per_layer[f"{name}.{m}"] = row
                for k, v in row.items():
                    tot[k] += v
        collectives = int(self.ep_size > 1) + int(self.expert_dp_size > 1)
        comm = tot.pop("ep_bytes") + tot.pop("dp_bytes")
        return OMoECost(collectives_per_cycle=collectives, comm_bytes_per_cycle=comm,
                        comm_bytes_per_step=comm / cfg.cycle_steps, per_layer=per_layer, **tot)

    # ---- checkpoint

    def state_dict(self) -> dict[str, Any]:
        """This rank's OMoE state (its local experts' projectors and records)."""
        return {"phase": self.phase, "cycle": self.cycle, "position": self.position,
                "counters": dict(self.counters), "config": asdict(self.config),
                "layers": {name: state.state_dict() for name, state in self.layers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.layers) ^ set(state["layers"]))
        if missing:
            raise ValueError(f"OMoE state does not match the model's MoE layers; differing names: {missing}")
        saved = state["config"]
        for key in ("acc_steps", "orth_steps", "start_step", "matrices", "reset", "projection"):
            if saved[key] != getattr(self.config, key):
                raise ValueError(f"OMoE state was saved with omoe.{key}={saved[key]!r} but the run has "
                                 f"{getattr(self.config, key)!r}; resume with the same value or drop the OMoE state")
        self._set_phase(state["phase"], state["cycle"], state["position"])
        self.counters = dict(state["counters"])
        for name, layer_state in state["layers"].items():
            self.layers[name].load_state_dict(layer_state)
