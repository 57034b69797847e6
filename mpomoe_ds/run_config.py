"""The whole run's configuration: one typed tree loaded from a file plus overrides.

Sections (each a dataclass that validates itself in ``__post_init__``, with
errors naming ``section.field`` and the fix):

    model  ModelConfig   (config.py)   the pretrained backbone
    moe    MoEConfig     (config.py)   experts, routing, gradient mask
    mpo    MPOConfig     (config.py)   factorisation and truncation
    omoe   OMoEConfig    (omoe.py)     the orthogonal expert optimizer
    data   DataConfig    (data.py)     tasks, files, sequence length, sampling
    optim  OptimConfig   (config.py)   AdamW + schedule (unless the ds_config has its own)
    train  TrainConfig   (config.py)   steps, logging, eval, checkpoints, output

The defaults are the embedded default run: all-MiniLM-L6-v2 upcycled to MPOE
MoE (4 experts in every other layer, expert-parallel over all processes) on
the built-in ``toy_glue`` multi-task data. DeepSpeed settings (ZeRO stage,
precision, batch sizes, clipping) stay in the ds_config JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from .config import (ModelConfig, MoEConfig, MPOConfig, OptimConfig, TrainConfig, apply_overrides, from_dict,
                     load_mapping)
from .data import DataConfig
from .omoe import OMoEConfig


def _default_moe() -> MoEConfig:
    # ep_size 0: as many expert-parallel ranks as processes (up to num_experts), resolved at start-up.
    return MoEConfig(num_experts=4, ep_size=0, k=1, layers="every_other", expert_init="perturb", init_noise=0.01)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=_default_moe)
    mpo: MPOConfig = field(default_factory=MPOConfig)
    omoe: OMoEConfig = field(default_factory=OMoEConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(builtin="toy_glue", max_seq_len=32))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=20))
    train: TrainConfig = field(default_factory=TrainConfig)


def _defaults_as_dict() -> dict:
    from .config import to_dict

    return to_dict(RunConfig())


def load_run_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults <- file <- overrides, then validation of every section.

    A section given in the file replaces only the keys it names; the other
    keys keep the embedded defaults.
    """
    data = _defaults_as_dict()
    if path is not None:
        for section, values in load_mapping(path).items():
            if isinstance(values, dict) and isinstance(data.get(section), dict):
                data[section].update(values)
            else:
                data[section] = values
    data = apply_overrides(data, overrides)
    return from_dict(RunConfig, data)
