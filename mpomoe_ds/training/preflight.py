"""Checks that run before any data or model work: each failure names the key or file and the fix.

Owns: the ds_config against native MoE (ZeRO-3), the output folder being
writable, every local file the run reads, ``data.max_seq_len`` against the
model's position embeddings, ``data.document_masking`` and
``model.objective`` against the model family and the tasks (read from its
config.json and the task registry only), and on
``--resume`` the current run config against the one the checkpoint was
trained with, and the global batch against the one the checkpoint's task stream
was planned for.

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

from mpomoe_ds.config import ConfigError, to_dict
from mpomoe_ds.training.engine import check_zero_for_moe
from mpomoe_ds.training.run_config import RunConfig

FROZEN_ON_RESUME = ("model", "moe", "mpo", "optim", "omoe", "data")
LAYOUT_KEYS = ("moe.ep_size",)  # where tensors live, not what they are: a resume may change it (resharding)
POSITION_FIELDS = ("max_position_embeddings", "n_positions")
# Encoders whose position ids start after the padding index (RoBERTa's create_position_ids_from_input_ids):
# roberta-base's 514 position embeddings hold 512 tokens.
PADDING_OFFSET_POSITION_TYPES = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm",
                                 "data2vec-text")


def check_before_build(config: RunConfig, ds_config: dict[str, Any]) -> None:
    """Everything that can be checked from the configs and the file system alone."""
    check_zero_for_moe(ds_config)
    check_output_dir(Path(config.train.output_dir))
    check_data_files(config)
    model_config = read_model_config(config)
    check_positions(config, model_config)
    check_document_masking(config, model_config)
    check_objective(config, model_config)
    check_corpus_objective(config, model_config)
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
    """Every local data file and prepared corpus named in the data section exists."""
    for index, task in enumerate(config.data.tasks):
        for name in ("train_file", "validation_file"):
            path = getattr(task, name, None)
            if path is not None and not Path(path).expanduser().is_file():
                raise ConfigError(f"data.tasks[{index}].{name}={path!r}: no such file; fix the path "
                                  f"(relative paths are taken from {os.getcwd()})")
    for index, corpus in enumerate(config.data.corpora):
        if not (Path(corpus.path).expanduser() / "index.json").is_file():
            raise ConfigError(f"data.corpora[{index}].path={corpus.path!r}: no prepared corpus there (no index.json); "
                              f"prepare it with mpomoe-prepare SOURCES --out {corpus.path}, or fix the path")


def read_model_config(config: RunConfig) -> Any:
    """The model's transformers config (config.json and overrides only; no weights are read)."""
    from mpomoe_ds.models.hf import load_config

    try:
        return load_config(config.model.name_or_path, random_init=config.model.random_init,
                                   config_overrides=config.model.config_overrides)
    except FileNotFoundError as err:
        raise ConfigError(f"model.name_or_path={config.model.name_or_path!r}: no such folder; pass a folder with "
                          f"config.json and the weights, a hub name, or 'minilm'") from err
    except OSError as err:
        raise ConfigError(f"model.name_or_path={config.model.name_or_path!r}: cannot read its config.json "
                          f"({str(err).strip().splitlines()[0]}); pass a folder with config.json and the weights, "
                          f"a hub name in the cache (HF_HUB_OFFLINE) or reachable, or 'minilm'") from err


def model_positions(model_config: Any) -> Optional[int]:
    """How many token positions the model can embed (None if it has no such limit)."""
    table = next((int(getattr(model_config, f)) for f in POSITION_FIELDS if getattr(model_config, f, None)), None)
    if table is not None and getattr(model_config, "model_type", None) in PADDING_OFFSET_POSITION_TYPES:
        return table - (int(getattr(model_config, "pad_token_id", None) or 0) + 1)
    return table


def check_positions(config: RunConfig, model_config: Any) -> None:
    positions = model_positions(model_config)
    if positions is not None and config.data.max_seq_len > positions:
        raise ConfigError(f"data.max_seq_len={config.data.max_seq_len}: the model {config.model.name_or_path!r} "
                          f"embeds at most {positions} positions; use data.max_seq_len <= {positions}")


def check_document_masking(config: RunConfig, model_config: Any) -> None:
    """``data.document_masking`` needs a decoder whose attention builds its mask from position ids."""
    from mpomoe_ds.models.families import PACKED_DOCUMENT_MODEL_TYPES

    model_type = getattr(model_config, "model_type", None)
    if config.data.document_masking and model_type not in PACKED_DOCUMENT_MODEL_TYPES:
        raise ConfigError(f"data.document_masking=true: the model {config.model.name_or_path!r} ({model_type}) "
                          f"cannot keep attention inside documents; it works with "
                          f"{sorted(PACKED_DOCUMENT_MODEL_TYPES)}; set data.document_masking=false")


def check_objective(config: RunConfig, model_config: Any) -> None:
    """``model.objective: text_to_text`` needs an encoder-decoder and classification tasks with label words."""
    from mpomoe_ds.data.config import resolve_task

    if config.model.objective != "text_to_text":
        return
    if not getattr(model_config, "is_encoder_decoder", False):
        raise ConfigError(f"model.objective=text_to_text: {config.model.name_or_path!r} "
                          f"({getattr(model_config, 'model_type', None)}) has no decoder to write label words; use "
                          f"an encoder-decoder model (T5) or model.objective=heads")
    for index, entry in enumerate(config.data.tasks):
        spec = resolve_task(entry)
        if spec.kind != "classification" or not spec.label_names:
            raise ConfigError(f"data.tasks[{index}] ({spec.name}, {spec.kind}): text_to_text trains classification "
                              f"tasks with label_names (the words the decoder writes); give the task label_names, "
                              f"or use model.objective=heads")


def check_corpus_objective(config: RunConfig, model_config: Any) -> None:
    """Pretraining corpora: decoders pack for causal LM, encoder-decoders need ``data.span_corruption``."""
    if not config.data.corpora:
        return
    seq2seq = bool(getattr(model_config, "is_encoder_decoder", False))
    model = f"{config.model.name_or_path!r} ({getattr(model_config, 'model_type', None)})"
    if seq2seq and config.data.tasks:
        raise ConfigError(f"data.corpora with data.tasks and the encoder-decoder {model}: corpora are mixed with "
                          f"tasks only as causal-LM packing for decoder models (gpt2, llama, ...); pretrain T5 with "
                          f"span corruption in one run (data.tasks: []) and train the tasks in another")
    if seq2seq and config.data.span_corruption is None:
        raise ConfigError(f"data.corpora with the encoder-decoder {model}: pretrain it with T5 span corruption, "
                          f"data.span_corruption: {{}} (noise_density 0.15, mean_noise_span_length 3)")
    if not seq2seq and config.data.span_corruption is not None:
        raise ConfigError(f"data.span_corruption: {model} has no decoder for the targets; remove "
                          f"data.span_corruption (decoders pretrain as causal LMs) or use a T5 model")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'moe': {'k': 1}} -> {'moe.k': 1} (lists stay values)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def check_resume_config(saved: dict[str, Any], current: dict[str, Any], checkpoint: str) -> None:
    """Refuse a resume whose architecture, optimizer, OMoE or data keys differ (``moe.ep_size`` may change)."""
    old = {k: v for k, v in flatten(saved).items() if k.split(".")[0] in FROZEN_ON_RESUME and k not in LAYOUT_KEYS}
    new = {k: v for k, v in flatten(current).items() if k.split(".")[0] in FROZEN_ON_RESUME and k not in LAYOUT_KEYS}
    # A key added after the checkpoint was written is absent from its config: at its default it changes nothing.
    defaults = flatten(to_dict(RunConfig()))
    diffs = [f"{key}: checkpoint {old.get(key)!r}, now {new.get(key)!r}"
             for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)
             and not (key not in old and new.get(key) == defaults.get(key))]
    if diffs:
        raise ConfigError(f"--resume from {checkpoint}: these keys differ from the run config the checkpoint was "
                          f"trained with:\n  " + "\n  ".join(diffs) + "\nThey fix the checkpoint's tensors, optimizer/"
                          "schedule state or data plan and cannot change on resume: drop these overrides, or start "
                          "a new run in another train.output_dir")


def saved_global_batch(data_plan: dict[str, Any]) -> Optional[int]:
    """The global batch a checkpoint's data stream needs to continue exactly (None: any).

    The multi-task stream draws a task per step and takes that task's next G
    rows, so only the same G = micro-batch x ranks continues it; a packed
    corpus mixture is keyed by global sample and continues at any G.
    """
    if data_plan.get("kind") == "packed_mixture":
        return None
    fingerprint = data_plan.get("fingerprint")
    return int(fingerprint[1]) if isinstance(fingerprint, list) and len(fingerprint) == 5 else None


def check_resume_global_batch(data_plan: dict[str, Any], micro_batch: int, world_size: int, checkpoint: str) -> None:
    """Refuse, before any data or model work, a resume whose task stream would not continue."""
    saved = saved_global_batch(data_plan)
    if saved is None or saved == micro_batch * world_size:
        return
    fix = (f"set train_micro_batch_size_per_gpu to {saved // world_size}" if saved % world_size == 0
           else f"launch a number of ranks that divides {saved}")
    raise ConfigError(f"--resume from {checkpoint}: the checkpoint's task stream was planned for a global batch of "
                      f"{saved} (micro-batch x ranks); now it is {micro_batch} x {world_size} = "
                      f"{micro_batch * world_size}, which would skip or repeat examples: {fix}")
