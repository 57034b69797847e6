"""The whole run's configuration: one typed tree loaded from a file plus overrides.

Sections (each a dataclass that validates itself in ``__post_init__``, with
errors naming ``section.field`` and the fix), each defined next to the code it
configures:

    model  ModelConfig   (models/config.py)    the pretrained backbone
    moe    MoEConfig     (moe/config.py)       experts, routing, gradient mask
    mpo    MPOConfig     (mpo/config.py)       factorisation and truncation
    omoe   OMoEConfig    (omoe/config.py)      the orthogonal expert optimizer
    data   DataConfig    (data/config.py)      tasks, files, sequence length, sampling
    optim  OptimConfig   (training/config.py)  AdamW + schedule (unless the ds_config has its own)
    train  TrainConfig   (training/config.py)  steps, logging, eval, checkpoints, output

Every section's own defaults are the run's defaults (there is no second set):
the embedded default run is all-MiniLM-L6-v2 upcycled to MPOE MoE (4 experts
in every other layer, expert-parallel over all processes) on the built-in
``toy_glue`` multi-task data. DeepSpeed settings (ZeRO stage, precision, batch
sizes, clipping) stay in the ds_config JSON. Importing this module needs
neither torch nor DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from mpomoe_ds.config import apply_overrides, fail, from_dict, load_mapping, to_dict
from mpomoe_ds.data.config import DataConfig
from mpomoe_ds.models.config import ModelConfig
from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.mpo.config import MPOConfig
from mpomoe_ds.omoe.config import OMoEConfig
from mpomoe_ds.training.config import OptimConfig, TrainConfig


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mpo: MPOConfig = field(default_factory=MPOConfig)
    omoe: OMoEConfig = field(default_factory=OMoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        """Checks that span sections (each section validated itself already)."""
        if not self.moe.enabled and self.omoe.enabled:
            fail("omoe", "enabled", True, "moe.enabled is false (the dense model has no experts); "
                  "set omoe.enabled: false or moe.enabled: true")
        optim, moe = self.optim, self.moe
        if not moe.enabled and (optim.central_lr_mult, optim.aux_lr_mult) != (1.0, 1.0):
            fail("optim", "central_lr_mult", (optim.central_lr_mult, optim.aux_lr_mult),
                  "moe.enabled is false, so there are no central or expert parameters to scale; leave both "
                  "multipliers at 1")
        if moe.expert_type != "mpo" and optim.central_lr_mult != 1.0:
            fail("optim", "central_lr_mult", optim.central_lr_mult,
                  "plain experts (moe.expert_type 'ffn') have no central tensor; leave it at 1")


def load_run_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults <- file <- overrides, then validation of every section.

    A section given in the file replaces only the keys it names; the other
    keys keep the defaults.
    """
    data = to_dict(RunConfig())
    data["data"]["tasks"] = []  # the defaults' builtin tasks are spelled out again from data.builtin if still empty
    if path is not None:
        for section, values in load_mapping(path).items():
            if isinstance(values, dict) and isinstance(data.get(section), dict):
                data[section].update(values)
            else:
                data[section] = values
    data = apply_overrides(data, overrides)
    return from_dict(RunConfig, data)
