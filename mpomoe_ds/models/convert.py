"""Model conversion: turning a Hugging Face model's FFN blocks into MPOE MoE layers.

This module owns the wiring between transformers models and
:class:`~mpomoe_ds.moe.layer.MPOEMoE`: which blocks are converted, upcycling
each one from its pretrained weights, the thin wrapper modules that take the
place of the FFN inside a block, the expert-parallel group handed to every
layer, and the collector through which the wrappers return the auxiliary
(load-balancing) losses. Parallelization wiring stays here; the modeling code
(the MoE layer, router, dispatcher, experts) computes.

Which models are supported, where their FFNs are and which wrapper takes
their place is the family adapters' business (:mod:`mpomoe_ds.models.families`:
GPT-2, BERT family, DistilBERT, Llama / Mistral / Qwen2 / Qwen3 with gated
(gate, up, down) experts, T5 1.0 and 1.1); this module only drives them.

Auxiliary losses: HF blocks return hidden states only, so every wrapper of a
model records ``(block_name, l_aux, routed counts)`` into one shared
:class:`MoEAuxCollector` (``model.moe_aux``, also ``report.aux``). A training
step reads it after the forward::

    out = model(**batch)
    loss = out.loss + model.moe_aux.total_aux_loss()   # aux_loss_coef * sum_l l_aux
    for name, l_aux, counts in model.moe_aux.pop():    # log, and drop the records
        ...

Naming conventions:
    block index  position of a transformer block among the model's FFN blocks
                 (0..num_blocks-1); ``moe.layers`` selects by it
    block name   dotted module path of the block, e.g. ``encoder.layer.3``
    layer_id     order of a converted block among the MoE layers (0, 1, ...);
                 DeepSpeed names its expert checkpoint files by it
                 (``layer_{layer_id}_expert_{g}_...``)
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from torch import nn

from mpomoe_ds import parallel
from mpomoe_ds.config import to_dict
from mpomoe_ds.models.families import HF_ACTIVATIONS, SUPPORTED_MODELS, FamilyAdapter, FFNBlock, detect
from mpomoe_ds.models.hf import linear_weight_in_out
from mpomoe_ds.models.wrappers import AuxRecord, BertMoEOutput, MoEAuxCollector, MoEFFN, MoEMLP, moe_wrappers
from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.moe.layer import DenseFFN, MPOEMoE, moe_layers
from mpomoe_ds.moe.params import ParameterReport, parameter_report
from mpomoe_ds.mpo.config import MPOConfig

# Re-exported: the wrappers and the collector are part of conversion's public API.
__all__ = ["AuxRecord", "BertMoEOutput", "ConversionReport", "ConversionSpec", "ConvertedBlock", "HF_ACTIVATIONS",
           "MoEAuxCollector", "MoEFFN", "MoEMLP", "SUPPORTED_MODELS", "convert_model", "dense_report", "moe_wrappers",
           "relative_distance"]

# --------------------------------------------------------------------------- report


@dataclass
class ConvertedBlock:
    """One block that became an MoE layer.

    ``error_bound`` is the absolute Frobenius bound of each matrix's MPO
    truncation (0 when lossless or for plain "ffn" experts); ``rel_error_bound``
    divides it by the pretrained matrix's norm. ``init_rel_distance[m][g]`` is
    ``||W_g - W|| / ||W||`` (Frobenius) for global expert g's reconstructed
    matrix m at initialisation against the pretrained W: how far truncation,
    ``moe.rotation_angle``, ``moe.aux_reinit_fraction`` and ``init_noise``
    moved it (every expert of every rank).
    """

    index: int
    block_name: str
    layer_id: int
    moe_module: str
    hidden_size: int
    ffn_size: int
    bond_dims: dict[str, list[int]]
    error_bound: dict[str, float]
    rel_error_bound: dict[str, float]
    init_rel_distance: dict[str, list[float]] = field(default_factory=dict)

    @property
    def mean_init_distance(self) -> dict[str, float]:
        """Per matrix, the mean over experts of :attr:`init_rel_distance`."""
        return {m: sum(v) / len(v) for m, v in self.init_rel_distance.items() if v}


@dataclass
class ConversionReport:
    """What :func:`convert_model` did."""

    model_class: str
    family: str
    num_blocks: int
    moe: MoEConfig  # as applied (activation taken from the model)
    mpo: MPOConfig
    blocks: list[ConvertedBlock]
    params_before: ParameterReport
    params_after: ParameterReport
    aux: MoEAuxCollector
    notes: list[str] = field(default_factory=list)
    init_output_rel_distance: Optional[float] = None  # ||y - y_dense|| / ||y_dense|| on the probe batch

    def init_distance(self) -> dict[str, Any]:
        """How far the converted model starts from the dense one (what metrics.json records)."""
        return {"output_rel": self.init_output_rel_distance,
                "weight_rel": {b.block_name: b.mean_init_distance for b in self.blocks}}

    @property
    def max_rel_error_bound(self) -> float:
        return max((v for b in self.blocks for v in b.rel_error_bound.values()), default=0.0)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready contents (the collector left out)."""
        return {"model_class": self.model_class, "family": self.family, "num_blocks": self.num_blocks,
                "moe": to_dict(self.moe), "mpo": to_dict(self.mpo),
                "blocks": [dataclasses.asdict(b) for b in self.blocks],
                "params_before": self.params_before.as_dict(), "params_after": self.params_after.as_dict(),
                "notes": list(self.notes), "init_output_rel_distance": self.init_output_rel_distance}

    def summary(self) -> str:
        before, after = self.params_before, self.params_after
        lines = [f"{self.model_class} ({self.family}): {len(self.blocks)}/{self.num_blocks} FFN blocks -> MoE "
                 f"({self.moe.num_experts} {self.moe.expert_type} experts, top-{self.moe.k}, "
                 f"ep_size={self.moe.ep_size}, activation={self.moe.activation})",
                 f"parameters: {before.total_local:,} before, {after.total_local:,} after on this rank "
                 f"(central {after.central_global:,}, experts {after.expert_global:,} over all ranks)"]
        for b in self.blocks:
            bound = ", ".join(f"{m} {v:.2e}" for m, v in b.rel_error_bound.items()) or "exact"
            moved = ", ".join(f"{m} {v:.3e}" for m, v in b.mean_init_distance.items())
            lines.append(f"  block {b.index} {b.block_name} -> MoE layer {b.layer_id}; rel. error bound: {bound}; "
                         f"mean ||W_e - W||/||W|| at init: {moved}")
        if self.init_output_rel_distance is not None:
            lines.append(f"output distance from the dense model at init (probe batch): "
                         f"{self.init_output_rel_distance:.3e}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------- conversion


def convert_model(model: nn.Module, moe: MoEConfig, mpo: Optional[MPOConfig] = None,
                  ep_group: Optional[parallel.ProcessGroup] = None,
                  probe: Optional[Mapping[str, torch.Tensor]] = None) -> ConversionReport:
    """Replace the selected FFN blocks of a transformers model by upcycled MPOE MoE layers, in place.

    Args:
        model: a GPT-2 or BERT-family model (see :data:`SUPPORTED_MODELS`),
            with or without a task head, not yet converted.
        moe: the MoE layer config (``ep_size: 0`` = automatic over the processes);
            ``moe.layers`` picks the blocks
            (:meth:`MoEConfig.moe_layer_indices`). ``moe.activation`` is
            replaced by the model's own FFN activation (noted in the report).
        mpo: how expert matrices are factored (default :class:`MPOConfig`).
        ep_group: the expert-parallel process group (default: DeepSpeed's
            group for ``moe.ep_size``; None in a single process).
        probe: model inputs (``input_ids``, ``attention_mask``, ...) on which
            the model's first output is compared before and after conversion,
            in eval mode: ``report.init_output_rel_distance`` =
            ``||y - y_dense|| / ||y_dense||`` over the positions the attention
            mask keeps. Every rank must pass the same probe (the MoE forward
            is collective under expert parallelism).

    Returns:
        A :class:`ConversionReport`. The shared :class:`MoEAuxCollector` is
        ``report.aux`` and ``model.moe_aux``.

    Raises:
        ValueError: unsupported model (names the supported ones), already
            converted, unmappable activation, or an FFN width that cannot be
            factored (names the block and the config fields that fix it).
        ConfigError: ``moe.layers`` names blocks the model does not have.
    """
    mpo = mpo or MPOConfig()
    if any(True for _ in moe_layers(model)):
        raise ValueError(f"{type(model).__name__} already has MoE layers; convert a fresh model "
                         f"(use mpomoe_ds.models.export.load_converted to reload a converted one)")
    adapter, ffns = detect(model)
    config = _model_config(model)
    if adapter.check is not None:
        try:
            adapter.check(config)
        except ValueError as err:
            raise ValueError(f"{type(model).__name__}: {err}") from err
    moe, notes = _with_model_ffn(model, adapter, ffns, moe.with_ep_size(parallel.world_size()))
    indices = moe.moe_layer_indices(len(ffns))

    params_before = parameter_report(model)
    dense_out = _probe_output(model, probe) if probe is not None else None
    aux = MoEAuxCollector(moe.aux_loss_coef)
    blocks = [_convert_block(model, adapter, index, ffns[index], layer_id, moe, mpo, ep_group, aux)
              for layer_id, index in enumerate(indices)]
    model.moe_aux = aux  # HF forwards cannot return the losses; see MoEAuxCollector
    report = ConversionReport(model_class=type(model).__name__, family=adapter.name, num_blocks=len(ffns), moe=moe,
                              mpo=mpo, blocks=blocks, params_before=params_before,
                              params_after=parameter_report(model), aux=aux, notes=notes + list(adapter.notes))
    if dense_out is not None:
        report.init_output_rel_distance = relative_distance(_probe_output(model, probe), dense_out)
        aux.pop()  # the probe forward is no training step
    return report


def dense_report(model: nn.Module, moe: MoEConfig) -> ConversionReport:
    """The report of a model left dense (``moe.enabled: false``): no block converted, an empty collector.

    Sets ``model.moe_aux`` like :func:`convert_model`, so the training loop
    reads a (zero) balance loss the same way.
    """
    adapter, ffns = detect(model)
    params = parameter_report(model)
    aux = MoEAuxCollector(moe.aux_loss_coef)
    model.moe_aux = aux
    return ConversionReport(model_class=type(model).__name__, family=adapter.name, num_blocks=len(ffns), moe=moe,
                            mpo=MPOConfig(), blocks=[], params_before=params, params_after=params, aux=aux,
                            notes=["moe.enabled=false: the dense model, no block converted"],
                            init_output_rel_distance=0.0)


def relative_distance(y: torch.Tensor, reference: torch.Tensor) -> float:
    """``||y - reference||_F / ||reference||_F`` in float64 (0 when both are zero)."""
    diff, norm = float((y.double() - reference.double()).norm()), float(reference.double().norm())
    return diff / norm if norm > 0 else diff


@torch.no_grad()
def _probe_output(model: nn.Module, probe: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The model's first output on ``probe`` in eval mode, at the positions the attention mask keeps."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        inputs = {k: v.to(device) for k, v in probe.items()}
        if "decoder_input_ids" in inspect.signature(model.forward).parameters and "decoder_input_ids" not in inputs:
            inputs["decoder_input_ids"] = inputs["input_ids"]  # an encoder-decoder (T5): any fixed decoder input
        out = model(**inputs)
    finally:
        model.train(was_training)
    y = out[0].float().cpu()
    mask = probe.get("attention_mask")
    return y[mask.bool()] if mask is not None and mask.shape == y.shape[:2] else y


def _model_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no .config; convert a transformers model "
                         f"({SUPPORTED_MODELS})")
    return config


def _with_model_ffn(model: nn.Module, adapter: FamilyAdapter, ffns: list[FFNBlock],
                    moe: MoEConfig) -> tuple[MoEConfig, list[str]]:
    """The MoE config with the model's own FFN activation, gating and biases: experts compute what the FFN did."""
    try:
        activation = adapter.activation_of(_model_config(model))
    except ValueError as err:
        raise ValueError(f"{type(model).__name__}: {err}") from err
    notes = []
    if activation != moe.activation:
        hf_act = getattr(model.config, adapter.activation)
        notes.append(f"moe.activation set to {activation!r} from the model's config.{adapter.activation}="
                     f"{hf_act!r} (the MoE config had {moe.activation!r})")
    if adapter.gated != moe.gated:
        notes.append(f"moe.gated set to {adapter.gated} ({adapter.name} FFNs are "
                     f"{'gated' if adapter.gated else 'not gated'})")
    expert_bias = any(getattr(p, "bias", None) is not None for p in ffns[0].projections.values())
    if not expert_bias and moe.expert_bias:
        notes.append(f"moe.expert_bias set to false: {adapter.name} FFNs have no biases, so the experts' zero "
                     f"biases stay frozen")
    return dataclasses.replace(moe, activation=activation, gated=adapter.gated,
                               expert_bias=moe.expert_bias and expert_bias), notes


def _dense_ffn(projections: dict[str, nn.Module]) -> DenseFFN:
    """The pretrained FFN as CPU float32 tensors (decomposition runs there, in float64 inside).

    A projection without a bias (Llama, T5) gets a zero bias: experts always
    carry one, and a zero bias changes no output.
    """
    tensors: dict[str, torch.Tensor] = {}
    for m, module in projections.items():
        weight = linear_weight_in_out(module).detach().float().cpu().clone()
        tensors[f"{m}_weight"], tensors[f"{m}_bias"] = weight, _bias(module, weight.shape[1])
    return DenseFFN(**tensors)


def _bias(module: nn.Module, size: int) -> torch.Tensor:
    bias = getattr(module, "bias", None)
    return torch.zeros(size) if bias is None else bias.detach().float().cpu().clone()


def _convert_block(model: nn.Module, adapter: FamilyAdapter, index: int, ffn: FFNBlock, layer_id: int,
                   moe: MoEConfig, mpo: MPOConfig, ep_group: Optional[parallel.ProcessGroup],
                   aux: MoEAuxCollector) -> ConvertedBlock:
    dense = _dense_ffn(ffn.projections)
    reference = ffn.projections["up"].weight
    try:
        layer = MPOEMoE.from_dense(dense, moe, mpo, layer_id=layer_id, ep_group=ep_group)
    except ValueError as err:
        raise ValueError(f"converting block {index} ({ffn.name}) of {type(model).__name__}: {err}") from err
    layer.to(device=reference.device, dtype=reference.dtype)
    moe_module = f"{ffn.name}.{adapter.install(ffn.block, layer, aux, adapter.name, index, ffn.name)}"
    norms = {m: float(w.norm()) for m, w in dense.weights().items()}
    bonds = {m: list(d.bond_dims) for m, d in layer.decompositions.items()}
    bounds = {m: float(d.error_bound) for m, d in layer.decompositions.items()}
    return ConvertedBlock(index=index, block_name=ffn.name, layer_id=layer_id, moe_module=moe_module,
                          hidden_size=dense.hidden_size, ffn_size=dense.ffn_size, bond_dims=bonds,
                          error_bound=bounds,
                          rel_error_bound={m: b / norms[m] if norms[m] > 0 else 0.0 for m, b in bounds.items()},
                          init_rel_distance=_init_distances(layer, dense))


def _init_distances(layer: MPOEMoE, dense: DenseFFN) -> dict[str, list[float]]:
    """``||W_g - W|| / ||W||`` per matrix for every global expert g, gathered over the expert-parallel group."""
    weights = layer.expert_weights()
    local = torch.tensor([[relative_distance(weights[m][e].detach().cpu(), w) for e in range(weights[m].shape[0])]
                          for m, w in dense.weights().items()], dtype=torch.float64)
    # Ranks come in group order, so column ep_rank * L + l is global expert id ep_rank * L + l.
    every_M_E = torch.cat(parallel.all_gather(local, layer.ep_group), dim=1)
    return {m: every_M_E[i].tolist() for i, m in enumerate(dense.weights())}


# --------------------------------------------------------------------------- what was done


@dataclass(frozen=True)
class ConversionSpec:
    """Enough to redo a conversion on a fresh model: family, configs and converted block indices.

    Read back from a converted model's wrappers by :meth:`of`; export writes it
    next to the weights and :func:`convert_model` replays it on load.
    """

    family: str
    moe: MoEConfig
    mpo: MPOConfig
    blocks: tuple[int, ...]

    @classmethod
    def of(cls, model: nn.Module) -> "ConversionSpec":
        wrappers = [w for _, w in moe_wrappers(model)]
        if not wrappers:
            raise ValueError(f"{type(model).__name__} has no converted blocks; call convert_model first")
        first = wrappers[0].moe
        for w in wrappers[1:]:
            if w.moe.config != first.config or w.moe.mpo_config != first.mpo_config:
                raise ValueError(f"MoE layers of {type(model).__name__} use different configs "
                                 f"({wrappers[0].block_name} vs {w.block_name}); a conversion uses one")
        blocks = tuple(w.block_index for w in wrappers)
        return cls(family=wrappers[0].family, moe=dataclasses.replace(first.config, layers=list(blocks)),
                   mpo=first.mpo_config, blocks=blocks)
