"""The MoE step protocol: the one object a training loop tells where it is in training.

MoE layers need three facts a forward cannot see: which optimizer step a
backward belongs to (the gradient mask is a function of the step, drawn alike
on every rank), where a micro-batch sits in gradient accumulation (MPO experts
rebuild their weights once per step, :mod:`mpomoe_ds.moe.step_cache`), and
which expert hooks act in this step (the orthogonal expert optimizer records
inputs in accumulating steps and projects gradients in orthogonal ones). The
training loop tells them to one :class:`MoEStep`::

    moe_step = MoEStep(model, participants=[omoe])   # participants are optional
    for step in range(start, max_steps):
        moe_step.begin_step(step)
        for index in range(accumulation):
            moe_step.begin_micro_batch(index, is_last=index == accumulation - 1)
            loss = engine(batch); engine.backward(loss); engine.step()
        moe_step.end_step(step)

Each layer gets its state only from here (``MPOEMoE.begin_step``,
``begin_micro_batch``, ``end_step``); between ``end_step`` and the next
``begin_step`` (evaluation, similarity metrics) layers rebuild experts in
every forward and run no hooks. A participant (:class:`StepParticipant`) is
told when each step begins and ends and hands each layer its hooks for the
step; the phase it is in cannot change inside a step.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

from torch import nn

from mpomoe_ds.moe.experts import ExpertHooks
from mpomoe_ds.moe.layer import MPOEMoE, moe_layers


class StepParticipant(Protocol):
    """Something that acts around optimizer steps through the experts (e.g. OMoE)."""

    def begin_step(self, step: int) -> object:
        """Step ``step`` begins: before its first forward (collectives allowed here)."""

    def expert_hooks(self, layer: MPOEMoE) -> Optional[ExpertHooks]:
        """The hooks ``layer``'s experts run in this step, or None."""

    def end_step(self, step: int) -> None:
        """Step ``step`` ended: after the optimizer step."""


class MoEStep:
    """Tells every MoE layer of ``model`` (and the participants) where training is.

    Args:
        model: any module holding :class:`MPOEMoE` layers (a DeepSpeed engine's
            ``module`` too).
        participants: objects acting around steps, in the order they are told.

    MPO experts rebuild their weights once per optimizer step under gradient
    accumulation (activation checkpointing included: a recomputation replays
    the cached weights), see :meth:`mpomoe_ds.moe.experts.MoEExperts.set_micro_batch`.
    """

    def __init__(self, model: nn.Module, participants: Sequence[StepParticipant] = ()) -> None:
        self.layers = [layer for _, layer in moe_layers(model)]
        self.participants = list(participants)
        self.step: Optional[int] = None

    def begin_step(self, step: int) -> None:
        """Before the first forward of optimizer step ``step``."""
        if self.step is not None:
            raise RuntimeError(f"begin_step({step}) while step {self.step} has not ended; call end_step first")
        for participant in self.participants:
            participant.begin_step(step)
        for layer in self.layers:
            layer.begin_step(step, self._hooks_for(layer))
        self.step = step

    def begin_micro_batch(self, index: int, is_last: bool) -> None:
        """Before the forward of micro-batch ``index`` of the step; ``is_last``: the optimizer steps after it."""
        if self.step is None:
            raise RuntimeError("begin_micro_batch outside a step; call begin_step(step) first")
        for layer in self.layers:
            layer.begin_micro_batch(index, is_last)

    def end_step(self, step: int) -> None:
        """After the optimizer step of ``step``: layers return to rebuilding in every forward."""
        if self.step != step:
            raise RuntimeError(f"end_step({step}) but the step in progress is {self.step}")
        for layer in self.layers:
            layer.end_step()
        for participant in self.participants:
            participant.end_step(step)
        self.step = None

    def _hooks_for(self, layer: MPOEMoE) -> Optional[ExpertHooks]:
        hooks = [h for h in (p.expert_hooks(layer) for p in self.participants) if h is not None]
        if len(hooks) > 1:
            raise RuntimeError(f"MoE layer {layer.layer_id}: {len(hooks)} participants hand it expert hooks in "
                               f"the same step; at most one may")
        return hooks[0] if hooks else None
