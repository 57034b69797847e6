"""Task models around a (converted) Hugging Face backbone.

Owns: the multi-task model (one backbone, one head per classification or
regression task, the backbone's own LM head for language modelling, or, for
text-to-text training of encoder-decoders, the decoder writing label words),
the loss of each task kind, and adding the MoE load-balancing loss to it.

Text-to-text (``label_targets``): the decoder is trained with teacher forcing
on the gold class's label-word tokens (the mean token cross-entropy, as
Hugging Face's seq2seq models compute it). In eval mode the logits are the
log-likelihood of every class's label word (B, C): rank classification, the
exact arg max over the task's classes that constrained decoding would find,
without generation.

Shape legend: B batch, L sequence length, H hidden size, C classes, E experts.
Batches are single-task (every row has the same ``task_id``), so one head runs
per step and every rank runs the same head in the same step.
"""

from __future__ import annotations

import inspect
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mpomoe_ds.data.tasks import TaskSpec
from mpomoe_ds.models.config import POOLINGS
from mpomoe_ds.models.convert import MoEAuxCollector


def pool(hidden_BLH: torch.Tensor, attention_mask_BL: torch.Tensor, how: str) -> torch.Tensor:
    """(B, L, H) -> (B, H): mean over real tokens, the first token, or the last real token."""
    if how == "cls":
        return hidden_BLH[:, 0]
    mask_BL1 = attention_mask_BL.unsqueeze(-1).to(hidden_BLH.dtype)
    if how == "mean":
        return (hidden_BLH * mask_BL1).sum(1) / mask_BL1.sum(1).clamp_min(1.0)
    last_B = attention_mask_BL.sum(1).clamp_min(1) - 1
    return hidden_BLH[torch.arange(hidden_BLH.shape[0], device=hidden_BLH.device), last_B]


class MultiTaskModel(nn.Module):
    """A backbone with a head per task; forward returns losses and logits as a dict.

    ``moe_aux`` is the conversion's collector of per-layer balance losses and
    expert counts (None for a dense model); its losses are added to the task
    loss with weight ``aux_loss_coef``.
    """

    def __init__(self, backbone: nn.Module, tasks: Sequence[TaskSpec], *, moe_aux=None, aux_loss_coef: float = 0.0,
                 pooling: str = "mean", head_dropout: float = 0.1,
                 label_targets: Optional[dict[str, torch.Tensor]] = None) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}: choose one of {list(POOLINGS)}")
        self.backbone = backbone
        self.tasks = list(tasks)
        self.moe_aux = moe_aux
        self.aux_loss_coef = aux_loss_coef
        self.pooling = pooling
        hidden = backbone.config.hidden_size
        self.dropout = nn.Dropout(head_dropout)
        self.label_targets = dict(label_targets or {})
        for name, targets_CT in self.label_targets.items():  # moved with the model; not in checkpoints
            self.register_buffer(f"label_targets_{name}", targets_CT.long(), persistent=False)
        self.heads = nn.ModuleDict({t.name: nn.Linear(hidden, t.num_labels) for t in self.tasks
                                    if t.kind != "lm" and t.name not in self.label_targets})
        if any(t.kind == "lm" for t in self.tasks) and not hasattr(backbone, "lm_head"):
            raise ValueError("an lm task needs a causal-LM backbone (e.g. GPT-2 loaded as causal-lm)")

    def _encoder(self) -> nn.Module:
        """The part that returns hidden states: an encoder-decoder's encoder (T5), the LM wrapper's base model,
        or the backbone."""
        if getattr(self.backbone.config, "is_encoder_decoder", False):
            return self.backbone.get_encoder()
        return getattr(self.backbone, "base_model", self.backbone)

    def _takes_token_types(self) -> bool:
        """BERT-style encoders read token_type_ids; Llama, Qwen and T5 have no such input."""
        return "token_type_ids" in inspect.signature(self._encoder().forward).parameters

    def _text_to_text(self, task: str, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      labels_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss on the gold label words, logits): training logits are the decoder's (B, T, V); in eval mode
        the label-word log-likelihood of every class (B, C)."""
        targets_CT = getattr(self, f"label_targets_{task}")
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, labels=targets_CT[labels_B.long()])
        if self.training:
            return out.loss, out.logits
        from transformers.modeling_outputs import BaseModelOutput

        encoded = BaseModelOutput(last_hidden_state=out.encoder_last_hidden_state)
        scores = []
        for targets_T in targets_CT:  # the encoder ran once; one decoder pass per class
            candidate_BT = targets_T.expand(input_ids.shape[0], -1).contiguous()
            logits_BTV = self.backbone(encoder_outputs=encoded, attention_mask=attention_mask,
                                       labels=candidate_BT).logits
            nll_BT = F.cross_entropy(logits_BTV.float().transpose(1, 2), candidate_BT, ignore_index=-100,
                                     reduction="none")
            scores.append(-nll_BT.sum(1))
        return out.loss, torch.stack(scores, dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                task_id: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        task = self.tasks[int(task_id[0])]
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None and self._takes_token_types() else {}
        if task.kind == "lm" and position_ids is not None:
            # Packed documents (data.document_masking): without an attention mask the decoder builds a
            # block-diagonal causal mask from position ids that restart per document. Padding is only ever
            # at the end of a row, after every real token, and carries label -100, so dropping its mask is exact.
            # No KV cache: with one, transformers skips the packed-sequence mask.
            out = self.backbone(input_ids=input_ids, position_ids=position_ids, labels=labels, use_cache=False)
            task_loss, logits = out.loss, out.logits
        elif task.kind == "lm":
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            task_loss, logits = out.loss, out.logits
        elif task.name in self.label_targets:
            task_loss, logits = self._text_to_text(task.name, input_ids, attention_mask, labels)
        else:
            hidden = self._encoder()(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
            logits = self.heads[task.name](self.dropout(pool(hidden, attention_mask, self.pooling)))
            if task.kind == "regression":
                logits = logits.squeeze(-1)
                task_loss = F.mse_loss(logits.float(), labels.float())
            else:
                task_loss = F.cross_entropy(logits.float(), labels.long())
        result = {"task_loss": task_loss, "logits": logits}
        aux_loss = task_loss.new_zeros(())
        if self.moe_aux is not None:
            records = self.moe_aux.pop()
            if records:
                aux_loss = MoEAuxCollector.sum_aux_losses(records)
                result["expert_counts"] = torch.stack([r.counts for r in records])
        result["aux_loss"] = aux_loss
        result["loss"] = task_loss + self.aux_loss_coef * aux_loss
        return result
