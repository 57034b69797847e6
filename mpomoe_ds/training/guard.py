"""The non-finite guard: a step whose loss or gradient norm is not finite on any rank changes nothing.

Owns: skipping the optimizer update of such a step on every rank alike (as
fp16 loss scaling does), counting bad steps, stopping after N consecutive ones
with an error that says what to do, and keeping NaN out of result files.

How the update is skipped (:class:`SkipGate`): the engine is made to treat the
step as an overflow, as with fp16 loss scaling, so it counts a skipped step,
does not advance the LR schedule and clears the gradients as usual;
``engine.was_step_applied()`` then says whether the update happened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from mpomoe_ds import parallel


class NonFiniteError(RuntimeError):
    """Training stopped after too many consecutive non-finite steps; the message says what to try."""


class SkipGate:
    """Makes the engine skip the next optimizer update on request, on every rank alike.

    ZeRO 0: wraps the torch optimizer's ``step``; skipped, it does nothing and
    reports ``overflow``. ZeRO 1/2: turns on DeepSpeed's own overflow check
    (off for fp32) for that step, which finds the non-finite gradients (a
    non-finite loss makes them so) and skips the update.
    """

    def __init__(self, engine: Any) -> None:
        self.skip = False
        self._optimizer = engine.optimizer
        self._zero = bool(engine.zero_optimization())
        if self._zero:
            self._default_check = bool(getattr(self._optimizer, "check_grad_overflow", False))
        else:
            self._optimizer.overflow = False  # the engine reads it after step() to count skipped steps
            self._optimizer.step = self._gated(self._optimizer.step)

    def set(self, skip: bool) -> None:
        self.skip = skip
        if self._zero:
            self._optimizer.check_grad_overflow = skip or self._default_check

    def _gated(self, step: Callable[..., Any]) -> Callable[..., Any]:
        def gated_step(*args: Any, **kwargs: Any) -> Any:
            self._optimizer.overflow = self.skip
            return None if self.skip else step(*args, **kwargs)

        # torch's LR scheduler marks the step it wrapped; keep the mark, or it warns on every step.
        if hasattr(step, "_wrapped_by_lr_sched"):
            gated_step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        return gated_step


@dataclass
class NonFiniteCounter:
    """Bad steps so far and in a row; ``record`` raises once ``max_consecutive`` are reached."""

    max_consecutive: int
    total: int = 0
    consecutive: int = 0
    steps: list[int] = field(default_factory=list)

    def record(self, step: int, finite: bool, last_good_checkpoint: Optional[str]) -> None:
        if finite:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        self.steps.append(step)
        if self.consecutive >= self.max_consecutive:
            where = last_good_checkpoint or "none saved yet"
            raise NonFiniteError(
                f"step {step}: loss or gradient norm not finite for {self.consecutive} consecutive steps "
                f"(train.max_nonfinite_steps={self.max_consecutive}); updates of those steps were skipped, "
                f"nothing non-finite was saved. Last good checkpoint: {where}. Try a lower optim.lr, a longer "
                f"optim.warmup_steps, gradient_clipping in the ds_config, or check the data of these steps; "
                f"then --resume from that checkpoint")


@dataclass
class StepAgreement:
    """What every rank agrees on after one step: finite or not, the global train loss, summed extras."""

    finite: bool
    loss: float
    extra: Optional[torch.Tensor] = None


def agree_on_step(local_finite: bool, loss_x_tokens: float, tokens: int,
                  extra: Optional[torch.Tensor] = None) -> StepAgreement:
    """One all-reduce of three numbers (plus ``extra``): any rank non-finite -> the step is bad everywhere.

    The loss is the global token-weighted mean ``sum_r,m loss_rm n_rm / sum_r,m n_rm``
    over ranks r and micro-batches m (n = non-padding tokens), the same value on every rank.
    ``extra`` (1-D) rides along in the same all-reduce and comes back summed over ranks
    (the per-task losses use it), so the step costs no further collective.
    """
    head = torch.tensor([0.0 if local_finite else 1.0, loss_x_tokens, float(tokens)], dtype=torch.float64)
    tail = extra.detach().to(torch.float64).reshape(-1) if extra is not None else head.new_zeros(0)
    sums = parallel.all_reduce(torch.cat([head, tail]))
    finite = float(sums[0]) == 0.0
    return StepAgreement(finite=finite, loss=float(sums[1] / sums[2].clamp_min(1.0)) if finite else float("nan"),
                         extra=sums[3:] if extra is not None else None)


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (nested in dicts/lists) replaced by None: valid JSON."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def model_is_finite(model: torch.nn.Module) -> bool:
    """True iff every parameter of this rank's shard is finite."""
    return all(bool(torch.isfinite(p.detach()).all()) for p in model.parameters())
