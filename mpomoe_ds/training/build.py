"""Building a run, once: the tokenizer, the converted multi-task model, the DeepSpeed engine.

Owns the order in which a run comes together (tokenizer first, so data errors
come before any model work; model; engine with its optimizer and schedule)
and the embedded default ds_config. Nothing here trains.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from mpomoe_ds import parallel
from mpomoe_ds.data.tokenize import TaskData, make_batch
from mpomoe_ds.models.convert import ConversionReport, convert_model, dense_report
from mpomoe_ds.models.hf import backbone_task, load_model, load_tokenizer
from mpomoe_ds.models.multitask import MultiTaskModel
from mpomoe_ds.training.engine import initialize, load_ds_config
from mpomoe_ds.training.run_config import RunConfig

# The embedded ds_config: ZeRO 0, fp32, torch's AdamW built by us (no op to compile).
DEFAULT_DS_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": 16,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 0},
    "steps_per_print": 10**9,
    "wall_clock_breakdown": False,
}


def resolve_ds_config(path: Optional[Union[str, Path]]) -> dict[str, Any]:
    """The ds_config at ``path``, or a copy of the embedded default."""
    return load_ds_config(path) if path else dict(DEFAULT_DS_CONFIG)


def run_tokenizer(config: RunConfig):
    """The tokenizer of the model section (cheap: loaded first so data errors come early)."""
    return load_tokenizer(config.model.tokenizer or config.model.name_or_path)


def build_model(config: RunConfig, tasks: Sequence[TaskData],
                ep_group: Optional[parallel.ProcessGroup]) -> tuple[MultiTaskModel, ConversionReport]:
    """The converted backbone inside a multi-task model, and the conversion report.

    ``moe.enabled: false`` leaves the backbone dense (the baseline through the
    same loop). Otherwise the report also says how far conversion moved the
    backbone's output on a probe batch (:func:`probe_batch`).
    """
    text_to_text = config.model.objective == "text_to_text"
    needs_lm_head = any(t.spec.kind == "lm" for t in tasks)
    if config.model.random_init:
        torch.manual_seed(config.train.seed)
    head = backbone_task(config.model.objective, needs_lm_head, config.data.span_corruption is not None)
    backbone = load_model(config.model.name_or_path, head,
                          weights=not config.model.random_init, config_overrides=config.model.config_overrides)
    if head == "seq2seq-lm" and getattr(backbone.config, "decoder_start_token_id", None) is None:
        # T5's convention (its pretrained configs say so); a config built from the model type's defaults lacks it.
        backbone.config.decoder_start_token_id = backbone.config.pad_token_id
    if config.moe.enabled:
        report = convert_model(backbone, config.moe, config.mpo, ep_group=ep_group, probe=probe_batch(tasks))
    else:
        report = dense_report(backbone, config.moe)
    if config.train.activation_checkpointing:
        # Non-reentrant: the first forward keeps its autograd graph (the balance loss needs it).
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(config.train.seed)  # task heads: identical on every rank
    model = MultiTaskModel(backbone, [t.spec for t in tasks], moe_aux=backbone.moe_aux,
                           aux_loss_coef=config.moe.aux_loss_coef, pooling=config.model.pooling,
                           head_dropout=config.model.head_dropout,
                           label_targets={t.spec.name: torch.from_numpy(t.label_word_ids_CT) for t in tasks
                                          if text_to_text and t.label_word_ids_CT is not None})
    return model, report


def probe_batch(tasks: Sequence[TaskData], rows: int = 8) -> Optional[dict[str, torch.Tensor]]:
    """Backbone inputs of the first ``rows`` validation examples of the first task that has them (None: none has).

    The same rows on every rank, as the collective MoE forward needs.
    """
    task = next((t for t in tasks if t.validation is not None and len(t.validation)), None)
    if task is None:
        return None
    batch = make_batch(task, task.validation, np.arange(min(rows, len(task.validation))))
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def lr_lambda(config: RunConfig) -> Callable[[int], float]:
    """Warm-up then linear / cosine decay / constant, as a LambdaLR factor."""
    warmup, total, schedule = config.optim.warmup_steps, config.train.max_steps, config.optim.schedule

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_engine(model: torch.nn.Module, config: RunConfig, ds_config: dict[str, Any]) -> tuple[Any, Optional[float]]:
    """DeepSpeed engine; returns (engine, own_clip_norm or None).

    DeepSpeed's fp32 ZeRO-0 clip averages per-rank norms when experts differ
    per rank, so there the trainer clips with the true global norm
    (:func:`mpomoe_ds.training.engine.clip_grad_norm_`) and DeepSpeed's is off.
    """
    ds_config = dict(ds_config)
    zero_stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    half = any((ds_config.get(k) or {}).get("enabled") for k in ("fp16", "bf16"))
    clip = float(ds_config.get("gradient_clipping", 1.0))  # DeepSpeed's own default is 1.0
    own_clip = None
    if zero_stage == 0 and not half and clip > 0:
        ds_config["gradient_clipping"] = 0.0
        own_clip = clip
    scheduler = None
    if "scheduler" not in ds_config:
        factor = lr_lambda(config)
        scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor)  # noqa: E731  DeepSpeed calls it
    return initialize(model, ds_config, optim=config.optim, lr_scheduler=scheduler), own_clip
