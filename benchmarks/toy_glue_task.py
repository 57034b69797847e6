"""The built-in multi-task data as a tiny text classifier, for ``benchmarks/specialisation.py --task multitask``.

Data: the project's own ``toy_glue`` tasks (:mod:`mpomoe_ds.data.builtin.toy_glue`),
``toy_sentiment`` (2 classes) and ``toy_topic`` (4 classes), their train and
validation splits as generated. ``toy_paraphrase`` is left out: it needs the two
sentences compared with each other, which a mean-pooled one-layer model cannot
do (it would sit at chance and only add noise to the loss).

Model (CPU-sized, no download): words (lower-cased ``\\w+``, vocabulary of the
training splits) -> token embedding + an embedding of the previous word (a
width-2 convolution, so that "not great" differs from "great") -> h; then one
pre-LN FFN block ``h + ffn(LN(h))`` where the FFN is the layer under test
(a dense FFN, or an ``MPOEMoE`` upcycled from it); mean over the sentence's
words; one linear head per task. The FFN block's inputs ``LN(h)`` are what the
router sees and what the expert-similarity metrics run the experts on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from mpomoe_ds.data.builtin.toy_glue import NUM_LABELS, generate
from mpomoe_ds.omoe.diversity import (
    dense_expert_outputs,
    expert_similarity,
    expert_specific_energy,
    router_entropy,
    task_expert_mutual_information,
)

TASKS = ("toy_sentiment", "toy_topic")
PAD = 0


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


@dataclass
class Split:
    """One task split as padded word ids (N, T), its mask and labels."""

    tokens: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor

    def rows(self, index: torch.Tensor) -> "Split":
        return Split(self.tokens[index], self.mask[index], self.labels[index])


class ToyGlue:
    """Both tasks' splits with one shared vocabulary (id 0 is padding and unknown words)."""

    def __init__(self) -> None:
        texts = {(t, s): generate(t, s) for t in TASKS for s in ("train", "validation")}
        vocab = sorted({w for t in TASKS for row in texts[t, "train"] for w in words(row["sentence"])})
        self.vocab = {w: i + 1 for i, w in enumerate(vocab)}
        self.num_labels = [NUM_LABELS[t] for t in TASKS]
        self.train = [self._encode(texts[t, "train"]) for t in TASKS]
        self.validation = [self._encode(texts[t, "validation"]) for t in TASKS]

    def _encode(self, rows: list[dict]) -> Split:
        ids = [[self.vocab.get(w, PAD) for w in words(r["sentence"])] for r in rows]
        longest = max(len(i) for i in ids)
        tokens = torch.full((len(ids), longest), PAD, dtype=torch.long)
        for n, row in enumerate(ids):
            tokens[n, :len(row)] = torch.tensor(row)
        mask = torch.arange(longest).unsqueeze(0) < torch.tensor([len(i) for i in ids]).unsqueeze(1)
        return Split(tokens, mask, torch.tensor([r["label"] for r in rows]))

    def batch(self, per_task: int, gen: torch.Generator) -> list[Split]:
        """``per_task`` random training rows of every task (one generator: every arm sees the same stream)."""
        return [split.rows(torch.randint(0, len(split.labels), (per_task,), generator=gen)) for split in self.train]


class TextClassifier(nn.Module):
    """Embeddings -> ``h + ffn(LN(h))`` -> mean over words -> the task's head (see the module docstring).

    ``ffn`` maps (N, D) tokens to (N, D); an ``MPOEMoE`` (which returns
    ``(y, aux_loss, counts)``) or any module returning the tensor.
    """

    def __init__(self, vocab_size: int, hidden: int, num_labels: list[int], ffn: nn.Module,
                 seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab_size + 1, hidden, padding_idx=PAD)
        self.previous = nn.Embedding(vocab_size + 1, hidden, padding_idx=PAD)
        self.norm = nn.LayerNorm(hidden)
        self.heads = nn.ModuleList(nn.Linear(hidden, n) for n in num_labels)
        self.ffn = ffn

    def ffn_inputs(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        """(h (B, T, D), LN(h) at the real words (N, D))."""
        previous = torch.cat([torch.full_like(split.tokens[:, :1], PAD), split.tokens[:, :-1]], 1)
        h = self.embed(split.tokens) + self.previous(previous)
        return h, self.norm(h[split.mask])

    def forward(self, split: Split, task: int) -> torch.Tensor:
        h, x_ND = self.ffn_inputs(split)
        y = self.ffn(x_ND)
        y_ND = y[0] if isinstance(y, tuple) else y
        h = h.masked_scatter(split.mask.unsqueeze(-1), (h[split.mask] + y_ND).to(h.dtype))
        mask = split.mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1)
        return self.heads[task](pooled)

    def loss(self, splits: list[Split]) -> torch.Tensor:
        """Mean over tasks of each task's cross-entropy."""
        return sum(nn.functional.cross_entropy(self(s, t), s.labels) for t, s in enumerate(splits)) / len(splits)

    def copy_surroundings(self, other: "TextClassifier") -> None:
        """Take ``other``'s embeddings, norm and heads (everything but the FFN): the upcycled model's start."""
        for name in ("embed", "previous", "norm", "heads"):
            getattr(self, name).load_state_dict(getattr(other, name).state_dict())


@torch.no_grad()
def evaluate(model: TextClassifier, data: ToyGlue, layer: Optional[nn.Module]) -> dict[str, float]:
    """Validation cross-entropy and accuracy (means over tasks, and per task); with an MoE ``layer`` also
    the expert-similarity metrics on up to 512 validation tokens per task and the task-expert mutual
    information of the router's top-1 choices on all validation tokens (eval mode, no noise)."""
    model.eval()
    out: dict[str, float] = {}
    losses, accuracies, tokens, routes, probs = [], [], [], [], []
    for t, split in enumerate(data.validation):
        logits = model(split, t)
        losses.append(float(nn.functional.cross_entropy(logits, split.labels)))
        accuracies.append(float((logits.argmax(-1) == split.labels).float().mean()))
        out[f"accuracy_{TASKS[t]}"] = accuracies[-1]
        if layer is not None:
            _, x_ND = model.ffn_inputs(split)
            tokens.append(x_ND[:512])
            routing = layer.deepspeed_moe.gate(x_ND)
            probs.append(routing.probs_TE)
            routes.append(torch.bincount(routing.experts_TK.reshape(-1), minlength=layer.num_experts))
    out["loss"] = sum(losses) / len(losses)
    out["accuracy"] = sum(accuracies) / len(accuracies)
    if layer is None:
        out.update(cosine=1.0, cka=1.0, specific_energy=0.0, mutual_information=0.0, router_entropy=0.0)
        return out
    outputs = dense_expert_outputs(layer, torch.cat(tokens))
    sim = expert_similarity(outputs)
    out.update(cosine=sim.cosine, cka=sim.cka, specific_energy=expert_specific_energy(outputs),
               mutual_information=task_expert_mutual_information(torch.stack(routes)),
               router_entropy=router_entropy(torch.cat(probs)))
    return out
