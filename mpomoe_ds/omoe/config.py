"""The ``omoe`` section: the orthogonal expert optimizer's schedule and options (no torch needed)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from mpomoe_ds.config import check_choice, fail
from mpomoe_ds.moe.config import GATED_MATRICES

PHASES = ("off", "accumulate", "orthogonal")


PROJECTIONS = ("gradient", "update")


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
