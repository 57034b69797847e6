"""The ``mpo`` section: how each expert matrix is factored into MPO cores (no torch needed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from mpomoe_ds.config import check_choice, fail

GAUGES = ("canonical", "balanced")


@dataclass
class MPOConfig:
    """How each expert matrix is factored into MPO cores.

    num_cores: n, the number of cores (5 in the papers); the central core is n // 2.
    max_bond: cap on inner bond dims (None = lossless); an int or one int per bond.
    rel_tol: target relative Frobenius error of the truncation (None = off).
    in_factors_up / out_factors_up / in_factors_down / out_factors_down:
        explicit factor lists for the up (hidden -> ffn) and down (ffn -> hidden)
        matrices; None = balanced automatic factors.
    """

    num_cores: int = 5
    max_bond: Optional[Union[int, list[int]]] = None
    rel_tol: Optional[float] = None
    in_factors_up: Optional[list[int]] = None
    out_factors_up: Optional[list[int]] = None
    in_factors_down: Optional[list[int]] = None
    out_factors_down: Optional[list[int]] = None
    gauge: str = "canonical"

    def __post_init__(self) -> None:
        if self.num_cores < 2:
            fail("mpo", "num_cores", self.num_cores, "use at least 2 cores (5 is the papers' choice)")
        if isinstance(self.max_bond, int) and self.max_bond < 1:
            fail("mpo", "max_bond", self.max_bond, "use a positive bond cap, or null for lossless")
        if isinstance(self.max_bond, list) and len(self.max_bond) != self.num_cores - 1:
            fail("mpo", "max_bond", self.max_bond, f"give one cap per inner bond ({self.num_cores - 1} values)")
        if self.rel_tol is not None and not 0 <= self.rel_tol < 1:
            fail("mpo", "rel_tol", self.rel_tol, "use a relative error in [0, 1), or null")
        for name in ("in_factors_up", "out_factors_up", "in_factors_down", "out_factors_down"):
            factors = getattr(self, name)
            if factors is not None and len(factors) != self.num_cores:
                fail("mpo", name, factors, f"give exactly num_cores={self.num_cores} factors")
        check_choice("mpo", "gauge", self.gauge, GAUGES)

    @property
    def lossless(self) -> bool:
        return self.max_bond is None and not self.rel_tol
