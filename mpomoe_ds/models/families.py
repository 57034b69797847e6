"""Model-family adapters: where each transformers family keeps its FFNs and how an MoE takes their place.

One small :class:`FamilyAdapter` per family, in the registry :data:`FAMILIES`
(first match wins). An adapter says

    ffn          the module the MoE wrapper replaces, relative to a block
    projections  matrix position ("gate", "up", "down") -> dotted path from the
                 block to its ``nn.Linear`` / GPT-2 ``Conv1D``; a "gate" entry
                 makes the experts gated: h = act(x W_gate) * (x W_up)
    activation   the config attribute naming the FFN activation
    model_types  the ``config.model_type`` values it accepts (empty: any model
                 whose blocks match the paths, e.g. every BERT-family encoder)
    install      puts the wrapper in place (see :mod:`mpomoe_ds.models.wrappers`)
                 and returns its dotted path below the block
    check        refuses block options MoE routing cannot honour

Supported:

    gpt2        GPT-2: ``block.mlp`` (c_fc -> act -> c_proj -> dropout) -> MoEMLP(+ dropout)
    bert        BERT-family encoders (BERT, RoBERTa, ELECTRA, XLM-R, MiniLM):
                ``intermediate`` -> identity, ``output`` -> BertMoEOutput
    distilbert  DistilBERT: ``block.ffn`` (lin1 -> act -> lin2 -> dropout) -> MoEMLP(+ dropout)
    llama       Llama, Mistral, Qwen2, Qwen3 (and their task heads): ``block.mlp``
                (down(act(gate(x)) * up(x)), RMSNorm outside it) -> MoEMLP
    t5          T5 1.0 (ReLU, ``DenseReluDense.wi`` / ``.wo``) -> MoEMLP
    t5-gated    T5 1.1 / Flan-T5 (gated GELU, ``wi_0`` gate, ``wi_1`` up, ``wo``) -> MoEMLP

Adding a family: write one adapter (paths, activation attribute, install),
add it to :data:`FAMILIES` before any adapter whose paths it shares, and add a
logits-equality test in ``tests/models/test_families.py``.

Naming conventions:
    block       the module the projection paths are relative to (a GPT-2
                ``transformer.h.3``, a T5 ``encoder.block.0.layer.1`` (T5LayerFF))
    block name  its dotted module path; block index = its position among the
                model's FFN blocks (``moe.layers`` selects by it)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

from torch import nn

from mpomoe_ds.models.hf import get_submodule_at, is_projection
from mpomoe_ds.models.wrappers import BertMoEOutput, MoEAuxCollector, MoEMLP
from mpomoe_ds.moe.layer import MPOEMoE

# Hugging Face activation names -> the expert activations of mpomoe_ds.moe.config.ACTIVATIONS (same formula each).
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_new",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}

# Decoders whose attention keeps packed documents apart when given position ids that restart at every document
# (transformers' create_causal_mask builds a block-diagonal causal mask from them when attention_mask is None);
# data.document_masking needs one. tests/models/test_document_masking.py checks each.
PACKED_DOCUMENT_MODEL_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3"})

# Installs a wrapper around ``layer`` in ``block``: (block, layer, aux, family, index, block name) -> path below block.
Installer = Callable[[nn.Module, MPOEMoE, MoEAuxCollector, str, int, str], str]


class FFNBlock(NamedTuple):
    """One FFN found in a model: its block and its projection modules by matrix position."""

    name: str
    block: nn.Module
    projections: dict[str, nn.Module]


@dataclass(frozen=True)
class FamilyAdapter:
    """How one model family's FFN blocks are found, read and replaced (see the module docstring)."""

    name: str
    ffn: str
    projections: dict[str, str]
    activation: str
    install: Installer
    model_types: tuple[str, ...] = ()
    check: Optional[Callable[[Any], None]] = None
    notes: tuple[str, ...] = field(default=())

    @property
    def gated(self) -> bool:
        return "gate" in self.projections

    def accepts(self, config: Any) -> bool:
        return not self.model_types or getattr(config, "model_type", None) in self.model_types

    def match(self, block: nn.Module) -> Optional[dict[str, nn.Module]]:
        """The block's projections by matrix position, or None when the block is not of this layout."""
        found = {m: get_submodule_at(block, path) for m, path in self.projections.items()}
        return found if all(is_projection(p) for p in found.values()) else None

    def find_blocks(self, model: nn.Module) -> list[FFNBlock]:
        return [FFNBlock(name, block, found) for name, block in model.named_modules()
                if (found := self.match(block)) is not None]

    def activation_of(self, config: Any) -> str:
        """The expert activation equal to the family's FFN activation.

        Raises:
            ValueError: the config names an activation with no expert equivalent.
        """
        hf_act = getattr(config, self.activation, None)
        if not isinstance(hf_act, str) or hf_act not in HF_ACTIVATIONS:
            raise ValueError(f"{self.name}: config.{self.activation}={hf_act!r} has no expert equivalent; "
                             f"supported activations are {sorted(HF_ACTIVATIONS)}")
        return HF_ACTIVATIONS[hf_act]


# --------------------------------------------------------------------------- installers


def _replace_ffn(attr: str, keep_dropout: bool) -> Installer:
    """Installer that swaps ``block.<attr>`` (a whole FFN module) for a :class:`MoEMLP`."""

    def install(block: nn.Module, layer: MPOEMoE, aux: MoEAuxCollector, family: str, index: int, name: str) -> str:
        owner_path, _, leaf = attr.rpartition(".")
        owner = block.get_submodule(owner_path) if owner_path else block
        dropout = getattr(getattr(owner, leaf), "dropout", None) if keep_dropout else None
        setattr(owner, leaf, MoEMLP(layer, aux, family, index, name, dropout=dropout))
        return f"{attr}.moe"

    return install


def _install_bert(block: nn.Module, layer: MPOEMoE, aux: MoEAuxCollector, family: str, index: int,
                  name: str) -> str:
    block.output = BertMoEOutput(layer, aux, family, index, name, block.output.dropout, block.output.LayerNorm)
    block.intermediate = nn.Identity()
    return "output.moe"


def _no_chunking(config: Any) -> None:
    chunk = getattr(config, "chunk_size_feed_forward", 0) or 0
    if chunk:
        # Chunking would route each chunk separately: capacities and balance
        # losses would be per chunk, and only the last chunk's loss recorded.
        raise ValueError(f"config.chunk_size_feed_forward={chunk} splits the FFN into chunks, which MoE "
                         f"routing does not support; set it to 0 before converting")


LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")

T5_TYPES = ("t5", "mt5", "umt5")

T5_DROPOUT_NOTE = ("T5's dropout between the activation and wo (dropout_rate) is not applied inside the experts; "
                   "the block's output dropout still is")

FAMILIES: tuple[FamilyAdapter, ...] = (
    FamilyAdapter("bert", ffn="output", projections={"up": "intermediate.dense", "down": "output.dense"},
                  activation="hidden_act", install=_install_bert, check=_no_chunking),
    FamilyAdapter("gpt2", ffn="mlp", projections={"up": "mlp.c_fc", "down": "mlp.c_proj"},
                  activation="activation_function", install=_replace_ffn("mlp", keep_dropout=True)),
    FamilyAdapter("distilbert", ffn="ffn", projections={"up": "ffn.lin1", "down": "ffn.lin2"},
                  activation="activation", install=_replace_ffn("ffn", keep_dropout=True), check=_no_chunking),
    FamilyAdapter("llama", ffn="mlp",
                  projections={"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
                  activation="hidden_act", install=_replace_ffn("mlp", keep_dropout=False), model_types=LLAMA_TYPES),
    FamilyAdapter("t5-gated", ffn="DenseReluDense",
                  projections={"gate": "DenseReluDense.wi_0", "up": "DenseReluDense.wi_1",
                               "down": "DenseReluDense.wo"},
                  activation="dense_act_fn", install=_replace_ffn("DenseReluDense", keep_dropout=False),
                  model_types=T5_TYPES, notes=(T5_DROPOUT_NOTE,)),
    FamilyAdapter("t5", ffn="DenseReluDense", projections={"up": "DenseReluDense.wi", "down": "DenseReluDense.wo"},
                  activation="dense_act_fn", install=_replace_ffn("DenseReluDense", keep_dropout=False),
                  model_types=T5_TYPES, notes=(T5_DROPOUT_NOTE,)),
)

SUPPORTED_MODELS = ("GPT-2, BERT-family encoders (BERT, RoBERTa, ELECTRA, XLM-R, MiniLM), DistilBERT, "
                    "Llama, Mistral, Qwen2, Qwen3 (their base models and task heads), "
                    "T5 1.0 / 1.1 (T5Model, T5ForConditionalGeneration, T5EncoderModel)")


def family(name: str) -> FamilyAdapter:
    """The registered adapter called ``name``."""
    for adapter in FAMILIES:
        if adapter.name == name:
            return adapter
    raise ValueError(f"unknown model family {name!r}; registered: {[a.name for a in FAMILIES]}")


def detect(model: nn.Module) -> tuple[FamilyAdapter, list[FFNBlock]]:
    """The adapter of ``model`` and its FFN blocks in model order.

    Raises:
        ValueError: the model is already MoE, no adapter matches (names the
            supported families), or FFN modules are shared between blocks.
    """
    config = getattr(model, "config", None)
    _refuse_native_moe(model, config)
    for adapter in FAMILIES:
        if config is not None and not adapter.accepts(config):
            continue
        blocks = adapter.find_blocks(model)
        if blocks:
            _refuse_shared_ffns(model, blocks)
            return adapter, blocks
    kind = getattr(config, "model_type", None) or type(model).__name__
    raise ValueError(f"cannot convert {type(model).__name__} (model_type {kind!r}): no FFN blocks of a "
                     f"supported family. Supported: {SUPPORTED_MODELS}. To add a family, register an adapter "
                     f"in mpomoe_ds.models.families.FAMILIES")


def find_ffn_linears(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """``[(block_name, up, down), ...]`` of every FFN of a supported family (the up and down projections)."""
    _, blocks = detect(model)
    return [(b.name, b.projections["up"], b.projections["down"]) for b in blocks]


def _refuse_native_moe(model: nn.Module, config: Any) -> None:
    """An FFN that is already MoE (Mixtral, Qwen-MoE, ...) has no single FFN to upcycle."""
    experts = max(getattr(config, "num_local_experts", 0) or 0, getattr(config, "num_experts", 0) or 0)
    moe_modules = [type(m).__name__ for m in model.modules() if "moe" in type(m).__name__.lower()]
    if experts > 1 or moe_modules:
        what = moe_modules[0] if moe_modules else f"{experts} experts per layer"
        raise ValueError(f"cannot convert {type(model).__name__}: its FFNs are already MoE ({what}). Upcycle the "
                         f"dense model it came from, or train the MoE model as it is")


def _refuse_shared_ffns(model: nn.Module, blocks: list[FFNBlock]) -> None:
    """Tied FFNs (one module in several blocks) would be converted once but routed twice."""
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    for block in blocks:
        for matrix, module in block.projections.items():
            if len(paths[id(module)]) > 1:
                raise ValueError(f"cannot convert {type(model).__name__}: the {matrix} projection of "
                                 f"{block.name} is shared by {paths[id(module)]}; tied or shared FFNs are not "
                                 f"supported (untie them, e.g. copy.deepcopy each block's FFN, before converting)")
