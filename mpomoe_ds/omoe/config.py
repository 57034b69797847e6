"""The ``omoe`` section: the orthogonal expert optimizer's schedule and options (no torch needed)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from mpomoe_ds.config import check_choice, fail
from mpomoe_ds.moe.config import GATED_MATRICES

PHASES = ("off", "accumulate", "orthogonal")


PROJECTIONS = ("gradient", "update", "null_space")


RESETS = ("cycle", "never")


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
    matrices: which expert matrices are projected: ["up"], ["down"] or both;
        gated experts also have "gate" (input x, like "up").
    reset: "cycle" (projectors restart from I at every accumulating phase) or
        "never" (keep accumulating over the whole run, as OWM does across tasks).
    projection: "gradient" (project dL/dW_e before the optimizer; MPO and plain
        experts) or "update" (project the optimizer's applied change; plain
        "ffn" experts only, exact for any optimizer) or "null_space" (MPO
        experts only: after the optimizer step, correct each expert's
        auxiliary-core step so that the change of its reconstructed W_e is
        orthogonal to a basis of the other experts' inputs, and keep the
        projected matrices' central tensors unchanged in orthogonal phases;
        :mod:`mpomoe_ds.omoe.null_space`). "gradient" with MPO experts warns:
        measured leak 0.31 vs 0.33 without OMoE, i.e. no effect on the applied change.
    null_space_rank: "null_space" only: at most this many protected input
        directions per expert and matrix (the strongest of the other experts'
        projectors). None = half the structural budget ``(n_aux - 1) // d_out``
        (n_aux the expert's auxiliary parameters of that matrix, d_out its
        output dim): r * d_out constraints must stay below n_aux, so a larger
        value is refused at build time with the budget in the message.
    cg_iters: "null_space" only: conjugate-gradient iterations (JVP + VJP
        each) per Gauss-Newton correction (2 corrections per step). 30: on 4 MPO
        experts (32x128, 768 constraints) the leak was 0.09 after 10, 0.017 after 30,
        0.0012 after 100 iterations (tests/omoe/test_null_space.py).

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
    null_space_rank: Optional[int] = None
    cg_iters: int = 30

    def __post_init__(self) -> None:
        s = "omoe"
        for name, minimum, fix in (
                ("acc_steps", 1, "use at least 1 accumulating step per cycle"),
                ("orth_steps", 1, "use at least 1 orthogonal step per cycle (or set omoe.enabled: false for "
                                  "ordinary training)"),
                ("start_step", 0, "use a step >= 0")):
            if getattr(self, name) < minimum:
                fail(s, name, getattr(self, name), fix)
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0 and math.isfinite(self.alpha)):
            fail(s, "alpha", self.alpha, "use a finite alpha > 0 (e.g. 1e-3 with normalized inputs)")
        if self.alpha_final is not None and not (self.alpha_final > 0 and math.isfinite(self.alpha_final)):
            fail(s, "alpha_final", self.alpha_final, "use a finite alpha_final > 0, or null for a constant alpha")
        if isinstance(self.matrices, str):
            self.matrices = [self.matrices]
        if not self.matrices or any(m not in GATED_MATRICES for m in self.matrices) or \
                len(set(self.matrices)) != len(self.matrices):
            fail(s, "matrices", self.matrices, f"give a non-empty list of distinct names from {list(GATED_MATRICES)} "
                 f"('gate' only for gated experts)")
        check_choice(s, "reset", self.reset, RESETS)
        check_choice(s, "projection", self.projection, PROJECTIONS)
        if self.null_space_rank is not None and not (isinstance(self.null_space_rank, int)
                                                     and self.null_space_rank >= 1):
            fail(s, "null_space_rank", self.null_space_rank, "use an integer >= 1, or null for half the budget")
        if not (isinstance(self.cg_iters, int) and self.cg_iters >= 1):
            fail(s, "cg_iters", self.cg_iters, "use at least 1 conjugate-gradient iteration (30 is the default)")

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
