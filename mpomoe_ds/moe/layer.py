"""The MPOE MoE layer: DeepSpeed's MoE contract around our router, dispatcher and experts.

Forward reads: route -> dispatch -> expert compute -> combine.

Expert compute rebuilds MPO expert weights only for experts that received a
token from some rank (one MAX all-reduce of the route counts over the
expert-parallel group decides, identically on every rank), and once per
optimizer step instead of once per micro-batch: the MoE step protocol
(:class:`mpomoe_ds.moe.step.MoEStep`) tells the layer where each micro-batch
sits (:meth:`MPOEMoE.begin_micro_batch`), seeds its gradient masks and hands
it the step's expert hooks (:meth:`MPOEMoE.begin_step`). Both keep gradients
exact; see :mod:`mpomoe_ds.moe.experts`.

Shape legend: T tokens, D hidden, F FFN size, E global experts, L local experts.

Naming conventions:
    central tensors    ``layer.central["up"|"down"]`` (:class:`CentralTensors`):
                       one middle MPO core per matrix position, shared by all
                       experts, tagged ``param.mpo_central = True``; dense
                       parameters all-reduced over data parallelism, or with
                       ``moe.shard_central`` flat shards over the
                       expert-parallel group (see :mod:`mpomoe_ds.moe.central`).
                       Their state-dict keys (always the full tensors) never
                       contain "expert" (DeepSpeed's checkpoint code would treat
                       them as expert weights).
    auxiliary tensors  ``layer.deepspeed_moe.experts.deepspeed_experts[l]``: each
                       expert's own cores and biases; DeepSpeed expert parameters
                       (``allreduce=False``), saved in per-expert checkpoint files.
    global / local id  global expert g = ep_rank * L + local expert l.

The class subclasses ``deepspeed.moe.layer.MoE`` because the engine finds MoE
layers by isinstance. ``MoE.__init__`` is not called: it hard-wires DeepSpeed's
TopKGate and MOELayer. We set the attributes the engine reads instead
(num_experts, num_local_experts, ep_size, expert_group_name, deepspeed_moe, ...).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from deepspeed.moe.layer import MoE
from torch import nn

from mpomoe_ds import parallel
from mpomoe_ds.moe.aux_gather import AuxGather
from mpomoe_ds.moe.central import CentralTensors
from mpomoe_ds.moe.config import MoEConfig, ffn_matrices
from mpomoe_ds.moe.dispatch_cost import DispatchWorkload
from mpomoe_ds.moe.experts import ExpertHooks, FFNExpert, MoEExperts, MPOExpert
from mpomoe_ds.moe.grad_mask import GradientMask, mix_seed
from mpomoe_ds.moe.router import Routing, TopKRouter
from mpomoe_ds.moe.token_dispatcher import TokenDispatcher, build_dispatcher
from mpomoe_ds.mpo import MPO, decompose, reconstruction_macs
from mpomoe_ds.mpo.config import MPOConfig
from mpomoe_ds.mpo.gauge import balance, reinit_partially, rotate_central_bonds

logger = logging.getLogger("mpomoe_ds")

@dataclass
class DenseFFN:
    """A dense FFN's tensors in x @ W orientation: up (D, F), down (F, D), and gate (D, F) when gated."""

    up_weight: torch.Tensor
    up_bias: torch.Tensor
    down_weight: torch.Tensor
    down_bias: torch.Tensor
    gate_weight: Optional[torch.Tensor] = None
    gate_bias: Optional[torch.Tensor] = None

    @classmethod
    def random(cls, hidden_size: int, ffn_size: int, seed: int, std: float = 0.02,
               gated: bool = False) -> "DenseFFN":
        gen = torch.Generator().manual_seed(seed)
        dense = cls(up_weight=torch.randn(hidden_size, ffn_size, generator=gen) * std,
                    up_bias=torch.zeros(ffn_size),
                    down_weight=torch.randn(ffn_size, hidden_size, generator=gen) * std,
                    down_bias=torch.zeros(hidden_size))
        if gated:  # drawn after up/down, so a plain FFN of the same seed is unchanged
            dense.gate_weight = torch.randn(hidden_size, ffn_size, generator=gen) * std
            dense.gate_bias = torch.zeros(ffn_size)
        return dense

    def __post_init__(self) -> None:
        if (self.gate_weight is None) != (self.gate_bias is None):
            raise ValueError("a gated DenseFFN needs both gate_weight and gate_bias (zeros when the model has none)")
        if self.gate_weight is not None and self.gate_weight.shape != self.up_weight.shape:
            raise ValueError(f"gate_weight {tuple(self.gate_weight.shape)} must have up_weight's shape "
                             f"{tuple(self.up_weight.shape)}")

    @property
    def gated(self) -> bool:
        return self.gate_weight is not None

    @property
    def matrices(self) -> tuple[str, ...]:
        return ffn_matrices(self.gated)

    def weights(self) -> dict[str, torch.Tensor]:
        return {m: getattr(self, f"{m}_weight") for m in self.matrices}

    def biases(self) -> dict[str, torch.Tensor]:
        return {m: getattr(self, f"{m}_bias") for m in self.matrices}

    @property
    def hidden_size(self) -> int:
        return self.up_weight.shape[0]

    @property
    def ffn_size(self) -> int:
        return self.up_weight.shape[1]


class MoEBlock(nn.Module):
    """Router, dispatcher and experts of one layer (DeepSpeed's ``deepspeed_moe`` slot).

    The attribute names ``gate`` (with ``gate.wg``) and ``experts.deepspeed_experts``
    are the ones DeepSpeed's checkpoint code matches on. ``dispatch`` is the
    resolved ``moe.dispatch`` mode ("tokens" or "aux_gather"; "auto" until the
    layer decides, see :meth:`MPOEMoE.forward`).
    """

    def __init__(self, gate: TopKRouter, experts: MoEExperts, dispatcher: TokenDispatcher,
                 dispatch: str = "tokens") -> None:
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.dispatcher = dispatcher
        self.dispatch = dispatch
        # aux_gather: tokens stay on their rank, so they are planned as if every expert were local.
        self.local_dispatcher = TokenDispatcher(dispatcher.config, None)

    def _set_ep_group(self, ep_group: Optional[parallel.ProcessGroup]) -> None:
        """Called by DeepSpeed's engine; the group must be the one we were built for."""
        current = self.dispatcher.ep_group
        if current is not None and ep_group is not current:
            raise RuntimeError("the engine's expert-parallel group differs from the one this layer was built "
                               "with; build MoE layers after deepspeed.init_distributed() with the same ep_size")
        if parallel.group_size(ep_group) != parallel.group_size(current):
            raise RuntimeError(f"the layer was built for an expert-parallel group of size "
                               f"{parallel.group_size(current)} but the engine set one of size "
                               f"{parallel.group_size(ep_group)}")
        self.dispatcher.ep_group = ep_group

    def _aux_gather(self) -> AuxGather:
        return AuxGather(self.dispatcher.ep_group)

    def _active_local_experts(self, routed_E: torch.Tensor) -> Optional[torch.Tensor]:
        """Local experts that got a token from any rank, or None when every expert of the group did.

        One MAX all-reduce of the E route counts over the expert-parallel
        group, so every rank takes the same path (None or a mask), and the
        backward runs the same ops, in the same order, on every rank.
        """
        routed_E = parallel.all_reduce_max(self.dispatcher.ep_group, routed_E.detach().clone())
        active_E = routed_E > 0
        if bool(active_E.all()):
            return None
        ids = torch.as_tensor(self.experts.global_expert_ids, device=active_E.device)
        return active_E.index_select(0, ids)

    def forward(self, x_TD: torch.Tensor, central: Optional[Mapping[str, torch.Tensor]],
                hooks: Optional[ExpertHooks] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        routing = self.gate(x_TD)
        chosen_probs_TK = routing.probs_TE.gather(1, routing.experts_TK)
        if self.dispatch == "aux_gather":
            return self._forward_aux_gather(x_TD, central, hooks, routing, chosen_probs_TK)
        plan = self.dispatcher.plan(routing.experts_TK, chosen_probs_TK, self.training)
        x_LSD = self.dispatcher.dispatch(x_TD, plan)
        observing = hooks is not None and self.training and getattr(hooks, "observing", True)
        valid_LS = self.dispatcher.valid_slots(plan) if observing else None
        active_L = self._active_local_experts(plan.routed_E) if self.experts.needs_activity() else None
        y_LSD = self.experts(x_LSD, central, valid_LS, active_L, hooks, plan.segments_L)
        y_TD = self.dispatcher.combine(y_LSD, plan, routing.weights_TK)
        return y_TD.to(x_TD.dtype), routing.aux_loss, plan.routed_E

    def _forward_aux_gather(self, x_TD: torch.Tensor, central: Optional[Mapping[str, torch.Tensor]],
                            hooks: Optional[ExpertHooks], routing: Routing, chosen_probs_TK: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every expert rebuilt here from gathered auxiliaries; this rank's tokens never leave it."""
        if hooks is not None:
            raise RuntimeError("moe.dispatch=aux_gather does not support expert hooks (the orthogonal expert "
                               "optimizer, omoe): they act per local expert on inputs only its owner sees; "
                               "use moe.dispatch: tokens with omoe")
        plan = self.local_dispatcher.plan(routing.experts_TK, chosen_probs_TK, self.training)
        x_ESD = self.local_dispatcher.dispatch(x_TD, plan)
        y_ESD = self.experts(x_ESD, central, gather=self._aux_gather())
        y_TD = self.local_dispatcher.combine(y_ESD, plan, routing.weights_TK)
        return y_TD.to(x_TD.dtype), routing.aux_loss, plan.routed_E


class MPOEMoE(MoE):
    """An MoE feed-forward layer whose experts are MPOs sharing one central tensor per matrix.

    ``forward(hidden_states)`` returns ``(output, l_aux, exp_counts)`` like
    DeepSpeed's MoE: ``l_aux`` is the raw load-balancing loss (add
    ``aux_loss_coef * l_aux`` to the training loss), ``exp_counts`` the routes
    per global expert from this rank's tokens.

    Build it from a pretrained FFN with :meth:`from_dense` (upcycling: every
    expert starts as the dense FFN, so with the default straight-through
    router the output equals the FFN's at initialisation), or from scratch with
    the constructor (a random dense FFN, seeded per layer, is decomposed).
    With ``moe.expert_type == "ffn"`` the same layer holds plain dense experts:
    the standard-MoE baseline.
    """

    def __init__(self, hidden_size: int, ffn_size: int, moe: MoEConfig, mpo: Optional[MPOConfig] = None, *,
                 dense: Optional[DenseFFN] = None, layer_id: int = 0,
                 ep_group: Optional[parallel.ProcessGroup] = None) -> None:
        nn.Module.__init__(self)  # not MoE.__init__: see the module docstring
        moe = moe.with_ep_size(parallel.world_size())  # ep_size 0: automatic
        mpo = mpo or MPOConfig()
        dense = dense or DenseFFN.random(hidden_size, ffn_size, seed=mix_seed(moe.seed, layer_id, 1), gated=moe.gated)
        if dense.gated != moe.gated:
            raise ValueError(f"moe.gated={moe.gated} but the dense FFN is {'gated' if dense.gated else 'not gated'}; "
                             f"set moe.gated to match the FFN (conversion does it from the model family)")
        if (dense.hidden_size, dense.ffn_size) != (hidden_size, ffn_size):
            raise ValueError(f"dense FFN is {dense.hidden_size}->{dense.ffn_size}, layer is {hidden_size}->{ffn_size}")
        if ep_group is None and moe.ep_size > 1:
            ep_group = parallel.expert_parallel_group(moe.ep_size)
        if parallel.group_size(ep_group) != moe.ep_size:
            raise ValueError(f"ep_group has {parallel.group_size(ep_group)} ranks but moe.ep_size={moe.ep_size}")

        # Attributes DeepSpeed's engine and checkpoint code read.
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.ep_size = moe.ep_size
        self.expert_group_name = parallel.group_name(moe.ep_size)
        self.num_experts = moe.num_experts
        self.num_local_experts = moe.num_local_experts

        self.config = moe
        self.mpo_config = mpo
        self.layer_id = layer_id
        self.hidden_size = hidden_size
        self.ffn_size = ffn_size
        self.ep_rank = parallel.group_rank(ep_group)
        self.decompositions: dict[str, MPO] = {}

        template = self._build_template(dense, ep_group)
        experts = MoEExperts(template, self.num_local_experts, self.expert_group_name, moe.num_experts,
                             moe.activation, central_index=self._central_index())
        experts.global_expert_ids = [self.ep_rank * self.num_local_experts + i for i in range(self.num_local_experts)]
        gate = TopKRouter(hidden_size, moe)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(mix_seed(moe.seed, layer_id, 2))
            gate.wg.weight.copy_(torch.randn(gate.wg.weight.shape, generator=gen) * 0.02)
        self.deepspeed_moe = MoEBlock(gate, experts, build_dispatcher(moe, ep_group), dispatch=moe.dispatch)
        self.accumulation = 1  # micro-batches per step, for the "auto" cost model (set_accumulation)
        if moe.rotation_angle > 0 or moe.aux_reinit_fraction > 0:
            self._break_symmetry()
        if moe.expert_init == "perturb":
            self._perturb_experts()
        if not moe.expert_bias:
            self._freeze_expert_biases()
        self.central_mask, self.aux_mask = self._attach_gradient_masks()
        self._step_hooks: Optional[ExpertHooks] = None  # set by the MoE step protocol for one step

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dense(cls, dense: DenseFFN, moe: MoEConfig, mpo: Optional[MPOConfig] = None, *, layer_id: int = 0,
                   ep_group: Optional[parallel.ProcessGroup] = None) -> "MPOEMoE":
        """Upcycle a pretrained FFN: every expert starts as a copy of it."""
        return cls(dense.hidden_size, dense.ffn_size, moe, mpo, dense=dense, layer_id=layer_id, ep_group=ep_group)

    def _central_index(self) -> Optional[int]:
        return self.mpo_config.num_cores // 2 if self.config.expert_type == "mpo" else None

    def _factors(self, matrix: str) -> tuple[Optional[list[int]], Optional[list[int]]]:
        # gate has up's shape (D -> F) and is factored like it
        key = "up" if matrix == "gate" else matrix
        return (getattr(self.mpo_config, f"in_factors_{key}"), getattr(self.mpo_config, f"out_factors_{key}"))

    def _build_template(self, dense: DenseFFN, ep_group: Optional[parallel.ProcessGroup]) -> nn.Module:
        """The expert every local expert copies; sets ``self.central`` (empty for plain experts)."""
        if self.config.expert_type == "ffn":
            self.central = CentralTensors({})
            return FFNExpert(dense.weights(), dense.biases())
        weights = dense.weights()
        aux, cores = {}, {}
        for m in dense.matrices:
            in_f, out_f = self._factors(m)
            try:
                mpo = decompose(weights[m].float(), in_f, out_f, n=self.mpo_config.num_cores,
                                max_bond=self.mpo_config.max_bond, rel_tol=self.mpo_config.rel_tol)
            except ValueError as err:
                key = "up" if m == "gate" else m
                raise ValueError(f"MoE layer {self.layer_id}, {m} matrix {tuple(weights[m].shape)}: {err}. "
                                 f"Set mpo.in_factors_{key} / mpo.out_factors_{key} explicitly, "
                                 f"or mpo.num_cores") from err
            if self.mpo_config.gauge == "balanced":
                mpo = balance(mpo)
            self.decompositions[m] = mpo
            cores[m] = mpo.central
            aux[m] = mpo.auxiliary
        self.central = CentralTensors(cores, ep_group=ep_group, shard=self.config.shard_central,
                                      group_name=self.expert_group_name)
        return MPOExpert(aux, {m: b.float() for m, b in dense.biases().items()})

    def _break_symmetry(self) -> None:
        """``moe.rotation_angle`` then ``moe.aux_reinit_fraction`` on each expert's auxiliary cores.

        One generator per (layer, global expert id, matrix position), so an
        expert's cores do not depend on ep_size or on which rank holds it.
        """
        cfg, experts = self.config, self.deepspeed_moe.experts
        central = self._central_index()
        with torch.no_grad():
            for expert, global_id in zip(experts.deepspeed_experts, experts.global_expert_ids):
                for position, m in enumerate(cfg.matrices):
                    gen = torch.Generator().manual_seed(mix_seed(cfg.seed, self.layer_id, 6, global_id, position))
                    cores = [c.detach() for c in expert.aux_cores(m)]
                    if cfg.rotation_angle > 0:
                        cores = rotate_central_bonds(cores, central, cfg.rotation_angle, gen)
                    if cfg.aux_reinit_fraction > 0:
                        cores = [reinit_partially(c, cfg.aux_reinit_fraction, gen) for c in cores]
                    for param, core in zip(expert.aux_cores(m), cores):
                        param.copy_(core)

    def _perturb_experts(self) -> None:
        """Relative Gaussian noise on each expert's matrices, seeded by global expert id."""
        experts = self.deepspeed_moe.experts
        with torch.no_grad():
            for expert, global_id in zip(experts.deepspeed_experts, experts.global_expert_ids):
                gen = torch.Generator().manual_seed(mix_seed(self.config.seed, self.layer_id, 3, global_id))
                for name, p in expert.named_parameters():
                    if name.endswith("bias"):
                        continue
                    noise = torch.randn(p.shape, generator=gen).to(p)
                    p.add_(noise * self.config.init_noise * p.std())

    def _freeze_expert_biases(self) -> None:
        """``moe.expert_bias: false``: biases must be zero (the FFN had none) and stay so."""
        for name, p in self.deepspeed_moe.experts.named_parameters():
            if name.endswith("bias"):
                if bool(p.detach().any()):
                    raise ValueError(f"moe.expert_bias=false but expert bias {name} is nonzero; the FFN has biases, "
                                     f"so set moe.expert_bias: true")
                p.requires_grad_(False)

    def _attach_gradient_masks(self) -> tuple[Optional[GradientMask], Optional[GradientMask]]:
        cfg = self.config
        central_mask = aux_mask = None
        if self.central:
            if cfg.central_grad_keep_prob == 0.0:
                for p in self.central.values():
                    p.requires_grad_(False)
            elif cfg.central_grad_keep_prob < 1.0:
                central_mask = GradientMask(cfg.central_grad_keep_prob, cfg.central_grad_rescale,
                                            mix_seed(cfg.seed, self.layer_id, 4))
                self.central.set_gradient_mask(central_mask)
        if cfg.aux_grad_keep_prob < 1.0:
            aux_mask = GradientMask(cfg.aux_grad_keep_prob, cfg.central_grad_rescale,
                                    mix_seed(cfg.seed, self.layer_id, 5))
            experts = self.deepspeed_moe.experts
            for expert, global_id in zip(experts.deepspeed_experts, experts.global_expert_ids):
                for index, (name, p) in enumerate(expert.named_parameters()):
                    if not name.endswith("bias"):
                        aux_mask.attach(p, key=mix_seed(global_id, index))
        return central_mask, aux_mask

    # ------------------------------------------------------------------ runtime

    @property
    def ep_group(self) -> Optional[parallel.ProcessGroup]:
        return self.deepspeed_moe.dispatcher.ep_group

    @property
    def experts(self) -> MoEExperts:
        return self.deepspeed_moe.experts

    @property
    def global_expert_ids(self) -> list[int]:
        return self.deepspeed_moe.experts.global_expert_ids

    # The MoE step protocol (mpomoe_ds.moe.step.MoEStep) is the only caller of these three.

    def begin_step(self, step: int, hooks: Optional[ExpertHooks] = None) -> None:
        """Optimizer step ``step`` begins: seed the gradient masks; ``hooks`` act on the experts until it ends."""
        for mask in (self.central_mask, self.aux_mask):
            if mask is not None:
                mask.set_step(step)
        self._step_hooks = hooks

    def begin_micro_batch(self, index: Optional[int], is_last: bool) -> None:
        """Where the next forward sits in gradient accumulation (MPO experts rebuild once per step).

        See :meth:`mpomoe_ds.moe.experts.MoEExperts.set_micro_batch`: index in
        the step (0-based; None: rebuild in every forward), and whether the
        optimizer steps after it.
        """
        self.deepspeed_moe.experts.set_micro_batch(index, is_last)

    def end_step(self) -> None:
        """The step ended: later forwards (eval) rebuild every time and run no hooks."""
        self.deepspeed_moe.experts.set_micro_batch(None)
        self._step_hooks = None

    def central_tensors(self) -> Optional[Mapping[str, torch.Tensor]]:
        """Full central tensors ("up"/"down") for computation; None for plain experts.

        Sharded (``moe.shard_central``): gathered over the expert-parallel
        group on first access, so every rank of the group must read them alike.
        """
        return self.central.tensors() if self.central else None

    @property
    def dispatch(self) -> str:
        """The dispatch mode in use: "tokens", "aux_gather", or "auto" before the first forward decides."""
        return self.deepspeed_moe.dispatch

    def set_accumulation(self, micro_batches: int) -> None:
        """Micro-batches per optimizer step, which ``moe.dispatch: auto`` weighs (the trainer sets it)."""
        self.accumulation = int(micro_batches)

    def dispatch_workload(self, tokens_per_rank: int) -> DispatchWorkload:
        """This layer's inputs to the dispatch cost model (:mod:`mpomoe_ds.moe.dispatch_cost`)."""
        expert = self.deepspeed_moe.experts.deepspeed_experts[0]
        sizes = {"aux": 0, "bias": 0}
        for name, p in expert.named_parameters():
            sizes["bias" if name.endswith("bias") else "aux"] += p.numel()
        macs_per_expert = self.reconstruction_macs() / self.num_local_experts
        return DispatchWorkload(tokens_per_rank=tokens_per_rank, hidden_size=self.hidden_size, k=self.config.k,
                                accumulation=self.accumulation, dtype_bytes=expert_dtype_bytes(expert),
                                aux_per_expert=sizes["aux"], bias_per_expert=sizes["bias"],
                                num_experts=self.num_experts, ep_size=self.ep_size,
                                reconstruction_flops_per_expert=2.0 * macs_per_expert,
                                link_gbps=self.config.link_gbps, device_tflops=self.config.device_tflops)

    def _resolve_auto(self, num_tokens: int) -> None:
        """``moe.dispatch: auto``: pick this layer's mode from the cost model, the same on every rank."""
        if self.config.expert_type != "mpo":
            self.deepspeed_moe.dispatch = "tokens"
            return
        # The largest token count of the group, so every rank decides alike.
        tokens = int(parallel.all_reduce_max(self.ep_group, torch.tensor([num_tokens]))[0])
        workload = self.dispatch_workload(tokens)
        self.deepspeed_moe.dispatch = workload.choice()
        if parallel.rank() == 0:
            logger.info("MoE layer %d: moe.dispatch auto -> %s %s", self.layer_id, self.dispatch,
                        json.dumps(workload.report()))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_TD = hidden_states.reshape(-1, self.hidden_size)
        if self.dispatch == "auto":
            self._resolve_auto(x_TD.shape[0])
        y_TD, aux_loss, routed_E = self.deepspeed_moe(x_TD, self.central_tensors(), self._step_hooks)
        return y_TD.reshape(hidden_states.shape), aux_loss, routed_E

    # ------------------------------------------------------------------ accounting

    def expert_weights(self) -> dict[str, torch.Tensor]:
        """Dense (L, in, out) weights of the local experts (reconstructed for MPO)."""
        return self.deepspeed_moe.experts.expert_weights(self.central_tensors())

    def reconstruction_macs(self) -> int:
        """MACs to rebuild all local experts' matrices once (0 for plain experts)."""
        if not self.central:
            return 0
        total = 0
        for m in self.config.matrices:
            shapes = [tuple(c.shape) for c in self.deepspeed_moe.experts.deepspeed_experts[0].aux_cores(m)]
            shapes.insert(self._central_index(), tuple(self.central.full_shapes[m]))
            total += reconstruction_macs(shapes) * self.num_local_experts
        return total


def expert_dtype_bytes(expert: nn.Module) -> int:
    """Bytes per value of an expert's parameters (what the gather ships)."""
    return next(expert.parameters()).element_size()


def moe_layers(model: nn.Module) -> Iterator[tuple[str, MPOEMoE]]:
    """(name, layer) for every MPOEMoE inside ``model``."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, MPOEMoE))
