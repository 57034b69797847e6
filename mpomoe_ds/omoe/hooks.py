"""One MoE layer's OMoE state, handed to its experts as their ``ExpertHooks`` for a step.

:class:`LayerHooks` records the mean inputs of accumulating steps, builds the
layer's projectors from them, and projects expert-weight gradients (or, for
plain experts, applied updates) in orthogonal steps. The optimizer
(:mod:`mpomoe_ds.omoe.optimizer`) owns one per layer, decides the phase and
runs the collectives. Shape legend: L local experts, I / O input / output dim
of a projected matrix, S slots per expert, K recorded steps.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from deepspeed.utils import safe_set_full_fp32_param
from torch import nn

from mpomoe_ds.config import ConfigError
from mpomoe_ds.moe.experts import MoEExperts
from mpomoe_ds.mpo.reconstruction import reconstruct_shared, shared_reconstruction_macs
from mpomoe_ds.omoe.config import OMoEConfig
from mpomoe_ds.omoe.null_space import correction_macs, leak, max_protected_rank, project_aux_step, protected_basis
from mpomoe_ds.omoe.projector import mean_other_projector, owm_update, project_input_dim


class LayerHooks:
    """OMoE state of one MoE layer's local experts: the ``ExpertHooks`` its experts run in OMoE steps.

    Holds, per projected matrix: the running input sums of the current step,
    the per-step records of the accumulating phase, the kept projectors
    (``reset="never"``) and the mean projectors of the orthogonal phase.
    """

    def __init__(self, config: OMoEConfig, name: str, experts: MoEExperts,
                 central: Optional[nn.ParameterDict] = None) -> None:
        self.config = config
        self.central = central  # the layer's CentralTensors ("null_space" keeps it fixed in orthogonal phases)
        self.phase = "off"  # the optimizer's phase for the current step; set by the optimizer only
        self.name = name
        self.experts = experts
        self.num_local = experts.num_local_experts
        self.num_experts = experts.num_experts
        weights = _weight_shapes(experts)
        missing = [m for m in config.matrices if m not in weights]
        if missing:
            raise ValueError(f"omoe.matrices={list(config.matrices)}: the experts have no {missing} matrix "
                             f"(they have {list(weights)}); 'gate' exists only for gated experts")
        self.in_dim = {m: weights[m][0] for m in config.matrices}
        self.out_dim = {m: weights[m][1] for m in config.matrices}
        self.dtype = torch.float32
        self.step_sum: dict[str, torch.Tensor] = {}
        self.step_count: dict[str, torch.Tensor] = {}
        self.records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in self.in_dim}
        self.alphas: list[float] = []
        self.projector: dict[str, Optional[torch.Tensor]] = {m: None for m in self.in_dim}  # None = identity
        self.mean_projector: dict[str, Optional[torch.Tensor]] = {m: None for m in self.in_dim}
        self.snapshot: dict[str, torch.Tensor] = {}
        self.grad_kept: dict[str, torch.Tensor] = {}  # ||P_bar G|| / ||G|| of the last backward, for logging
        self.protected_rank = self._null_space_rank() if config.projection == "null_space" else {}
        self.basis: dict[str, Optional[torch.Tensor]] = {m: None for m in self.in_dim}  # Q_i (L, I, r)
        self.leak: dict[str, torch.Tensor] = {}  # (L,) ||Q^T dW|| / ||dW|| of the last applied step
        self.clear_step()

    def _null_space_rank(self) -> dict[str, int]:
        """Protected directions per matrix, within the structural budget r * d_out < n_aux (else refused)."""
        if not self.experts.is_mpo:
            raise ConfigError("omoe.projection='null_space' corrects auxiliary MPO cores: it needs "
                              "moe.expert_type='mpo' (for plain experts use omoe.projection='update')")
        if getattr(self.central, "sharded", False):
            raise ConfigError("omoe.projection='null_space' with moe.shard_central: the correction needs the full "
                              "central tensor every step, which sharding would all-gather; set "
                              "moe.shard_central: false")
        ranks = {}
        for m in self.in_dim:
            n_aux = sum(c.numel() for c in self.experts.deepspeed_experts[0].aux_cores(m))
            budget = max_protected_rank(n_aux, self.out_dim[m])
            rank = self.config.null_space_rank or max(budget // 2, 1)
            if budget < 1 or rank > budget:
                raise ConfigError(
                    f"omoe.null_space_rank={rank}: layer {self.name} matrix {m!r} has n_aux={n_aux} auxiliary "
                    f"parameters per expert and d_out={self.out_dim[m]}, so an exactly orthogonal change of W_e can "
                    f"protect at most r = (n_aux - 1) // d_out = {budget} input directions (r * d_out < n_aux); "
                    f"lower omoe.null_space_rank (or null for {max(budget // 2, 1)}), or use larger bond dims")
            ranks[m] = rank
        return ranks

    @property
    def device(self) -> torch.device:
        """Where the experts live now (the engine may move the model after we were built)."""
        return next(self.experts.parameters()).device

    # ---- ExpertHooks protocol

    @property
    def observing(self) -> bool:
        """Whether forwards should pass ``valid_LS`` (only accumulating steps record inputs).

        Lets the layer skip the valid-slot all-to-all in other steps.
        """
        return self.phase == "accumulate"

    def transform_weight(self, experts: MoEExperts, matrix: str, weight_LIO: torch.Tensor) -> torch.Tensor:
        pbar = self.mean_projector.get(matrix)
        if (pbar is None or self.phase != "orthogonal" or self.config.projection != "gradient"
                or not weight_LIO.requires_grad or not torch.is_grad_enabled()):
            return weight_LIO

        def project(grad_LIO: torch.Tensor) -> torch.Tensor:
            projected = project_input_dim(pbar, grad_LIO.float())
            self.grad_kept[matrix] = projected.norm() / grad_LIO.float().norm().clamp_min(1e-30)
            return projected.to(grad_LIO.dtype)

        weight_LIO.register_hook(project)
        return weight_LIO

    @torch.no_grad()
    def observe_inputs(self, experts: MoEExperts, matrix: str, inputs_LSI: torch.Tensor,
                       valid_LS: torch.Tensor) -> None:
        if self.phase != "accumulate" or matrix not in self.in_dim:
            return
        mask_LS = valid_LS.to(torch.float32)
        self.step_sum[matrix] += torch.einsum("lsi,ls->li", inputs_LSI.float(), mask_LS)
        self.step_count[matrix] += mask_LS.sum(1)

    # ---- accumulate

    def clear_step(self) -> None:
        for m, dim in self.in_dim.items():
            self.step_sum[m] = torch.zeros(self.num_local, dim, device=self.device, dtype=self.dtype)
            self.step_count[m] = torch.zeros(self.num_local, device=self.device, dtype=self.dtype)

    def record_step(self, alpha: float) -> None:
        for m in self.in_dim:
            self.records[m].append((self.step_sum[m].clone(), self.step_count[m].clone()))
        self.alphas.append(alpha)
        self.clear_step()

    def start_cycle(self, reset: bool) -> None:
        self.records = {m: [] for m in self.in_dim}
        self.alphas = []
        self.mean_projector = {m: None for m in self.in_dim}
        if reset:
            self.projector = {m: None for m in self.in_dim}
        self.clear_step()

    def stacked_records(self, matrix: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, L, I) sums and (K, L) counts of the phase's steps."""
        recs = self.records[matrix]
        if not recs:
            return (torch.zeros(0, self.num_local, self.in_dim[matrix], device=self.device),
                    torch.zeros(0, self.num_local, device=self.device))
        return torch.stack([s for s, _ in recs]), torch.stack([c for _, c in recs])

    def build_projectors(self, sums_KLI: dict[str, torch.Tensor], counts_KL: dict[str, torch.Tensor],
                         normalize: bool) -> None:
        """Run the OWM recursion over the phase's (globally reduced) mean inputs."""
        for m, dim in self.in_dim.items():
            P_LII = self.projector[m]
            if P_LII is None:
                P_LII = torch.eye(dim, device=self.device, dtype=self.dtype).expand(self.num_local, dim, dim)
            P_LII = P_LII.clone()
            for t, alpha in enumerate(self.alphas):
                present_L = counts_KL[m][t] > 0
                r_LI = sums_KLI[m][t] / counts_KL[m][t].clamp_min(1).unsqueeze(-1)
                if normalize:
                    r_LI = r_LI / r_LI.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                P_LII = owm_update(P_LII, r_LI, alpha, present_L)
            self.projector[m] = P_LII
        self.records = {m: [] for m in self.in_dim}

    def local_projector_sum(self, matrix: str) -> torch.Tensor:
        P_LII = self.projector[matrix]
        dim = self.in_dim[matrix]
        if P_LII is None:
            return self.num_local * torch.eye(dim, device=self.device, dtype=self.dtype)
        return P_LII.sum(0)

    def set_mean_projectors(self, sums_II: dict[str, torch.Tensor], keep_projectors: bool) -> None:
        for m, dim in self.in_dim.items():
            P_LII = self.projector[m]
            if P_LII is None:
                P_LII = torch.eye(dim, device=self.device, dtype=self.dtype).expand(self.num_local, dim, dim)
            self.mean_projector[m] = mean_other_projector(sums_II[m], P_LII, self.num_experts).contiguous()
            if not keep_projectors:
                self.projector[m] = None  # rebuilt from I next cycle; frees L * I^2

    # ---- "update" projection

    def expert_matrix_params(self, matrix: str) -> list[nn.Parameter]:
        return [getattr(e, f"{matrix}_weight") for e in self.experts.deepspeed_experts]

    @torch.no_grad()
    def take_snapshot(self) -> None:
        self.snapshot = {m: torch.stack([p.detach() for p in self.expert_matrix_params(m)]).clone()
                         for m in self.in_dim}

    @torch.no_grad()
    def project_applied_update(self) -> None:
        for m, before_LIO in self.snapshot.items():
            params = self.expert_matrix_params(m)
            delta_LIO = torch.stack([p.detach() for p in params]).float() - before_LIO.float()
            projected = before_LIO.float() + project_input_dim(self.mean_projector[m], delta_LIO)
            for p, new in zip(params, projected):
                p.copy_(new.to(p.dtype))
        self.snapshot = {}

    # ---- "null_space" projection (MPO experts)

    def set_bases(self) -> None:
        """Q_i from this phase's mean projectors (no collective: they already hold the others' sum)."""
        for m, pbar in self.mean_projector.items():
            self.basis[m] = None if pbar is None else protected_basis(pbar, self.num_experts, self.protected_rank[m])

    def _stacked_aux(self, matrix: str) -> list[torch.Tensor]:
        """The local experts' auxiliary cores of ``matrix``, stacked (L, ...), fp32 master values where held."""
        cores = zip(*(e.aux_cores(matrix) for e in self.experts.deepspeed_experts))
        return [torch.stack([_read_fp32(c) for c in core]) for core in cores]

    @torch.no_grad()
    def take_null_space_snapshot(self) -> None:
        self.snapshot = {}
        for m in self.in_dim:
            self.snapshot[m] = {"aux": self._stacked_aux(m), "central": _read_fp32(self.central[m])}

    def null_space_cost(self, matrix: str) -> dict[str, int]:
        """Bytes held and MACs per orthogonal step of the "null_space" correction of ``matrix`` (fp32)."""
        aux = self.experts.deepspeed_experts[0].aux_cores(matrix)
        central = self.central[matrix]
        index = self.experts.central_index
        shapes = [tuple(c.shape) for c in aux[:index]] + [tuple(central.shape)] + [tuple(c.shape) for c in aux[index:]]
        per_expert, central_step = shared_reconstruction_macs(shapes, index)
        L, I, O, r = self.num_local, self.in_dim[matrix], self.out_dim[matrix], self.protected_rank[matrix]
        macs = correction_macs(L * per_expert, L * central_step, L * I * r * O, self.config.cg_iters)
        return {"snapshot_bytes": 4 * (L * sum(c.numel() for c in aux) + central.numel()),
                "basis_bytes": 4 * L * I * r, "orth_step_macs": macs}

    def project_null_space(self) -> None:
        """After the optimizer step: central back to its value, aux steps corrected (see null_space)."""
        index = self.experts.central_index
        for m, before in self.snapshot.items():
            central = before["central"].float()
            _write_parameter(self.central[m], before["central"])

            def weight_fn(*aux: torch.Tensor) -> torch.Tensor:
                return reconstruct_shared(list(aux), central, index)

            after = self._stacked_aux(m)
            fixed = project_aux_step(weight_fn, before["aux"], after, self.basis[m], self.config.cg_iters)
            for c, core in enumerate(fixed):
                for e, expert in enumerate(self.experts.deepspeed_experts):
                    _write_parameter(expert.aux_cores(m)[c], core[e])
            with torch.no_grad():
                delta = weight_fn(*[f.float() for f in fixed]) - weight_fn(*[a.float() for a in before["aux"]])
            self.leak[m] = leak(delta, self.basis[m])
        self.snapshot = {}

    # ---- state

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_local_experts": self.num_local,
            "in_dim": dict(self.in_dim),
            "step_sum": {m: t.cpu().clone() for m, t in self.step_sum.items()},
            "step_count": {m: t.cpu().clone() for m, t in self.step_count.items()},
            "records": {m: [(s.cpu().clone(), c.cpu().clone()) for s, c in recs] for m, recs in self.records.items()},
            "alphas": list(self.alphas),
            "projector": {m: None if t is None else t.cpu().clone() for m, t in self.projector.items()},
            "mean_projector": {m: None if t is None else t.cpu().clone() for m, t in self.mean_projector.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_local_experts"] != self.num_local or dict(state["in_dim"]) != self.in_dim:
            raise ValueError(f"OMoE state of layer {self.name} was saved for {state['num_local_experts']} local "
                             f"experts and input dims {state['in_dim']}; this run has {self.num_local} and "
                             f"{self.in_dim}. OMoE state does not reshard across ep_size or omoe.matrices: "
                             f"restart OMoE (drop its state) to change them")

        def dev(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(self.device)

        self.step_sum = {m: dev(t) for m, t in state["step_sum"].items()}
        self.step_count = {m: dev(t) for m, t in state["step_count"].items()}
        self.records = {m: [(dev(s), dev(c)) for s, c in recs] for m, recs in state["records"].items()}
        self.alphas = list(state["alphas"])
        self.projector = {m: dev(t) for m, t in state["projector"].items()}
        self.mean_projector = {m: dev(t) for m, t in state["mean_projector"].items()}
        if self.config.projection == "null_space":
            self.set_bases()


@torch.no_grad()
def _read_fp32(param: nn.Parameter) -> torch.Tensor:
    """An fp32 copy of ``param`` with this rank's fragment of the optimizer's fp32 master copy laid over it.

    Why: under bf16 the parameter is the master rounded to 8 bits of mantissa,
    and a correction computed from (and a leak measured on) rounded values is
    not orthogonal in the master weights the optimizer steps: measured on the
    2-rank ep 2 run, leak 0.34-0.37 from bf16 values. Only the local fragment
    is read (``_hp_mapping``, DeepSpeed's own fragment map behind
    ``safe_get_full_fp32_param``), so there is no collective; with ep_size =
    world size an expert's master is all local. Parts held by other
    data-parallel ranks keep the rounded value (each rank then writes only its
    own fragment back).
    """
    value = param.detach().float().clone()
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is not None:
        address = mapping.lp_fragment_address
        value.view(-1).narrow(0, address.start, address.numel).copy_(mapping.get_hp_fragment().view(-1))
    return value


@torch.no_grad()
def _write_parameter(param: nn.Parameter, value: torch.Tensor) -> None:
    """Set a parameter and, under ZeRO 1/2 or bf16, the optimizer's fp32 master copy of it.

    Without this the next optimizer step would copy the master weights back over
    the correction. ``safe_set_full_fp32_param`` writes only this rank's fragment
    (no collective) and does nothing for optimizers without master weights.
    """
    param.data.copy_(value.to(param.dtype))
    safe_set_full_fp32_param(param, value.detach().float())


def _weight_shapes(experts: MoEExperts) -> dict[str, tuple[int, int]]:
    """(I, O) of each matrix of one expert, without reconstructing anything.

    Read from the biases (gate, up: D -> F, down: F -> D), which both expert types have.
    """
    expert = experts.deepspeed_experts[0]
    hidden, ffn = expert.down_bias.shape[0], expert.up_bias.shape[0]
    return {m: (ffn, hidden) if m == "down" else (hidden, ffn) for m in experts.matrices}
