"""Evaluation during training: per-task metrics over all ranks, expert-similarity and specialisation metrics.

Every validation example is evaluated exactly once across ranks
(:mod:`mpomoe_ds.data.eval`); metrics and the eval loss are computed from the
gathered predictions of real rows (padding rows dropped), identically on
every rank and independent of the world size.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from mpomoe_ds.data.eval import eval_batches, gather_eval
from mpomoe_ds.data.tasks import compute_metrics, lm_metrics
from mpomoe_ds.data.tokenize import TaskData, make_batch
from mpomoe_ds.moe.layer import moe_layers
from mpomoe_ds.omoe.diversity import (
    dense_expert_outputs,
    expert_similarity,
    expert_specific_energy,
    router_entropy,
    task_expert_mutual_information,
)
from mpomoe_ds.training.run_config import RunConfig


@torch.no_grad()
def evaluate(engine: Any, tasks: Sequence[TaskData], config: RunConfig, rank: int,
             world: int) -> dict[str, dict[str, float]]:
    """Per-task metrics on every validation example (gathered across ranks)."""
    model = engine.module
    model.eval()
    micro = engine.train_micro_batch_size_per_gpu()
    # An encoder-decoder's logits are aligned with its labels (decoder targets); a decoder's predict the next token.
    seq2seq = bool(getattr(getattr(getattr(model, "backbone", None), "config", None), "is_encoder_decoder", False))
    results = {}
    for task in tasks:
        if task.validation is None:
            continue
        preds, labels, indices, masks = [], [], [], []
        for b, batch in enumerate(eval_batches(task, micro, rank=rank, world_size=world)):
            if config.train.max_eval_batches is not None and b >= config.train.max_eval_batches:
                break
            mask, index = batch.pop("eval_mask"), batch.pop("example_index")
            out = model(**{k: v.to(engine.device) for k, v in batch.items()})
            masks.append(mask)
            indices.append(index)
            labels.append(batch["labels"])
            preds.append(_eval_predictions(task.spec.kind, out, batch, seq2seq))
        # With max_eval_batches the evaluated set is the first (batches x global batch) examples.
        covered = min(len(task.validation), len(masks) * micro * world)
        predictions, gold = gather_eval(torch.cat(indices), torch.cat(preds), torch.cat(labels), torch.cat(masks),
                                        num_examples=covered)
        results[task.spec.name] = _task_metrics(task, predictions, gold)
    model.train()
    return results


def _eval_predictions(kind: str, out: dict, batch: dict, seq2seq: bool = False) -> torch.Tensor:
    logits = out["logits"].float().cpu()
    if kind == "lm":  # per-row summed token NLL, for perplexity
        shift_logits, shift_labels = (logits, batch["labels"]) if seq2seq else (logits[:, :-1], batch["labels"][:, 1:])
        nll = torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2), shift_labels, reduction="none",
                                                ignore_index=-100)
        return torch.stack([nll.sum(1), (shift_labels != -100).sum(1).float()], dim=1)
    return logits


def _task_metrics(task: TaskData, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics and loss over the gathered eval set (real rows of every rank, the same on every rank)."""
    if task.spec.kind == "lm":
        metrics = lm_metrics(float(predictions[:, 0].sum()), int(predictions[:, 1].sum()))
    else:
        metrics = compute_metrics(task.spec, predictions, labels)
    metrics["loss"] = eval_loss(task.spec.kind, predictions, labels)
    return metrics


def eval_loss(kind: str, predictions: np.ndarray, labels: np.ndarray) -> float:
    """The task loss over real rows only, as the model defines it, so it does not depend on the world size.

    lm: summed token NLL / tokens (``predictions`` holds both per row); regression:
    mean squared error; classification: mean cross-entropy of the logits.
    """
    if kind == "lm":
        return float(predictions[:, 0].sum() / max(predictions[:, 1].sum(), 1.0))
    preds, gold = torch.as_tensor(predictions).float(), torch.as_tensor(labels)
    if kind == "regression":
        return float(torch.nn.functional.mse_loss(preds.reshape(-1), gold.float().reshape(-1)))
    return float(torch.nn.functional.cross_entropy(preds, gold.long()))


def diversity_metrics(model: torch.nn.Module, tasks: Sequence[TaskData], config: RunConfig,
                      device: torch.device) -> dict[str, float]:
    """Per MoE layer: expert similarity and specialisation (train.diversity_tokens > 0).

    ``diversity/layer{i}/cosine`` / ``cka`` / ``specific_energy``: all experts
    on the same tokens (:mod:`mpomoe_ds.omoe.diversity`); ``routing/layer{i}/entropy``
    and (two or more tasks) ``routing/layer{i}/task_expert_mi``: the router on
    every task's own tokens (:func:`routing_metrics`).
    """
    if config.train.diversity_tokens <= 0:
        return {}
    inputs = _moe_layer_inputs(model, tasks, config, device)
    out = {}
    for index, (_, layer) in enumerate(moe_layers(model)):
        if index in inputs:
            outputs_END = dense_expert_outputs(layer, inputs[index])
            sim = expert_similarity(outputs_END)
            out[f"diversity/layer{index}/cosine"] = float(sim.cosine)
            out[f"diversity/layer{index}/cka"] = float(sim.cka)
            out[f"diversity/layer{index}/specific_energy"] = expert_specific_energy(outputs_END)
    out.update(routing_metrics(model, tasks, config, device))
    return out


@torch.no_grad()
def routing_metrics(model: torch.nn.Module, tasks: Sequence[TaskData], config: RunConfig,
                    device: torch.device) -> dict[str, float]:
    """Router entropy and the task-expert mutual information per MoE layer, on each task's validation tokens.

    Each task with a validation split contributes its first
    ``diversity_tokens // max_seq_len`` rows (the same rows on every rank, so
    every rank computes the same numbers, no collective); only the tokens the
    attention mask keeps count. The router runs in eval mode (no noise).
    """
    layers = [layer for _, layer in moe_layers(model)]
    if not layers:
        return {}
    probs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    routes: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    for task in tasks:
        if task.validation is None or not len(task.validation):
            continue
        batch = _validation_rows(task, config)
        for index, x_ND in _moe_layer_inputs_of(model, batch, device).items():
            routing = layers[index].deepspeed_moe.gate(x_ND)
            probs[index].append(routing.probs_TE)
            routes[index].append(torch.bincount(routing.experts_TK.reshape(-1), minlength=layers[index].num_experts))
    out = {}
    for index in range(len(layers)):
        if probs[index]:
            out[f"routing/layer{index}/entropy"] = router_entropy(torch.cat(probs[index]))
        if len(routes[index]) >= 2:
            out[f"routing/layer{index}/task_expert_mi"] = task_expert_mutual_information(torch.stack(routes[index]))
    return out


def _validation_rows(task: TaskData, config: RunConfig) -> dict[str, torch.Tensor]:
    rows = max(1, config.train.diversity_tokens // config.data.max_seq_len)
    return make_batch(task, task.validation, np.arange(min(rows, len(task.validation))))


def _moe_layer_inputs_of(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                         device: torch.device) -> dict[int, torch.Tensor]:
    """The hidden states entering each MoE layer on ``batch``, at the positions its attention mask keeps."""
    mask = batch["attention_mask"].reshape(-1).bool()
    return _capture_moe_inputs(model, batch, device,
                               lambda x_ND: x_ND[mask.to(x_ND.device)] if x_ND.shape[0] == mask.numel() else x_ND)


@torch.no_grad()
def _moe_layer_inputs(model: torch.nn.Module, tasks: Sequence[TaskData], config: RunConfig,
                      device: torch.device) -> dict[int, torch.Tensor]:
    """The hidden states entering each MoE layer on a fixed validation batch."""
    task = next((t for t in tasks if t.validation is not None), None)
    if task is None:
        return {}
    return _capture_moe_inputs(model, _validation_rows(task, config), device,
                               lambda x_ND: x_ND[: config.train.diversity_tokens])


def _capture_moe_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
                        select: Callable[[torch.Tensor], torch.Tensor]) -> dict[int, torch.Tensor]:
    """``select`` of the (N, D) hidden states entering each MoE layer in one eval-mode forward of ``batch``."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for index, (_, layer) in enumerate(moe_layers(model)):
        def capture(module, inputs, output, index=index):
            captured[index] = select(inputs[0].reshape(-1, inputs[0].shape[-1]))
        handles.append(layer.register_forward_hook(capture))
    model.eval()
    try:
        model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        for h in handles:
            h.remove()
        model.train()
    return captured
