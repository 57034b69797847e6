"""Checks that run before any data or model work: each failure names the key or file and the fix.

Owns: the ds_config against native MoE (ZeRO-3), the output folder being
writable, every local file the run reads, ``data.max_seq_len`` against the
model's position embeddings (read from its config.json only), and on
``--resume`` the current run config against the one the checkpoint was
trained with.

Resume rules: ``model``, ``moe`` and ``mpo`` keys define the architecture and
the checkpoint's tensors, ``optim`` keys the optimizer and schedule state the
checkpoint restores (a new value would be silently overridden by it), ``omoe``
and ``data`` the projector state and the data plan; a change in any of them is
refused, naming each key with its old and new value. ``train`` keys
(max_steps, logging, eval, checkpoints) may change and apply.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from mpomoe_ds.config import ConfigError
from mpomoe_ds.training.engine import check_zero_for_moe
from mpomoe_ds.training.run_config import RunConfig

FROZEN_ON_RESUME = ("model", "moe", "mpo", "optim", "omoe", "data")
POSITION_FIELDS = ("max_position_embeddings", "n_positions")


def check_before_build(config: RunConfig, ds_config: dict[str, Any]) -> None:
    """Everything that can be checked from the configs and the file system alone."""
    check_zero_for_moe(ds_config)
    check_output_dir(Path(config.train.output_dir))
    check_data_files(config)
    check_positions(config)
    check_dispatch(config)


def check_dispatch(config: RunConfig) -> None:
    """``moe.dispatch`` aux_gather / auto cannot run the orthogonal expert optimizer (see moe.aux_gather)."""
    if config.omoe.enabled and config.moe.dispatch != "tokens":
        raise ConfigError(f"moe.dispatch={config.moe.dispatch!r} with omoe.enabled: the orthogonal expert optimizer "
                          f"projects each expert's gradient from the inputs its owner saw, which aux_gather never "
                          f"sends to the owner; set moe.dispatch: tokens or omoe.enabled: false")


def check_output_dir(output_dir: Path) -> None:
    """The output folder exists or can be created, and a file can be written in it."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as err:
        raise ConfigError(f"train.output_dir={str(output_dir)!r} is not writable ({err.strerror}); "
                          f"pass --output_dir with a folder you can write to") from err


def check_data_files(config: RunConfig) -> None:
    """Every local data file named in the data section exists."""
    for index, task in enumerate(config.data.tasks):
        for name in ("train_file", "validation_file"):
            path = getattr(task, name, None)
            if path is not None and not Path(path).expanduser().is_file():
                raise ConfigError(f"data.tasks[{index}].{name}={path!r}: no such file; fix the path "
                                  f"(relative paths are taken from {os.getcwd()})")


def model_positions(config: RunConfig) -> Optional[int]:
    """The model's number of position embeddings, from its config alone (None if it has no such limit)."""
    from mpomoe_ds.models.hf import load_config

    try:
        model_config = load_config(config.model.name_or_path, random_init=config.model.random_init,
                                   config_overrides=config.model.config_overrides)
    except FileNotFoundError as err:
        raise ConfigError(f"model.name_or_path={config.model.name_or_path!r}: no such folder; pass a folder with "
                          f"config.json and the weights, a hub name, or 'minilm'") from err
    except OSError as err:
        raise ConfigError(f"model.name_or_path={config.model.name_or_path!r}: cannot read its config.json "
                          f"({str(err).strip().splitlines()[0]}); pass a folder with config.json and the weights, "
                          f"a hub name in the cache (HF_HUB_OFFLINE) or reachable, or 'minilm'") from err
    return next((int(getattr(model_config, f)) for f in POSITION_FIELDS if getattr(model_config, f, None)), None)


def check_positions(config: RunConfig) -> None:
    positions = model_positions(config)
    if positions is not None and config.data.max_seq_len > positions:
        raise ConfigError(f"data.max_seq_len={config.data.max_seq_len}: the model {config.model.name_or_path!r} "
                          f"has {positions} position embeddings; use data.max_seq_len <= {positions}")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'moe': {'k': 1}} -> {'moe.k': 1} (lists stay values)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def check_resume_config(saved: dict[str, Any], current: dict[str, Any], checkpoint: str) -> None:
    """Refuse a resume whose architecture, optimizer, OMoE or data keys differ from the checkpoint's."""
    old = {k: v for k, v in flatten(saved).items() if k.split(".")[0] in FROZEN_ON_RESUME}
    new = {k: v for k, v in flatten(current).items() if k.split(".")[0] in FROZEN_ON_RESUME}
    diffs = [f"{key}: checkpoint {old.get(key)!r}, now {new.get(key)!r}"
             for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]
    if diffs:
        raise ConfigError(f"--resume from {checkpoint}: these keys differ from the run config the checkpoint was "
                          f"trained with:\n  " + "\n  ".join(diffs) + "\nThey fix the checkpoint's tensors, optimizer/"
                          "schedule state or data plan and cannot change on resume: drop these overrides, or start "
                          "a new run in another train.output_dir")
