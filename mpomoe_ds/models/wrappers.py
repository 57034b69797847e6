"""The modules that take an FFN's place inside a transformer block, and where they leave aux losses.

Each wrapper holds one :class:`~mpomoe_ds.moe.layer.MPOEMoE` and keeps the
forward signature and return value of the module it replaces, so the block's
own forward runs unchanged. Which wrapper a family uses, and where it goes,
is the family adapter's business (:mod:`mpomoe_ds.models.families`).

    MoEMLP        replaces a whole FFN module: MoE, then the FFN's own output
                  dropout if it had one (GPT-2 ``block.mlp``, DistilBERT
                  ``block.ffn``, Llama / Mistral / Qwen ``block.mlp``, T5
                  ``T5LayerFF.DenseReluDense``)
    BertMoEOutput replaces a BERT-family ``layer.output``: MoE -> dropout ->
                  LayerNorm(h + input), keeping the original dropout and
                  LayerNorm modules so their state-dict keys do not change

Auxiliary losses: HF blocks return hidden states only, so every wrapper of a
model records ``(block_name, l_aux, routed counts)`` into one shared
:class:`MoEAuxCollector` (``model.moe_aux``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from mpomoe_ds.moe.layer import MPOEMoE


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

    ``moe`` is the :class:`MPOEMoE`; ``family`` (the adapter's name),
    ``block_index`` and ``block_name`` say which block this was (export
    rebuilds conversions from them).
    """

    def __init__(self, moe: MPOEMoE, aux: "MoEAuxCollector", family: str, block_index: int,
                 block_name: str) -> None:
        super().__init__()
        self.moe = moe
        self.aux = aux  # plain attribute: shared by all wrappers of the model, not a submodule
        self.family = family
        self.block_index = block_index
        self.block_name = block_name

    def run_moe(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out, l_aux, counts = self.moe(hidden_states)
        self.aux.record(self.block_name, l_aux, counts)
        return out


class MoEMLP(MoEFFN):
    """Replaces a whole FFN module ``y = ffn(x)``: MoE, then the FFN's output dropout (if it had one)."""

    def __init__(self, moe: MPOEMoE, aux: "MoEAuxCollector", family: str, block_index: int, block_name: str,
                 dropout: Optional[nn.Module] = None) -> None:
        super().__init__(moe, aux, family, block_index, block_name)
        self.dropout = dropout if dropout is not None else nn.Identity()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.run_moe(hidden_states))


class BertMoEOutput(MoEFFN):
    """Replaces a BERT-family ``layer.output``: MoE -> dropout -> LayerNorm(h + input).

    The block's ``intermediate`` becomes an identity, so ``hidden_states`` is
    the attention output, which is also ``input_tensor`` (the residual).
    """

    def __init__(self, moe: MPOEMoE, aux: "MoEAuxCollector", family: str, block_index: int, block_name: str,
                 dropout: nn.Module, layer_norm: nn.Module) -> None:
        super().__init__(moe, aux, family, block_index, block_name)
        self.dropout = dropout
        self.LayerNorm = layer_norm  # HF's attribute name, so the state-dict keys stay the same

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.run_moe(hidden_states)) + input_tensor)


def moe_wrappers(model: nn.Module) -> list[tuple[str, MoEFFN]]:
    """(module path, wrapper) for every converted block, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEFFN)]
