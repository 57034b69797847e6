"""Model conversion: turning a Hugging Face model's FFN blocks into MPOE MoE layers.

This module owns the wiring between transformers models and
:class:`~mpomoe_ds.moe.layer.MPOEMoE`: which blocks are converted, upcycling
each one from its pretrained weights, the thin wrapper modules that take the
place of the FFN inside a block, the expert-parallel group handed to every
layer, and the collector through which the wrappers return the auxiliary
(load-balancing) losses. Parallelization wiring stays here; the modeling code
(the MoE layer, router, dispatcher, experts) computes.

Supported layouts (found through :func:`mpomoe_ds.models.hf.find_ffn_linears`):

    gpt2  GPT2Model, GPT2LMHeadModel, GPT2ForSequenceClassification, ...:
          ``block.mlp`` (c_fc -> act -> c_proj -> dropout) becomes
          :class:`GPT2MoEMLP` (MoE -> dropout).
    bert  BERT-family encoders (BertModel and its task heads, RoBERTa,
          ELECTRA, XLM-R, MiniLM): the FFN spans ``layer.intermediate``
          (dense + act) and ``layer.output`` (dense, dropout,
          LayerNorm(h + input)). ``intermediate`` becomes an identity and
          ``output`` a :class:`BertMoEOutput` (MoE -> dropout ->
          LayerNorm(+ residual)) that keeps the original dropout and LayerNorm
          modules, so their state-dict keys do not change.

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
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import torch
from torch import nn

from mpomoe_ds import parallel
from mpomoe_ds.config import to_dict
from mpomoe_ds.models.hf import FFN_PATTERNS, find_ffn_linears, get_submodule_at, linear_weight_in_out
from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.moe.layer import DenseFFN, MPOEMoE, moe_layers
from mpomoe_ds.moe.params import ParameterReport, parameter_report
from mpomoe_ds.mpo.config import MPOConfig

SUPPORTED_MODELS = ("GPT-2 (GPT2Model, GPT2LMHeadModel, GPT2ForSequenceClassification) and BERT-family encoders "
                    "(BertModel and its task heads, RoBERTa, ELECTRA, XLM-R, MiniLM)")

# Hugging Face activation names -> the expert activations of mpomoe_ds.moe.config.ACTIVATIONS (same formula each).
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_new",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}

# Family -> the HF config attribute naming its FFN activation.
ACTIVATION_ATTRS = {"gpt2": "activation_function", "bert": "hidden_act"}


# --------------------------------------------------------------------------- auxiliary losses


class AuxRecord(NamedTuple):
    """One MoE layer's routing statistics from its latest forward."""

    layer: str  # block name, e.g. "encoder.layer.3"
    l_aux: torch.Tensor  # raw load-balancing loss E * sum_e f_e P_e (scalar, carries the graph)
    counts: torch.Tensor  # routes per global expert from this rank's tokens, before capacity drops


class MoEAuxCollector:
    """Where the MoE wrappers of one model leave their auxiliary losses.

    Holds at most one record per layer: a layer's forward replaces its previous
    record. Memory is therefore bounded whether or not anyone reads the
    records (evaluation loops, no-grad forwards, activation recomputation
    during backward), but a training step must read them after *every*
    forward, before the next one (two forwards then one backward would see
    only the second forward's losses).

    The total auxiliary loss of a step is ``aux_loss_coef * sum_l l_aux_l``
    over the MoE layers; each ``l_aux_l`` is the Switch balance loss of this
    rank's tokens, so with data parallelism the optimised quantity is the mean
    over ranks of the per-rank losses (see :func:`mpomoe_ds.moe.router.load_balancing_loss`).
    """

    def __init__(self, aux_loss_coef: float = 0.0) -> None:
        self.aux_loss_coef = aux_loss_coef
        self._records: dict[str, AuxRecord] = {}

    def record(self, layer: str, l_aux: torch.Tensor, counts: torch.Tensor) -> None:
        self._records[layer] = AuxRecord(layer, l_aux, counts)

    def records(self) -> list[AuxRecord]:
        """The current records in model order, without clearing them."""
        return list(self._records.values())

    def pop(self) -> list[AuxRecord]:
        """The current records in model order; the collector is empty afterwards."""
        out = self.records()
        self._records.clear()
        return out

    def total_aux_loss(self, coef: Optional[float] = None) -> torch.Tensor:
        """``coef * sum_l l_aux_l`` over the current records (coef defaults to moe.aux_loss_coef).

        Does not clear the records (call :meth:`pop` for the counts); returns a
        zero scalar when nothing was recorded.
        """
        coef = self.aux_loss_coef if coef is None else coef
        records = self.records()
        return coef * self.sum_aux_losses(records) if records else torch.zeros(())

    @staticmethod
    def sum_aux_losses(records: list[AuxRecord]) -> torch.Tensor:
        """``sum_l l_aux_l`` over records (fp32), the raw balance loss of a forward."""
        return torch.stack([r.l_aux.float() for r in records]).sum()

    def __len__(self) -> int:
        return len(self._records)


# --------------------------------------------------------------------------- wrapper modules


class MoEFFN(nn.Module):
    """Base of the modules that take an FFN's place in a block: the MoE layer plus bookkeeping.

    ``moe`` is the :class:`MPOEMoE`; ``block_index`` / ``block_name`` say
    which block this was (export rebuilds conversions from them).
    """

    family = ""

    def __init__(self, moe: MPOEMoE, aux: MoEAuxCollector, block_index: int, block_name: str) -> None:
        super().__init__()
        self.moe = moe
        self.aux = aux  # plain attribute: shared by all wrappers of the model, not a submodule
        self.block_index = block_index
        self.block_name = block_name

    def run_moe(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out, l_aux, counts = self.moe(hidden_states)
        self.aux.record(self.block_name, l_aux, counts)
        return out


class GPT2MoEMLP(MoEFFN):
    """Replaces GPT-2's ``block.mlp``: MoE -> dropout (the original dropout module)."""

    family = "gpt2"

    def __init__(self, moe: MPOEMoE, dropout: nn.Module, aux: MoEAuxCollector, block_index: int,
                 block_name: str) -> None:
        super().__init__(moe, aux, block_index, block_name)
        self.dropout = dropout

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.run_moe(hidden_states))


class BertMoEOutput(MoEFFN):
    """Replaces a BERT-family ``layer.output``: MoE -> dropout -> LayerNorm(h + input).

    The block's ``intermediate`` becomes an identity, so ``hidden_states`` is
    the attention output, which is also ``input_tensor`` (the residual).
    """

    family = "bert"

    def __init__(self, moe: MPOEMoE, dropout: nn.Module, layer_norm: nn.Module, aux: MoEAuxCollector,
                 block_index: int, block_name: str) -> None:
        super().__init__(moe, aux, block_index, block_name)
        self.dropout = dropout
        self.LayerNorm = layer_norm  # HF's attribute name, so the state-dict keys stay the same

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.run_moe(hidden_states)) + input_tensor)


def moe_wrappers(model: nn.Module) -> list[tuple[str, MoEFFN]]:
    """(module path, wrapper) for every converted block, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEFFN)]


# --------------------------------------------------------------------------- report


@dataclass
class ConvertedBlock:
    """One block that became an MoE layer.

    ``error_bound`` is the absolute Frobenius bound of each matrix's MPO
    truncation (0 when lossless or for plain "ffn" experts); ``rel_error_bound``
    divides it by the pretrained matrix's norm.
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

    @property
    def max_rel_error_bound(self) -> float:
        return max((v for b in self.blocks for v in b.rel_error_bound.values()), default=0.0)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready contents (the collector left out)."""
        return {"model_class": self.model_class, "family": self.family, "num_blocks": self.num_blocks,
                "moe": to_dict(self.moe), "mpo": to_dict(self.mpo),
                "blocks": [dataclasses.asdict(b) for b in self.blocks],
                "params_before": self.params_before.as_dict(), "params_after": self.params_after.as_dict(),
                "notes": list(self.notes)}

    def summary(self) -> str:
        before, after = self.params_before, self.params_after
        lines = [f"{self.model_class} ({self.family}): {len(self.blocks)}/{self.num_blocks} FFN blocks -> MoE "
                 f"({self.moe.num_experts} {self.moe.expert_type} experts, top-{self.moe.k}, "
                 f"ep_size={self.moe.ep_size}, activation={self.moe.activation})",
                 f"parameters: {before.total_local:,} before, {after.total_local:,} after on this rank "
                 f"(central {after.central_global:,}, experts {after.expert_global:,} over all ranks)"]
        for b in self.blocks:
            bound = ", ".join(f"{m} {v:.2e}" for m, v in b.rel_error_bound.items()) or "exact"
            lines.append(f"  block {b.index} {b.block_name} -> MoE layer {b.layer_id}; rel. error bound: {bound}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------- conversion


def convert_model(model: nn.Module, moe: MoEConfig, mpo: Optional[MPOConfig] = None,
                  ep_group: Optional[parallel.ProcessGroup] = None) -> ConversionReport:
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
    ffns = _find_blocks(model)
    family = _family(model, ffns)
    moe, notes = _with_model_activation(model, family, moe.with_ep_size(parallel.world_size()))
    _check_block_options(model, family)
    indices = moe.moe_layer_indices(len(ffns))

    params_before = parameter_report(model)
    aux = MoEAuxCollector(moe.aux_loss_coef)
    blocks = []
    for layer_id, index in enumerate(indices):
        block_name, up, down = ffns[index]
        blocks.append(_convert_block(model, family, index, block_name, up, down, layer_id, moe, mpo, ep_group, aux))
    model.moe_aux = aux  # HF forwards cannot return the losses; see MoEAuxCollector
    return ConversionReport(model_class=type(model).__name__, family=family, num_blocks=len(ffns), moe=moe,
                            mpo=mpo, blocks=blocks, params_before=params_before,
                            params_after=parameter_report(model), aux=aux, notes=notes)


def _find_blocks(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    try:
        return find_ffn_linears(model)
    except ValueError as err:
        raise ValueError(f"cannot convert {type(model).__name__}: no FFN blocks of a supported layout. "
                         f"Supported: {SUPPORTED_MODELS}") from err


def _family(model: nn.Module, ffns: list[tuple[str, nn.Module, nn.Module]]) -> str:
    """The layout family of the model's blocks ("gpt2" or "bert"); one family per model."""
    families = set()
    for block_name, up, _ in ffns:
        block = model.get_submodule(block_name)
        families.update(p.family for p in FFN_PATTERNS if get_submodule_at(block, p.up) is up)
    if len(families) != 1:
        raise ValueError(f"{type(model).__name__} mixes FFN layouts {sorted(families)}; supported: {SUPPORTED_MODELS}")
    family = families.pop()
    if family not in ACTIVATION_ATTRS:
        raise ValueError(f"cannot convert {type(model).__name__}: its FFN layout ({family}) is recognised but "
                         f"conversion supports only {SUPPORTED_MODELS}")
    return family


def _model_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no .config; convert a transformers model "
                         f"({SUPPORTED_MODELS})")
    return config


def _with_model_activation(model: nn.Module, family: str, moe: MoEConfig) -> tuple[MoEConfig, list[str]]:
    """The MoE config with the model's own FFN activation: experts must compute what the FFN did."""
    attr = ACTIVATION_ATTRS[family]
    hf_act = getattr(_model_config(model), attr, None)
    if not isinstance(hf_act, str) or hf_act not in HF_ACTIVATIONS:
        raise ValueError(f"{type(model).__name__}: config.{attr}={hf_act!r} has no expert equivalent; "
                         f"supported activations are {sorted(HF_ACTIVATIONS)}")
    activation = HF_ACTIVATIONS[hf_act]
    if activation == moe.activation:
        return moe, []
    note = (f"moe.activation set to {activation!r} from the model's config.{attr}={hf_act!r} "
            f"(the MoE config had {moe.activation!r})")
    return dataclasses.replace(moe, activation=activation), [note]


def _check_block_options(model: nn.Module, family: str) -> None:
    config = _model_config(model)
    chunk = getattr(config, "chunk_size_feed_forward", 0) or 0
    if family == "bert" and chunk:
        # Chunking would route each chunk separately: capacities and balance
        # losses would be per chunk, and only the last chunk's loss recorded.
        raise ValueError(f"{type(model).__name__}: config.chunk_size_feed_forward={chunk} splits the FFN into "
                         f"chunks, which MoE routing does not support; set it to 0 before converting")


def _dense_ffn(up: nn.Module, down: nn.Module) -> DenseFFN:
    """The pretrained FFN as CPU float32 tensors (decomposition runs there, in float64 inside)."""
    up_w, down_w = linear_weight_in_out(up), linear_weight_in_out(down)
    return DenseFFN(up_weight=up_w.detach().float().cpu().clone(), up_bias=_bias(up, up_w.shape[1]),
                    down_weight=down_w.detach().float().cpu().clone(), down_bias=_bias(down, down_w.shape[1]))


def _bias(module: nn.Module, size: int) -> torch.Tensor:
    bias = getattr(module, "bias", None)
    return torch.zeros(size) if bias is None else bias.detach().float().cpu().clone()


def _convert_block(model: nn.Module, family: str, index: int, block_name: str, up: nn.Module, down: nn.Module,
                   layer_id: int, moe: MoEConfig, mpo: MPOConfig, ep_group: Optional[parallel.ProcessGroup],
                   aux: MoEAuxCollector) -> ConvertedBlock:
    dense = _dense_ffn(up, down)
    reference = up.weight
    try:
        layer = MPOEMoE.from_dense(dense, moe, mpo, layer_id=layer_id, ep_group=ep_group)
    except ValueError as err:
        raise ValueError(f"converting block {index} ({block_name}) of {type(model).__name__}: {err}") from err
    layer.to(device=reference.device, dtype=reference.dtype)
    block = model.get_submodule(block_name)
    if family == "gpt2":
        block.mlp = GPT2MoEMLP(layer, block.mlp.dropout, aux, index, block_name)
        moe_module = f"{block_name}.mlp.moe"
    else:
        block.output = BertMoEOutput(layer, block.output.dropout, block.output.LayerNorm, aux, index, block_name)
        block.intermediate = nn.Identity()
        moe_module = f"{block_name}.output.moe"
    norms = {"up": float(dense.up_weight.norm()), "down": float(dense.down_weight.norm())}
    bonds = {m: list(d.bond_dims) for m, d in layer.decompositions.items()}
    bounds = {m: float(d.error_bound) for m, d in layer.decompositions.items()}
    return ConvertedBlock(index=index, block_name=block_name, layer_id=layer_id, moe_module=moe_module,
                          hidden_size=dense.hidden_size, ffn_size=dense.ffn_size, bond_dims=bonds,
                          error_bound=bounds,
                          rel_error_bound={m: b / norms[m] if norms[m] > 0 else 0.0 for m, b in bounds.items()})


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
