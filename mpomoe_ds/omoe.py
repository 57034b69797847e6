"""OMoE: the orthogonal expert optimizer (SPEC section 4).

This module owns the alternating accumulate / orthogonal schedule, the
per-expert projectors, the projection of expert updates, their communication
under expert parallelism, and their checkpoint state. It plugs into the expert
container through the ``ExpertHooks`` protocol of :mod:`mpomoe_ds.experts`
(``transform_weight`` / ``observe_inputs``) and into the training loop through
:meth:`OrthogonalExpertOptimizer.before_step` / :meth:`~OrthogonalExpertOptimizer.after_step`.
Router, attention, embeddings, central tensors' own optimizer state and
expert biases are not touched: they update normally.

Shape legend (suffixes):
    L  local experts of a layer (E / ep_size)      E  global experts
    I  input dim of a projected matrix (d_in: D for "up", F for "down")
    O  output dim of that matrix                     S  slots per expert (tokens incl. padding)
    K  optimizer steps recorded in an accumulating phase

The method. Expert matrices act as ``y = x @ W`` with ``W`` (I, O).

* Accumulating phase (``acc_steps`` ordinary optimizer steps). For every expert
  j and projected matrix, the mean input of the real tokens routed to j in
  the step, ``r`` (I,), is recorded. At the end of the phase it updates the
  expert's projector with the orthogonal-weight-modification (OWM) recursion::

      k = P r ;   P <- P - k k^T / (alpha + r^T k)          (P = I at the start)

  whose closed form, for the recorded inputs as the columns of ``A`` (I, K)
  and per-step ``alpha_t``, is::

      P = I - A (A^T A + diag(alpha))^{-1} A^T  =  (I + sum_t r_t r_t^T / alpha_t)^{-1}.

  ``P`` is symmetric with eigenvalue ``alpha / (s^2 + alpha)`` along a direction
  that carried input energy ``s^2``: ~0 on the inputs the expert has seen, 1
  on directions it never saw.

* Orthogonal phase (``orth_steps`` steps). Expert i's update is projected on
  its input dim with the mean projector of the *other* experts::

      P_bar_{-i} = (sum_j P_j - P_i) / (E - 1)   ;   G_i <- P_bar_{-i} G_i

  so for an input ``a`` seen by the other experts ``a^T (P_bar G_i) =
  (P_bar a)^T G_i ~ 0``: expert i's output on those inputs does not move.
  Caveat of the mean (the spec's choice): ``P_bar a ~ 0`` needs ``a`` to be
  seen by *every* other expert; a direction seen by only one of the E-1 others
  keeps (E-2)/(E-1) of its component. With E = 2, P_bar_{-i} = P_j exactly.

Where the projection acts (``projection``):

* ``"gradient"`` (default; the only choice for MPO experts): a tensor hook on
  the weight ``W_e`` the container reconstructs (MPO) or stacks (plain FFN)
  replaces its gradient by ``P_bar G``; autograd then carries it into the
  auxiliary cores, the shared central tensor, or the per-expert weights. The
  *gradient of W_e* is exactly orthogonal. The *applied* update is orthogonal
  only for plain experts under plain SGD (no momentum carried over from the
  accumulating phase, no weight decay): Adam's per-coordinate scaling
  ``m / sqrt(v)``, momentum and decoupled weight decay all break it, and for
  MPO experts the map cores -> W is multilinear, so even an SGD step on the
  cores changes W by ``J J^T (P_bar G) + O(lr^2)``, not by ``P_bar G``.
  Measured (tests/test_omoe.py, E = 2, ``||A^T dW|| / ||dW||`` over the other
  expert's unit inputs A; without OMoE in brackets): plain + SGD 3e-5 (0.52),
  plain + Adam 0.54 (0.62), MPO + SGD 0.50 (0.78), MPO + Adam 0.70 (0.69).
  So for MPO experts under Adam the projection shapes the gradient the
  optimizer sees, not the step it takes.
* ``"update"`` (plain "ffn" experts only): after the optimizer step, the
  change of each expert matrix is projected,
  ``W <- W_before + P_bar (W_after - W_before)``, so the applied update is
  exactly orthogonal whatever the optimizer (Adam, momentum, weight decay).
  It costs a copy of the projected expert matrices per step and writes the
  module's parameters: with ZeRO or fp16/bf16 the optimizer owns fp32 master
  weights that this write does not reach, so it is refused there
  (:func:`check_update_mode_supported`).

Communication. Projectors of the experts on other ranks are needed only
through ``sum_j P_j``: one SUM all-reduce over the expert-parallel group per
cycle, at the switch to the orthogonal phase, all layers and matrices in one
flat buffer. The recorded per-step input sums are reduced over the
expert-data-parallel group (ranks holding replicas of the same experts) in one
more all-reduce at the same moment, so every replica builds the same projector
from the global batch, exactly as a single process would. No collective runs
in forward, backward or any other step.

Naming conventions:
    projector        P_j, the OWM projector of one expert's inputs (I, I)
    mean projector   P_bar_{-i}, the mean of the other experts' projectors
    cycle            one accumulating phase followed by one orthogonal phase
    phase            "off" (before start_step / disabled), "accumulate", "orthogonal"
    step             the optimizer step counter the training loop passes in
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError, _check_choice, _fail
from .experts import MATRICES, MoEExperts

PHASES = ("off", "accumulate", "orthogonal")
PROJECTIONS = ("gradient", "update")
RESETS = ("cycle", "never")


# --------------------------------------------------------------------------- config


@dataclass
class OMoEConfig:
    """The orthogonal expert optimizer.

    enabled: turn OMoE on.
    acc_steps: K_acc, optimizer steps of each accumulating phase (ordinary
        updates; projectors record one mean input per expert per step).
    orth_steps: K_orth, optimizer steps of each orthogonal phase (expert
        updates projected by P_bar_{-i}).
    start_step: first optimizer step of the first cycle; before it nothing
        happens (e.g. let the router settle / the LR warm up first).
    alpha: OWM regulariser. With ``normalize_inputs`` each recorded r has unit
        norm, so alpha is scale free: a direction is suppressed to
        alpha / (s^2 + alpha) of its gradient, s^2 the number of (unit) inputs'
        worth of energy the expert saw along it.
    alpha_final: if set, alpha decays geometrically from ``alpha`` to
        ``alpha_final`` across each accumulating phase (as in OWM, where later
        inputs of a task are protected more strongly); None = constant.
    normalize_inputs: record r / ||r|| instead of r.
    matrices: which expert matrices are projected: ["up"], ["down"] or both.
    reset: "cycle" (projectors restart from I at every accumulating phase) or
        "never" (keep accumulating over the whole run, as OWM does across tasks).
    projection: "gradient" (project dL/dW_e before the optimizer; MPO and plain
        experts) or "update" (project the optimizer's applied change; plain
        "ffn" experts only, exact for any optimizer).

    Defaults and why:
        acc_steps = orth_steps = 100: 100 mean inputs give each projector up to
            100 directions, far fewer than d_in (768+), so it stays selective,
            and one all-reduce of d_in^2 per matrix per layer every 200 steps
            is noise next to the per-step gradient all-reduce. Equal lengths
            keep half the steps ordinary (experts still learn their own data).
        alpha = 1e-3 with normalized inputs: a direction is removed once the
            phase's unit mean inputs put more than ~1e-3 of energy on it. In
            benchmarks/omoe_diversity.py alpha = 1e-3 lowered expert similarity
            more than 0.1 in every setting (0.1 left ~70% of directions free
            and its effect was within a direction-free control's). Watch the
            logged free_fraction: near 0 means experts barely move in the
            orthogonal phase; raise alpha then.
        normalize_inputs = True: hidden-state norms differ by layer, by model
            and between the "up" input x and the "down" input h, so an
            absolute alpha would need tuning per layer and matrix.
        matrices = ["up"]: the projector of "down" is F x F (F = 4D: 16x the
            memory and ~4x the projection compute of "up"; GPT-2 small with 8
            local experts: 19 MB per layer for "up", 302 MB for "down"); "up"
            is where the token subspace lives. ["up", "down"] gave the larger
            effect in the benchmark: add "down" when memory allows (cost()).
        reset = "cycle": routing and representations drift, so old directions
            go stale; with "never" projectors only shrink and experts freeze.
        projection = "gradient": works for both expert types and costs no
            memory; "update" is the exact choice for plain-FFN baselines.
    """

    enabled: bool = False
    acc_steps: int = 100
    orth_steps: int = 100
    start_step: int = 0
    alpha: float = 1e-3
    alpha_final: Optional[float] = None
    normalize_inputs: bool = True
    matrices: list[str] = field(default_factory=lambda: ["up"])
    reset: str = "cycle"
    projection: str = "gradient"

    def __post_init__(self) -> None:
        s = "omoe"
        if self.acc_steps < 1:
            _fail(s, "acc_steps", self.acc_steps, "use at least 1 accumulating step per cycle")
        if self.orth_steps < 1:
            _fail(s, "orth_steps", self.orth_steps, "use at least 1 orthogonal step per cycle "
                  "(or set omoe.enabled: false for ordinary training)")
        if self.start_step < 0:
            _fail(s, "start_step", self.start_step, "use a step >= 0")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0 and math.isfinite(self.alpha)):
            _fail(s, "alpha", self.alpha, "use a finite alpha > 0 (e.g. 1e-3 with normalized inputs)")
        if self.alpha_final is not None and not (self.alpha_final > 0 and math.isfinite(self.alpha_final)):
            _fail(s, "alpha_final", self.alpha_final, "use a finite alpha_final > 0, or null for a constant alpha")
        if isinstance(self.matrices, str):
            self.matrices = [self.matrices]
        if not self.matrices or any(m not in MATRICES for m in self.matrices) or \
                len(set(self.matrices)) != len(self.matrices):
            _fail(s, "matrices", self.matrices, f"give a non-empty list of distinct names from {list(MATRICES)}")
        _check_choice(s, "reset", self.reset, RESETS)
        _check_choice(s, "projection", self.projection, PROJECTIONS)

    @property
    def cycle_steps(self) -> int:
        return self.acc_steps + self.orth_steps

    def phase_at(self, step: int) -> tuple[str, int, int]:
        """(phase, cycle index, position in the phase) of optimizer step ``step``."""
        if not self.enabled or step < self.start_step:
            return "off", -1, 0
        cycle, pos = divmod(step - self.start_step, self.cycle_steps)
        if pos < self.acc_steps:
            return "accumulate", cycle, pos
        return "orthogonal", cycle, pos - self.acc_steps

    def alpha_at(self, position: int) -> float:
        """alpha of the ``position``-th step of an accumulating phase."""
        if self.alpha_final is None or self.acc_steps == 1:
            return float(self.alpha)
        return float(self.alpha * (self.alpha_final / self.alpha) ** (position / (self.acc_steps - 1)))


# --------------------------------------------------------------------------- pure math


def owm_update(P_LII: torch.Tensor, r_LI: torch.Tensor, alpha: float,
               present_L: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One OWM step per expert: ``k = P r; P <- P - k k^T / (alpha + r^T k)`` (out of place).

    ``present_L`` (bool) skips experts without an input this step. The update
    is exactly symmetric (an outer product), so symmetric P stay symmetric.
    """
    k_LI = torch.bmm(P_LII, r_LI.unsqueeze(-1)).squeeze(-1)
    denom_L = alpha + (r_LI * k_LI).sum(-1)
    step_LII = k_LI.unsqueeze(-1) * k_LI.unsqueeze(-2) / denom_L.view(-1, 1, 1)
    if present_L is not None:
        step_LII = step_LII * present_L.to(step_LII.dtype).view(-1, 1, 1)
    return P_LII - step_LII


def owm_projector(A_IK: torch.Tensor, alpha: Any) -> torch.Tensor:
    """Closed form ``P = I - A (A^T A + diag(alpha))^{-1} A^T`` for inputs as the columns of A.

    ``alpha`` is a scalar or one value per column (the per-step alphas of the
    recursion). Equals K applications of :func:`owm_update` in exact arithmetic.
    """
    dim, count = A_IK.shape
    eye_I = torch.eye(dim, dtype=A_IK.dtype, device=A_IK.device)
    if count == 0:
        return eye_I
    alpha_K = torch.as_tensor(alpha, dtype=A_IK.dtype, device=A_IK.device).expand(count)
    gram_KK = A_IK.T @ A_IK + torch.diag(alpha_K)
    return eye_I - A_IK @ torch.linalg.solve(gram_KK, A_IK.T)


def mean_other_projector(sum_II: torch.Tensor, P_LII: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``P_bar_{-i} = (sum_j P_j - P_i) / (E - 1)`` for each local expert i."""
    if num_experts < 2:
        raise ValueError("the mean projector of the other experts needs at least 2 experts")
    return (sum_II.unsqueeze(0) - P_LII) / (num_experts - 1)


def project_input_dim(P_LII: torch.Tensor, G_LIO: torch.Tensor) -> torch.Tensor:
    """``P_i G_i`` per expert (x @ W orientation: the projection acts on the input dim)."""
    return torch.bmm(P_LII.to(device=G_LIO.device, dtype=G_LIO.dtype), G_LIO)


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


# --------------------------------------------------------------------------- per-layer state


class _LayerHooks:
    """OMoE state of one MoE layer's local experts; the container's ``hooks``.

    Holds, per projected matrix: the running input sums of the current step,
    the per-step records of the accumulating phase, the kept projectors
    (``reset="never"``) and the mean projectors of the orthogonal phase.
    """

    def __init__(self, owner: "OrthogonalExpertOptimizer", name: str, experts: MoEExperts) -> None:
        self.owner = owner
        self.name = name
        self.experts = experts
        self.num_local = experts.num_local_experts
        self.num_experts = experts.num_experts
        weights = _weight_shapes(experts)
        self.in_dim = {m: weights[m][0] for m in owner.config.matrices}
        self.out_dim = {m: weights[m][1] for m in owner.config.matrices}
        self.dtype = torch.float32
        self.step_sum: dict[str, torch.Tensor] = {}
        self.step_count: dict[str, torch.Tensor] = {}
        self.records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in self.in_dim}
        self.alphas: list[float] = []
        self.projector: dict[str, Optional[torch.Tensor]] = {m: None for m in self.in_dim}  # None = identity
        self.mean_projector: dict[str, Optional[torch.Tensor]] = {m: None for m in self.in_dim}
        self.snapshot: dict[str, torch.Tensor] = {}
        self.grad_kept: dict[str, torch.Tensor] = {}  # ||P_bar G|| / ||G|| of the last backward, for logging
        self.clear_step()

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
        return self.owner.phase == "accumulate"

    def transform_weight(self, experts: MoEExperts, matrix: str, weight_LIO: torch.Tensor) -> torch.Tensor:
        pbar = self.mean_projector.get(matrix)
        if (pbar is None or self.owner.phase != "orthogonal" or self.owner.config.projection != "gradient"
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
        if self.owner.phase != "accumulate" or matrix not in self.in_dim:
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


def _weight_shapes(experts: MoEExperts) -> dict[str, tuple[int, int]]:
    """(I, O) of each matrix of one expert, without reconstructing anything.

    Read from the biases (up: D -> F, down: F -> D), which both expert types have.
    """
    expert = experts.deepspeed_experts[0]
    hidden, ffn = expert.down_bias.shape[0], expert.up_bias.shape[0]
    return {"up": (hidden, ffn), "down": (ffn, hidden)}


# --------------------------------------------------------------------------- optimizer


@dataclass
class OMoECost:
    """What OMoE adds, per rank (fp32 bytes; MACs are multiply-adds).

    projector_bytes: mean projectors held in the orthogonal phase,
        sum over layers and matrices of L * I^2 * 4 (doubled with reset="never",
        which also keeps each expert's own P_j).
    record_bytes: the accumulating phase's per-step input sums, K * L * (I + 1) * 4.
    snapshot_bytes: "update" projection's copy of the projected matrices, L * I * O * 4.
    orth_step_macs: projection per orthogonal step, L * I^2 * O per matrix per layer
        (per micro-batch with "gradient", since the hook runs in every backward).
    acc_step_macs: recording the mean inputs per accumulating step, ~L * S * I (S slots).
    phase_change_macs: OWM recursion (~2 K L I^2) plus the mean projectors, per cycle.
    collectives_per_cycle: all-reduces per cycle (EP sum of projectors when
        ep_size > 1; expert-data-parallel sum of the input records when replicas exist).
    comm_bytes_per_cycle: payload of those all-reduces (a ring moves ~2x this per rank).
    comm_bytes_per_step: the same averaged over the cycle's steps.
    """

    projector_bytes: int
    record_bytes: int
    snapshot_bytes: int
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

    Usage (one optimizer step = all micro-batches of a global batch)::

        omoe = OrthogonalExpertOptimizer(model, config.omoe, ep_group=layer.ep_group,
                                         expert_dp_group=...)   # groups passed in
        for step in range(start, steps):
            omoe.before_step(step)       # phase switch (+ its collectives) happens here
            loss = ...; backward(); optimizer.step()
            omoe.after_step(step)        # record inputs / project the applied update

    ``before_step`` must come before the step's first forward (the forward
    reads the phase: inputs are recorded in accumulating steps, gradient hooks
    registered in orthogonal ones). Checkpoint with :meth:`state_dict`, one
    file per rank (projectors are per local expert).

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
        self.layers: dict[str, _LayerHooks] = {}
        for name, experts in containers:
            if experts.num_experts < 2:
                raise ConfigError(f"omoe.enabled: layer {name} has {experts.num_experts} expert; OMoE projects "
                                  f"each expert against the others and needs num_experts >= 2")
            if config.projection == "update" and experts.is_mpo:
                raise ConfigError("omoe.projection='update' needs plain experts (moe.expert_type='ffn'): an MPO "
                                  "expert's W is not a parameter; use omoe.projection='gradient'")
            if experts.hooks is not None and not isinstance(experts.hooks, _LayerHooks):
                raise RuntimeError(f"layer {name} already has expert hooks {experts.hooks!r}")
            self.layers[name] = _LayerHooks(self, name, experts)
        self.phase = "off"
        self.cycle = -1
        self.position = 0
        self._in_step: Optional[int] = None
        self.counters = {"collectives": 0, "comm_bytes": 0, "phase_changes": 0}
        if config.enabled:  # disabled: no hooks, so the layer does no OMoE work at all
            self.attach()

    # ---- wiring

    def attach(self) -> None:
        for state in self.layers.values():
            state.experts.hooks = state

    def detach(self) -> None:
        """Remove the hooks from the experts (OMoE state is kept)."""
        for state in self.layers.values():
            if state.experts.hooks is state:
                state.experts.hooks = None

    @property
    def ep_size(self) -> int:
        return dist.get_world_size(self.ep_group) if self.ep_group is not None else 1

    @property
    def expert_dp_size(self) -> int:
        return dist.get_world_size(self.expert_dp_group) if self.expert_dp_group is not None else 1

    # ---- step API

    def before_step(self, step: int) -> str:
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
        self.phase, self.cycle, self.position = phase, cycle, position
        if phase == "orthogonal" and self.config.projection == "update":
            for state in self.layers.values():
                state.take_snapshot()
        self._in_step = step
        return phase

    def after_step(self, step: int) -> None:
        """Close optimizer step ``step`` (call after ``optimizer.step()``)."""
        if self._in_step != step:
            raise RuntimeError(f"after_step({step}) without before_step({step}) (last was {self._in_step})")
        if self.phase == "accumulate":
            alpha = self.config.alpha_at(self.position)
            for state in self.layers.values():
                state.record_step(alpha)
        elif self.phase == "orthogonal" and self.config.projection == "update":
            for state in self.layers.values():
                state.project_applied_update()
        self._in_step = None

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
        self.counters["phase_changes"] += 1

    def _all_reduce(self, tensors: Sequence[torch.Tensor], group: Any) -> list[torch.Tensor]:
        """One SUM all-reduce of several tensors through a flat buffer."""
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
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
        return out

    def cost(self, slots_per_expert: int = 0, micro_batches: int = 1) -> OMoECost:
        """Memory, compute and communication OMoE adds on this rank (see :class:`OMoECost`)."""
        cfg = self.config
        fp32 = 4
        keep = 2 if cfg.reset == "never" else 1
        per_layer: dict[str, dict[str, int]] = {}
        tot = dict(projector_bytes=0, record_bytes=0, snapshot_bytes=0, orth_step_macs=0, acc_step_macs=0,
                   phase_change_macs=0, ep_bytes=0, dp_bytes=0)
        for name, state in self.layers.items():
            for m in state.in_dim:
                L, I, O = state.num_local, state.in_dim[m], state.out_dim[m]
                row = {
                    "projector_bytes": keep * L * I * I * fp32,
                    "record_bytes": cfg.acc_steps * L * (I + 1) * fp32,
                    "snapshot_bytes": L * I * O * fp32 if cfg.projection == "update" else 0,
                    "orth_step_macs": L * I * I * O * (micro_batches if cfg.projection == "gradient" else 1),
                    "acc_step_macs": L * slots_per_expert * I * micro_batches,
                    "phase_change_macs": 2 * cfg.acc_steps * L * I * I + L * I * I,
                    "ep_bytes": I * I * fp32 if self.ep_size > 1 else 0,
                    "dp_bytes": cfg.acc_steps * L * (I + 1) * fp32 if self.expert_dp_size > 1 else 0,
                }
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
        self.phase, self.cycle, self.position = state["phase"], state["cycle"], state["position"]
        self.counters = dict(state["counters"])
        for name, layer_state in state["layers"].items():
            self.layers[name].load_state_dict(layer_state)
