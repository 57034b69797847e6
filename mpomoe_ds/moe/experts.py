"""Expert modules and the batched expert computation.

Shape legend: L local experts (A: the active subset of them), S slots per
expert (tokens incl. padding), D hidden size, F FFN size; R bond dims; I, O
rows / columns of one expert matrix. Expert matrices are in ``x @ W``
orientation: ``W_up`` is (D, F), ``W_down`` is (F, D).

Naming conventions:
    central tensor    the middle MPO core of a matrix position ("up"/"down"),
                      one per MoE layer, shared by every expert; a dense,
                      data-parallel parameter owned by the MoE layer, passed
                      into :meth:`MoEExperts.forward` (never stored here, so
                      DeepSpeed's per-expert deep copy cannot duplicate it)
    auxiliary tensors the other cores, owned per expert (expert parameters)
    global expert id  0..E-1 across the expert-parallel group
    local expert id   0..L-1 on this rank; global = ep_rank * L + local
    active expert     a local expert that received at least one token (from
                      any rank of the expert-parallel group) in this forward

One expert module per expert (``MPOExpert`` or ``FFNExpert``) keeps DeepSpeed's
native per-expert checkpoint files working; the container computes all local
experts together: one batched reconstruction, then batched matmuls over
padded (L, S, D) slots, or a grouped matmul over variable-sized expert
segments (R, D) when the dispatcher sends no padding (``moe.dropless_impl``).

Where reconstruction happens (MPO experts; rebuilding one lossless 3072x768 matrix
costs about |W| * (d_2 + d_3) = 1.4 GMAC, the cost of ~600 tokens through it):

* Only active experts are rebuilt. An idle expert's slots are all padding, so
  its output is discarded and its weight gradient is exactly zero; its rows of
  the weight are zero placeholders and its parameters still get (zero)
  gradients, as in the plain computation.
* Under gradient accumulation the weights are rebuilt once per optimizer step
  (:meth:`MoEExperts.set_micro_batch`): see :class:`StepReconstruction`. The
  step cache holds the bias stacks too, so aux_gather's one all-gather per
  step carries cores and biases together.
* :func:`reconstruct_shared` contracts in the cheapest order with large GEMMs
  and one blocked permutation; it runs in the cores' dtype (bf16 when the
  engine holds bf16 parameters) and follows ``torch.autocast``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Callable, Optional, Protocol

import torch
import torch.nn.functional as F
from deepspeed.moe.experts import Experts
from torch import nn

from mpomoe_ds.moe.config import ACTIVATIONS
from mpomoe_ds.moe.grouped import grouped_linear, pad_segments
from mpomoe_ds.moe.step_cache import StepReconstruction
from mpomoe_ds.mpo.reconstruction import reconstruct_shared


def activation_function(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The expert activation called ``name`` in :data:`mpomoe_ds.moe.config.ACTIVATIONS`."""
    function, kwargs = ACTIVATIONS[name]
    return functools.partial(getattr(F, function), **kwargs)


class Gather(Protocol):
    """Gathers per-expert (L, ...) stacks into the group's (E, ...) stacks.

    Implemented by :class:`mpomoe_ds.moe.aux_gather.AuxGather`.
    """

    def gather(self, stacks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Differentiable; gradients return to the owners."""


class ExpertHooks(Protocol):
    """What an expert-update transformer (e.g. the orthogonal optimizer) implements.

    An implementation may also define a bool ``observing`` attribute: when it is
    False the layer does not compute ``valid_LS`` (saving one small all-to-all)
    and does not call :meth:`observe_inputs`. It must be equal on every rank.
    """

    def transform_weight(self, experts: "MoEExperts", matrix: str, weight_LIO: torch.Tensor) -> torch.Tensor:
        """Return the weight to use (e.g. with a gradient-projecting hook registered).

        ``weight_LIO`` holds every local expert; rows of experts that got no
        token in this forward are zero placeholders (their gradient is zero).
        Under gradient accumulation with :meth:`MoEExperts.set_micro_batch`,
        every micro-batch passes a fresh tensor whose gradient is that
        micro-batch's dL/dW only, so a linear hook (a projection) sees each
        micro-batch once and the sum over the step is transformed exactly once.
        """

    def observe_inputs(self, experts: "MoEExperts", matrix: str, inputs_LSI: torch.Tensor,
                       valid_LS: torch.Tensor) -> None:
        """See the inputs of a matrix in a training forward; ``valid_LS`` marks real tokens."""


def recomputing() -> bool:
    """Whether this forward runs inside a backward pass: activation checkpointing recomputing it."""
    return torch._C._current_graph_task_id() != -1


def _bias_key(matrix: str) -> str:
    """Where a matrix's bias stack sits among the expert tensors of a forward (beside the weight ``matrix``)."""
    return f"{matrix}_bias"


def _stored_as_is(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _own_parameter(tensor: torch.Tensor) -> nn.Parameter:
    """A parameter holding a contiguous copy of ``tensor``.

    ``clone()`` keeps the strides of its input, so a pretrained weight read in
    x @ W orientation (a transposed view of nn.Linear's weight) would stay
    non-contiguous, and DeepSpeed's ``_broadcast_model`` (``tensor.view(uint8)``
    under NCCL) refuses it: "self.stride(-1) must be 1 to view Float as Byte".
    """
    return nn.Parameter(tensor.detach().clone(memory_format=torch.contiguous_format))


class MPOExpert(nn.Module):
    """One expert's own tensors: the auxiliary cores of each matrix, and biases.

    ``{m}_aux[c]`` is core ``aux_core_indices[c]`` of matrix ``m``'s MPO
    (m in "up", "down", and "gate" for gated experts); ``{m}_bias`` its bias.
    Registration order (all cores, then all biases, matrices in
    computation order) fixes the parameter order the optimizer sees.
    """

    def __init__(self, aux: Mapping[str, list[torch.Tensor]], biases: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.matrices = tuple(aux)
        for m in self.matrices:
            setattr(self, f"{m}_aux", nn.ParameterList([_own_parameter(c) for c in aux[m]]))
        for m in self.matrices:
            setattr(self, f"{m}_bias", _own_parameter(biases[m]))

    def aux_cores(self, matrix: str) -> nn.ParameterList:
        return getattr(self, f"{matrix}_aux")


class FFNExpert(nn.Module):
    """A plain dense expert (the standard-MoE baseline), weights in x @ W orientation.

    ``{m}_weight`` / ``{m}_bias`` per matrix m ("up", "down", and "gate" when gated).
    """

    def __init__(self, weights: Mapping[str, torch.Tensor], biases: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.matrices = tuple(weights)
        for m in self.matrices:
            setattr(self, f"{m}_weight", _own_parameter(weights[m]))
            setattr(self, f"{m}_bias", _own_parameter(biases[m]))


class MoEExperts(Experts):
    """All local experts of one MoE layer, computed as a batch.

    DeepSpeed's ``Experts`` deep-copies the template per local expert and marks
    every parameter ``allreduce=False`` / ``group_name``; we keep that contract
    and replace its Python loop with batched matmuls.
    """

    def __init__(self, template: nn.Module, num_local_experts: int, group_name: str, num_experts: int,
                 activation: str, central_index: Optional[int] = None) -> None:
        super().__init__(template, num_local_experts, group_name)
        self.num_experts = num_experts
        self.activation = activation
        self.central_index = central_index
        self.global_expert_ids = list(range(num_local_experts))
        self._micro_batch: Optional[tuple[int, bool]] = None
        self._step: Optional[StepReconstruction] = None
        # The weights the current micro-batch's forward took from the step cache, for an activation-checkpointing
        # recomputation of that forward to replay (dropped at the next micro-batch).
        self._replay: Optional[dict[str, torch.Tensor]] = None

    @property
    def matrices(self) -> tuple[str, ...]:
        """The expert matrix positions: ("up", "down") or, gated, ("gate", "up", "down")."""
        return self.deepspeed_experts[0].matrices

    @property
    def is_gated(self) -> bool:
        return "gate" in self.matrices

    @property
    def is_mpo(self) -> bool:
        return isinstance(self.deepspeed_experts[0], MPOExpert)

    def set_micro_batch(self, index: Optional[int], is_last: bool = True) -> None:
        """Position of the next forward in gradient accumulation; enables per-step reconstruction.

        Call before each training micro-batch's forward with its index in the
        optimizer step (0-based) and whether it is the step's last (the one
        after which the optimizer steps). With a DeepSpeed engine::

            index = engine.micro_steps % engine.gradient_accumulation_steps()
            is_last = engine.is_gradient_accumulation_boundary()

        MPO experts then rebuild their weights once per step
        (:class:`StepReconstruction`); gradients stay exact. Requirements: one
        training forward and backward per micro-batch, in order, on every rank
        alike. Activation checkpointing may re-run the forward inside the
        backward: the recomputation gets the very weights the forward got (it
        only regenerates saved activations; gradients flow through the first
        forward's graph), so the cache stays exact under it.
        ``index=None`` returns to rebuilding in every forward. A forward
        outside training or under ``torch.no_grad()`` ignores the setting.

        Raises:
            RuntimeError: index 0 while an earlier step's accumulated weight
                gradient was never handed to a last micro-batch (it would be lost).
        """
        self._replay = None
        if index is None:
            self._step = None
        elif index == 0 and self._step is not None:
            pending, self._step = self._step.pending, None
            if pending:
                raise RuntimeError(
                    f"set_micro_batch(0): the previous optimizer step ran {pending} micro-batch(es) with a cached "
                    f"expert reconstruction but no last one (is_last=True), so their expert gradients are lost. "
                    f"Mark each step's last micro-batch with is_last=True (with DeepSpeed: "
                    f"engine.is_gradient_accumulation_boundary()), or call set_micro_batch(None) to start over")
        self._micro_batch = None if index is None else (int(index), bool(is_last))

    def _cache_in_use(self) -> bool:
        """Whether the next forward takes its weights from a per-step reconstruction (same on every rank)."""
        if self._micro_batch is None or not self.is_mpo or not self.training or not torch.is_grad_enabled():
            return False
        return self._step is not None or not self._micro_batch[1]

    def needs_activity(self) -> bool:
        """Whether the next forward can use ``active_L`` (MPO experts rebuilt in this forward)."""
        return self.is_mpo and not self._cache_in_use()

    def _stacks(self, gather: Optional[Gather]) -> tuple[dict[str, list[torch.Tensor]], dict[str, torch.Tensor]]:
        """MPO experts' ({matrix: [(L, ...) per auxiliary core]}, {matrix: (L, out) bias}).

        With ``gather``, (E, ...) stacks of the whole group, cores and biases
        in one collective.
        """
        aux = {m: [torch.stack(list(cores)) for cores in zip(*(e.aux_cores(m) for e in self.deepspeed_experts))]
               for m in self.matrices}
        biases = self.biases()
        if gather is None:
            return aux, biases
        flat = iter(gather.gather([a for m in self.matrices for a in aux[m]] + [biases[m] for m in self.matrices]))
        aux = {m: [next(flat) for _ in aux[m]] for m in self.matrices}
        return aux, {m: next(flat) for m in self.matrices}

    def _reconstruct(self, aux: Mapping[str, list[torch.Tensor]], central: Optional[Mapping[str, torch.Tensor]],
                     active_L: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """{matrix: (N, I, O)} rebuilt from (N, ...) auxiliary stacks; with ``active_L`` only those rows."""
        if central is None:
            raise ValueError("MPO experts need the layer's central tensors to reconstruct their weights")
        active_A = None if active_L is None else torch.nonzero(active_L).flatten()
        weights = {}
        for m in self.matrices:
            stacks = aux[m] if active_A is None else [a.index_select(0, active_A) for a in aux[m]]
            w = reconstruct_shared(stacks, central[m], self.central_index)
            if active_A is not None:
                w = w.new_zeros(aux[m][0].shape[0], *w.shape[1:]).index_copy(0, active_A, w)
            weights[m] = w
        return weights

    def expert_weights(self, central: Optional[dict[str, torch.Tensor]] = None,
                       active_L: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """{"up": (L, D, F), "down": (L, F, D)} (and "gate": (L, D, F)) for every local expert.

        MPO experts: one batched reconstruction per matrix
        (:func:`reconstruct_shared`). With ``active_L`` (bool, (L,)) only those
        experts are rebuilt; the other rows are zero.
        """
        if not self.is_mpo:
            return {m: torch.stack([getattr(e, f"{m}_weight") for e in self.deepspeed_experts]) for m in self.matrices}
        return self._reconstruct(self._stacks(None)[0], central, active_L)

    def _rebuild(self, central: Optional[dict[str, torch.Tensor]], active_L: Optional[torch.Tensor],
                 gather: Optional[Gather]) -> dict[str, torch.Tensor]:
        """This forward's expert tensors, built now: weights under their matrix names, biases under ``{m}_bias``.

        With ``gather`` (``moe.dispatch: aux_gather``) every expert of the
        expert-parallel group, (E, ...) rows, from one all-gather.
        """
        if not self.is_mpo:
            weights, biases = self.expert_weights(), self.biases()
        else:
            aux, biases = self._stacks(gather)
            weights = self._reconstruct(aux, central, active_L)
        return {**weights, **{_bias_key(m): b for m, b in biases.items()}}

    def _training_tensors(self, central: Optional[dict[str, torch.Tensor]], active_L: Optional[torch.Tensor],
                          gather: Optional[Gather]) -> dict[str, torch.Tensor]:
        """The weights and biases of this forward (see :meth:`_rebuild`): from the per-step reconstruction,
        or built now. Caching the biases with the weights makes aux_gather's one all-gather per step carry them."""
        if recomputing() and self._replay is not None:
            # Activation checkpointing re-runs this micro-batch's forward to regenerate saved activations:
            # the same cached tensors (no second step-gradient hook, no pending count).
            return {m: w.view_as(w) for m, w in self._replay.items()}
        if not self._cache_in_use():
            return self._rebuild(central, active_L, gather)
        if self._step is None:
            # The step's reconstruction graph outlives this micro-batch (the last one back-propagates through it),
            # so its saved tensors are stored as they are, not packed by an enclosing activation checkpoint (which
            # would recompute this micro-batch to unpack them, and count them in its replay check).
            with torch.autograd.graph.saved_tensors_hooks(_stored_as_is, _stored_as_is):
                self._step = StepReconstruction(self._rebuild(central, None, gather))
        if not self._micro_batch[1]:
            self._replay = self._step.accumulating_weights()
        else:
            step, self._step, self._micro_batch = self._step, None, None
            self._replay = step.final_weights()
        return self._replay

    def biases(self) -> dict[str, torch.Tensor]:
        """{matrix: (L, out)} for the local experts."""
        return {m: torch.stack([getattr(e, f"{m}_bias") for e in self.deepspeed_experts]) for m in self.matrices}

    def forward(self, x_LSD: torch.Tensor, central: Optional[dict[str, torch.Tensor]] = None,
                valid_LS: Optional[torch.Tensor] = None, active_L: Optional[torch.Tensor] = None,
                hooks: Optional[ExpertHooks] = None, segments_L: Optional[torch.Tensor] = None,
                gather: Optional[Gather] = None) -> torch.Tensor:
        """Batched expert FFNs on dispatched slots.

        ``active_L`` (bool, (L,)): local experts that received a token; MPO
        experts outside it are not rebuilt (their slots are padding, whose
        outputs the combine step discards). None: all experts are rebuilt.
        ``hooks``: this step's expert hooks (handed over by the MoE step
        protocol, :mod:`mpomoe_ds.moe.step`), or None.
        ``segments_L`` (int, (L,)): the input is (R, D) rows sorted by local
        expert, ``segments_L[l]`` of them for expert l (dispatch without
        padding); the experts run a grouped matmul and return (R, D).
        ``gather`` (``moe.dispatch: aux_gather``): compute every expert of the
        group, so ``x`` holds (E, S, D) slots of this rank's own tokens.
        """
        tensors = self._training_tensors(central, active_L, gather)
        weights = {m: tensors[m] for m in self.matrices}
        biases = {m: tensors[_bias_key(m)] for m in self.matrices}
        if hooks is not None:
            weights = {m: hooks.transform_weight(self, m, w) for m, w in weights.items()}
        x_LSD = x_LSD.to(weights["up"].dtype)
        if segments_L is None:
            linear = _batched_linear
        else:
            linear = functools.partial(grouped_linear, segments_L=segments_L)
        h_LSF = self._hidden(x_LSD, weights, biases, linear)
        # A recomputation (activation checkpointing) already showed these inputs in its first forward.
        if hooks is not None and self.training and valid_LS is not None and not recomputing():
            for m in self.matrices:
                inputs = (h_LSF if m == "down" else x_LSD).detach()
                if segments_L is None:
                    hooks.observe_inputs(self, m, inputs, valid_LS)
                else:
                    hooks.observe_inputs(self, m, *pad_segments(inputs, segments_L))
        return linear(h_LSF, weights["down"], biases["down"])

    def _hidden(self, x_LSD: torch.Tensor, weights: Mapping[str, torch.Tensor],
                biases: Mapping[str, torch.Tensor], linear: Linear) -> torch.Tensor:
        """The FFN's inner activations: act(x W_up + b), or gated act(x W_gate + b) * (x W_up + b)."""
        act = activation_function(self.activation)
        up_LSF = linear(x_LSD, weights["up"], biases["up"])
        if not self.is_gated:
            return act(up_LSF)
        # The order HF computes it in (Llama: act_fn(gate_proj(x)) * up_proj(x); T5: act(wi_0 x) * wi_1 x).
        return act(linear(x_LSD, weights["gate"], biases["gate"])) * up_LSF


# x, W (L, I, O), b (L, O) -> x W + b per expert: padded slots (L, S, I) or segments (R, I).
Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _batched_linear(x_LSI: torch.Tensor, w_LIO: torch.Tensor, b_LO: torch.Tensor) -> torch.Tensor:
    return torch.baddbmm(b_LO.unsqueeze(1), x_LSI, w_LIO)
