"""Training entry point: ``python -m mpomoe_ds.train`` (console script ``mpomoe-train``).

Owns one run from command line to metrics: argument parsing (one CLI path:
argparse + ``deepspeed.add_config_arguments``, tolerant of the launcher's
``--local_rank``), distributed start-up (``deepspeed`` launcher, ``torchrun``,
``mpirun`` via mpi4py discovery, SLURM, or one plain process), building the
converted model and the DeepSpeed engine, the training loop, evaluation,
checkpoints and the final ``metrics.json``.

It runs unchanged under every launcher; with no arguments it trains the
embedded default (all-MiniLM-L6-v2 upcycled to MPOE-MoE on the built-in
multi-task data set; ``moe.ep_size: 0`` means as many expert-parallel ranks
as there are processes, up to the expert count).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint, parallel
from .config import to_dict
from .run_config import RunConfig, load_run_config
from .grad_mask import mix_seed
from .hf_models import resolve_model_name
from .monitor import Monitor, logger, setup_logging

# The embedded ds_config: ZeRO 0, fp32, torch's AdamW built by us (no op to compile).
DEFAULT_DS_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": 16,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 0},
    "steps_per_print": 10**9,
    "wall_clock_breakdown": False,
}


# --------------------------------------------------------------------------- start-up


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    import deepspeed

    parser = argparse.ArgumentParser(
        prog="mpomoe-train",
        description="Train an MPOE-MoE model with DeepSpeed. With no arguments: the embedded default run.",
        epilog="Overrides: section.key=value (values parse as YAML), e.g. moe.num_experts=8 train.max_steps=50")
    parser.add_argument("--config", help="run config file (YAML or JSON); default: the embedded default run")
    parser.add_argument("--output_dir", help="shortcut for train.output_dir=...")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--print_config", action="store_true", help="print the resolved run config and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    deepspeed.add_config_arguments(parser)
    return parser.parse_args(argv)


def init_distributed() -> tuple[int, int]:
    """Start torch.distributed under any launcher, or as a 1-process group."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    _ranks_from_mpi_env()
    launched = any(v in os.environ for v in ("RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"))
    if not launched:  # a plain `python -m mpomoe_ds.train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "gloo" if get_accelerator().device_name() == "cpu" else None
    # DeepSpeed's MPI discovery ignores MASTER_PORT unless it is passed explicitly.
    port = int(os.environ.get("MASTER_PORT", 29500))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True, verbose=False, distributed_port=port)
    return dist.get_rank(), dist.get_world_size()


def _ranks_from_mpi_env() -> None:
    """Under mpirun with MASTER_ADDR given, take ranks from OpenMPI/MPICH variables.

    DeepSpeed's mpi4py discovery would otherwise replace MASTER_ADDR with rank
    0's first ``hostname -I`` address, which can be the wrong network card.
    Without MASTER_ADDR, discovery through mpi4py does the job.
    """
    if "RANK" in os.environ or "MASTER_ADDR" not in os.environ:
        return
    for rank, size, local in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
                              ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID")):
        if rank in os.environ and size in os.environ:
            os.environ.update(RANK=os.environ[rank], WORLD_SIZE=os.environ[size],
                              LOCAL_RANK=os.environ.get(local, "0"))
            os.environ.setdefault("MASTER_PORT", "29500")
            return


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_ds_config(args: argparse.Namespace) -> dict[str, Any]:
    from .engine import load_ds_config

    path = args.deepspeed_config or (args.deepspeed if isinstance(args.deepspeed, str) else None)
    return load_ds_config(path) if path else dict(DEFAULT_DS_CONFIG)


def resolve_ep_size(config: RunConfig, world_size: int) -> RunConfig:
    """ep_size 0 = the largest divisor of the expert count that also divides the world size."""
    moe = config.moe
    if moe.ep_size != 0:
        return config
    ep = max(d for d in range(1, moe.num_experts + 1) if moe.num_experts % d == 0 and world_size % d == 0)
    return dataclasses.replace(config, moe=dataclasses.replace(moe, ep_size=ep))


# --------------------------------------------------------------------------- model


def load_tokenizer(config: RunConfig):
    """The tokenizer of the model section (cheap: loaded first so data errors come early)."""
    import transformers

    path = resolve_model_name(config.model.tokenizer or config.model.name_or_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=os.path.isdir(path))
    if tokenizer.pad_token is None:  # GPT-2 has none; padded positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_backbone(config: RunConfig, needs_lm_head: bool) -> torch.nn.Module:
    """The Hugging Face model: pretrained, or random from its (overridden) config."""
    import transformers

    cfg = config.model
    path = resolve_model_name(cfg.name_or_path)
    local = os.path.isdir(path)
    auto = transformers.AutoModelForCausalLM if needs_lm_head else transformers.AutoModel
    if not cfg.random_init:
        return auto.from_pretrained(path, local_files_only=local)
    hf_config = transformers.AutoConfig.from_pretrained(path, local_files_only=local, **cfg.config_overrides)
    torch.manual_seed(config.train.seed)
    return auto.from_config(hf_config)


def build_model(config: RunConfig, tasks, ep_group):
    """The converted backbone inside a multi-task model, and the conversion report."""
    from .convert import convert_model
    from .modeling import MultiTaskModel

    backbone = load_backbone(config, needs_lm_head=any(t.spec.kind == "lm" for t in tasks))
    report = convert_model(backbone, config.moe, config.mpo, ep_group=ep_group)
    torch.manual_seed(config.train.seed)  # task heads: identical on every rank
    model = MultiTaskModel(backbone, [t.spec for t in tasks], moe_aux=backbone.moe_aux,
                           aux_loss_coef=config.moe.aux_loss_coef, pooling=config.model.pooling,
                           head_dropout=config.model.head_dropout)
    return model, report


def lr_lambda(config: RunConfig):
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


def build_engine(model, config: RunConfig, ds_config: dict[str, Any]):
    """DeepSpeed engine; returns (engine, own_clip_norm or None)."""
    from .engine import initialize
    from .params import optimizer_param_groups

    ds_config = dict(ds_config)
    zero_stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    half = any((ds_config.get(k) or {}).get("enabled") for k in ("fp16", "bf16"))
    clip = float(ds_config.get("gradient_clipping", 1.0))  # DeepSpeed's own default is 1.0
    own_clip = None
    if zero_stage == 0 and not half and clip > 0:
        # DeepSpeed's fp32 ZeRO-0 clip averages per-rank norms when experts differ per rank;
        # we clip with the true global norm instead (engine.global_grad_norm).
        ds_config["gradient_clipping"] = 0.0
        own_clip = clip
    optimizer = scheduler = None
    if "optimizer" not in ds_config:
        o = config.optim
        optimizer = torch.optim.AdamW(optimizer_param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                                      eps=o.eps, weight_decay=o.weight_decay)
    if "scheduler" not in ds_config:
        factor = lr_lambda(config)
        scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor)  # noqa: E731  DeepSpeed calls it
    engine = initialize(model, ds_config, lr=config.optim.lr, weight_decay=config.optim.weight_decay,
                        optimizer=optimizer, lr_scheduler=scheduler)
    return engine, own_clip


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(engine, tasks, config: RunConfig, rank: int, world: int) -> dict[str, dict[str, float]]:
    """Per-task metrics on every validation example (gathered across ranks)."""
    from .data import eval_batches, gather_eval
    from .tasks import compute_metrics

    model = engine.module
    model.eval()
    micro = engine.train_micro_batch_size_per_gpu()
    results = {}
    for task in tasks:
        if task.validation is None:
            continue
        preds, labels, indices, masks, losses = [], [], [], [], []
        for b, batch in enumerate(eval_batches(task, micro, rank=rank, world_size=world)):
            if config.train.max_eval_batches is not None and b >= config.train.max_eval_batches:
                break
            mask, index = batch.pop("eval_mask"), batch.pop("example_index")
            out = model(**{k: v.to(engine.device) for k, v in batch.items()})
            losses.append(out["task_loss"].item())
            masks.append(mask)
            indices.append(index)
            labels.append(batch["labels"])
            preds.append(_eval_predictions(task.spec.kind, out, batch))
        # With max_eval_batches the evaluated set is the first (batches x global batch) examples.
        covered = min(len(task.validation), len(masks) * micro * world)
        predictions, gold = gather_eval(torch.cat(indices), torch.cat(preds), torch.cat(labels), torch.cat(masks),
                                        num_examples=covered)
        results[task.spec.name] = _task_metrics(task, predictions, gold, float(np.mean(losses)), compute_metrics)
    model.train()
    return results


def _eval_predictions(kind: str, out: dict, batch: dict) -> torch.Tensor:
    logits = out["logits"].float().cpu()
    if kind == "lm":  # per-row summed token NLL, for perplexity
        shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2), shift_labels, reduction="none",
                                                ignore_index=-100)
        return torch.stack([nll.sum(1), (shift_labels != -100).sum(1).float()], dim=1)
    return logits


def _task_metrics(task, predictions: np.ndarray, labels: np.ndarray, loss: float, compute_metrics) -> dict[str, float]:
    """Metrics over the gathered eval set; ``loss`` is this rank's mean batch loss."""
    if task.spec.kind == "lm":
        from .tasks import lm_metrics

        metrics = lm_metrics(float(predictions[:, 0].sum()), int(predictions[:, 1].sum()))
    else:
        metrics = compute_metrics(task.spec, predictions, labels)
    metrics["loss"] = loss
    return metrics


def diversity_metrics(model, tasks, config: RunConfig, device) -> dict[str, float]:
    """Mean pairwise cosine similarity and linear CKA of experts' outputs, per MoE layer."""
    from .diversity import layer_expert_similarity
    from .moe_layer import moe_layers

    if config.train.diversity_tokens <= 0:
        return {}
    inputs = _moe_layer_inputs(model, tasks, config, device)
    out = {}
    for index, (_, layer) in enumerate(moe_layers(model)):
        if index in inputs:
            sim = layer_expert_similarity(layer, inputs[index])
            out[f"diversity/layer{index}/cosine"] = float(sim.cosine)
            out[f"diversity/layer{index}/cka"] = float(sim.cka)
    return out


@torch.no_grad()
def _moe_layer_inputs(model, tasks, config: RunConfig, device) -> dict[int, torch.Tensor]:
    """The hidden states entering each MoE layer on a fixed validation batch."""
    from .data import make_batch
    from .moe_layer import moe_layers

    task = next((t for t in tasks if t.validation is not None), None)
    if task is None:
        return {}
    rows = max(1, config.train.diversity_tokens // config.data.max_seq_len)
    batch = make_batch(task, task.validation, np.arange(min(rows, len(task.validation))))
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for index, (_, layer) in enumerate(moe_layers(model)):
        def capture(module, inputs, output, index=index):
            captured[index] = inputs[0].reshape(-1, inputs[0].shape[-1])[: config.train.diversity_tokens]
        handles.append(layer.register_forward_hook(capture))
    model.eval()
    try:
        model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        for h in handles:
            h.remove()
        model.train()
    return captured


# --------------------------------------------------------------------------- the loop


class Trainer:
    """One training run; ``run()`` returns the final metrics (rank 0) or {} elsewhere."""

    def __init__(self, config: RunConfig, ds_config: dict[str, Any], resume: bool) -> None:
        self.config = config
        self.ds_config = ds_config
        self.resume = resume
        self.output_dir = Path(config.train.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"

    def setup(self) -> None:
        from .data import check_same_plan, prepare_tasks, train_batches
        from .moe_layer import moe_layers

        self.rank, self.world = init_distributed()
        setup_logging(self.rank)
        self.config = resolve_ep_size(self.config, self.world)
        parallel.check_ep_size(self.config.moe.ep_size, self.config.moe.num_experts)
        cfg = self.config
        micro = int(self.ds_config.get("train_micro_batch_size_per_gpu", 16))
        # Data first: bad input fails here, before any model is built.
        self.tasks = prepare_tasks(cfg.data, load_tokenizer(cfg))
        self.ep_group = parallel.expert_parallel_group(cfg.moe.ep_size) if cfg.moe.ep_size > 1 else None
        self.model, self.report = build_model(cfg, self.tasks, self.ep_group)
        self.engine, self.own_clip = build_engine(self.model, cfg, self.ds_config)
        self.batches = train_batches(self.tasks, cfg.data, micro, rank=self.rank, world_size=self.world)
        check_same_plan(self.batches.sampler)
        self.moe_layers = [layer for _, layer in moe_layers(self.model)]
        self.omoe = self._build_omoe()
        self.start_step = self._maybe_resume()
        self._write_run_files()
        self.monitor = Monitor(self.rank, self.output_dir, cfg.train.max_steps, self.start_step,
                               tensorboard=cfg.train.tensorboard, progress_bar=cfg.train.progress_bar)
        self.monitor.log(self.report.summary() if hasattr(self.report, "summary") else str(self.report))
        self.monitor.log(f"world {self.world}, ep_size {cfg.moe.ep_size}, micro-batch {micro}, "
                         f"grad accumulation {self.engine.gradient_accumulation_steps()}, "
                         f"starting at step {self.start_step} of {cfg.train.max_steps}")

    def _build_omoe(self):
        if not self.config.omoe.enabled:
            return None
        from .omoe import OrthogonalExpertOptimizer, check_update_mode_supported

        if self.config.omoe.projection == "update":
            check_update_mode_supported(self.engine)
        omoe = OrthogonalExpertOptimizer(self.model, self.config.omoe, ep_group=self.ep_group,
                                         expert_dp_group=parallel.expert_data_parallel_group(self.config.moe.ep_size))
        cost = omoe.cost(micro_batches=self.engine.gradient_accumulation_steps())
        logger.info(f"OMoE: projectors {cost.projector_bytes / 2**20:.1f} MiB, {cost.orth_step_macs / 1e9:.2f} GMAC "
                    f"per orthogonal step, {cost.collectives_per_cycle} all-reduce(s) of "
                    f"{cost.comm_bytes_per_cycle / 2**20:.1f} MiB per {self.config.omoe.cycle_steps}-step cycle")
        return omoe

    def _maybe_resume(self) -> int:
        if not self.resume:
            return 0
        tag = checkpoint.latest_tag(self.checkpoint_dir)
        if tag is None:
            logger.info(f"--resume: no checkpoint in {self.checkpoint_dir}, starting from step 0")
            return 0
        _, client_state = self.engine.load_checkpoint(str(self.checkpoint_dir), tag=tag)
        self.batches.load_state_dict(client_state["train_batches"])
        rank_state = checkpoint.load_rank_state(self.checkpoint_dir, tag, self.rank)
        if self.omoe is not None and rank_state is not None:
            self.omoe.load_state_dict(rank_state["omoe"])
        logger.info(f"resumed from {self.checkpoint_dir / tag} at step {self.engine.global_steps}")
        return int(self.engine.global_steps)

    def _write_run_files(self) -> None:
        if self.rank == 0:
            checkpoint.atomic_write_json(self.output_dir / "run_config.json", to_dict(self.config))
            checkpoint.atomic_write_json(self.output_dir / "ds_config.json", self.ds_config)

    def save(self, step: int) -> None:
        """DeepSpeed checkpoint + per-rank state; 'latest' moves only once every rank is done."""
        tag = checkpoint.tag_for(step)
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, save_latest=False,
                                    client_state={"train_batches": self.batches.state_dict(), "step": step})
        checkpoint.save_rank_state(self.checkpoint_dir, tag, self.rank,
                                   {"omoe": self.omoe.state_dict() if self.omoe is not None else None})
        dist.barrier()
        if self.rank == 0:
            checkpoint.atomic_write_text(self.checkpoint_dir / "latest", tag)
            removed = checkpoint.prune(self.checkpoint_dir, self.config.train.keep_last)
            self.monitor.log(f"saved checkpoint {tag}" + (f", removed {removed}" if removed else ""))
        dist.barrier()

    def eval_and_log(self, step: int) -> dict[str, dict[str, float]]:
        results = evaluate(self.engine, self.tasks, self.config, self.rank, self.world)
        diversity = diversity_metrics(self.engine.module, self.tasks, self.config, self.engine.device)
        if self.rank == 0:
            flat = {f"eval/{task}/{name}": value for task, metrics in results.items() for name, value in metrics.items()}
            self.monitor.scalars({**flat, **diversity}, step)
            summary = "; ".join(f"{task}: " + ", ".join(f"{k}={v:.4f}" for k, v in m.items())
                                for task, m in results.items())
            self.monitor.log(f"eval @ step {step}: {summary}")
            if diversity:
                cos = np.mean([v for k, v in diversity.items() if k.endswith("cosine")])
                self.monitor.log(f"expert output similarity @ step {step}: mean cosine {cos:.4f}")
        return {**results, "diversity": diversity} if self.rank == 0 else {}

    def train_step(self, step: int, batch_iter) -> dict[str, float]:
        """One optimizer step (gradient accumulation included)."""
        from .moe_layer import set_moe_micro_batch, set_moe_step

        engine = self.engine
        accumulation = engine.gradient_accumulation_steps()
        stats = {"loss": 0.0, "aux_loss": 0.0, "tokens": 0}
        counts = None
        task_losses: dict[str, list[float]] = {}
        set_moe_step(engine.module, step)
        if self.omoe is not None:
            self.omoe.before_step(step)
        for micro in range(accumulation):
            # Dropout as a function of (seed, step, micro-batch, rank): a resumed run draws the same masks.
            torch.manual_seed(mix_seed(self.config.train.seed, step, micro, self.rank))
            if accumulation > 1:  # MPO experts rebuild their weights once per optimizer step
                set_moe_micro_batch(engine.module, micro, is_last=micro == accumulation - 1)
            batch = next(batch_iter)
            out = engine(**{k: v.to(engine.device) for k, v in batch.items()})
            engine.backward(out["loss"])
            if self.own_clip is not None and engine.is_gradient_accumulation_boundary():
                from .engine import clip_grad_norm_

                stats["grad_norm"] = clip_grad_norm_(engine.module, self.own_clip, self.ep_group)
            engine.step()
            task = self.tasks[int(batch["task_id"][0])].spec.name
            task_losses.setdefault(task, []).append(out["task_loss"].item())
            stats["loss"] += out["loss"].item() / engine.gradient_accumulation_steps()
            stats["aux_loss"] += out["aux_loss"].item() / engine.gradient_accumulation_steps()
            stats["tokens"] += int(batch["attention_mask"].sum())
            if "expert_counts" in out:
                counts = out["expert_counts"] if counts is None else counts + out["expert_counts"]
        if accumulation > 1:
            set_moe_micro_batch(engine.module, None)  # eval and other forwards rebuild every time
        if self.omoe is not None:
            self.omoe.after_step(step)
        stats["task_losses"] = {t: float(np.mean(v)) for t, v in task_losses.items()}
        stats["expert_counts"] = counts
        return stats

    def log_step(self, step: int, stats: dict, window_tokens: int, window_seconds: float) -> None:
        counts = stats["expert_counts"]
        if counts is not None:
            counts = counts.detach().float().clone()
            dist.all_reduce(counts)  # tokens per expert over all ranks
        tokens = torch.tensor(float(window_tokens))
        dist.all_reduce(tokens)
        if self.rank != 0:
            return
        lr = self.engine.get_lr()[0]
        scalars = {"train/loss": stats["loss"], "train/aux_loss": stats["aux_loss"], "train/lr": lr,
                   "train/tokens_per_s": float(tokens) / max(window_seconds, 1e-9)}
        scalars.update({f"train/task_loss/{t}": v for t, v in stats["task_losses"].items()})
        if "grad_norm" in stats:
            scalars["train/grad_norm"] = stats["grad_norm"]
        masks = [layer.central_mask for layer in self.moe_layers if layer.central_mask is not None]
        if masks:
            scalars["moe/mask_keep_ratio"] = float(np.nanmean([m.keep_ratio() for m in masks]))
        if self.omoe is not None:
            scalars.update(self.omoe.stats())
        self.monitor.scalars(scalars, step)
        if counts is not None:
            self.monitor.expert_load(counts, step)
        per_layer = stats["aux_loss"] / max(len(self.moe_layers), 1)
        self.monitor.log(f"step {step}/{self.config.train.max_steps} loss {stats['loss']:.4f} "
                         f"balance loss/layer {per_layer:.3f} (1 = balanced) lr {lr:.3g} "
                         f"tokens/s {scalars['train/tokens_per_s']:.0f}")

    def run(self) -> dict[str, Any]:
        self.setup()
        cfg = self.config.train
        baseline = self.eval_and_log(self.start_step) if cfg.eval_at_start and self.start_step == 0 else {}
        batch_iter = iter(self.batches)
        window_tokens, window_start, losses = 0, time.perf_counter(), []
        step = self.start_step
        while step < cfg.max_steps:
            stats = self.train_step(step, batch_iter)
            step += 1
            window_tokens += stats["tokens"]
            losses.append(stats["loss"])
            self.monitor.advance(1, {"loss": stats["loss"]})
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                self.log_step(step, stats, window_tokens, time.perf_counter() - window_start)
                window_tokens, window_start = 0, time.perf_counter()
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.max_steps:
                self.eval_and_log(step)
            if cfg.save_every and step % cfg.save_every == 0 and step != cfg.max_steps:
                self.save(step)
        final = self.eval_and_log(step)
        if not (self.resume and step == self.start_step and checkpoint.latest_tag(self.checkpoint_dir)):
            self.save(step)
        metrics = self._final_metrics(step, final, baseline, losses)
        self.monitor.close()
        return metrics

    def _final_metrics(self, step: int, final: dict, baseline: dict, losses: list[float]) -> dict[str, Any]:
        if self.rank != 0:
            return {}
        metrics = {"step": step, "world_size": self.world, "ep_size": self.config.moe.ep_size,
                   "train_loss_first": losses[0] if losses else None,
                   "train_loss_last": float(np.mean(losses[-10:])) if losses else None,
                   "eval": {k: v for k, v in final.items() if k != "diversity"},
                   "diversity": final.get("diversity", {}),
                   "untrained_eval": {k: v for k, v in baseline.items() if k != "diversity"},
                   "untrained_diversity": baseline.get("diversity", {}),
                   "omoe": self.omoe.stats() if self.omoe is not None else None,
                   "parameters": self.report.as_dict()["params_after"] if hasattr(self.report, "as_dict") else {}}
        checkpoint.atomic_write_json(self.output_dir / "metrics.json", metrics)
        self.monitor.log(format_results(metrics))
        return metrics


def format_results(metrics: dict[str, Any]) -> str:
    """A per-task table: untrained vs trained primary metrics."""
    untrained = metrics["untrained_eval"]
    lines = ["results (untrained -> trained):" if untrained else "results:"]
    for task, values in metrics["eval"].items():
        before = untrained.get(task, {})
        parts = [f"{name} {before[name]:.4f} -> {value:.4f}" if name in before else f"{name} {value:.4f}"
                 for name, value in values.items()]
        lines.append(f"  {task}: " + ", ".join(parts))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    config = load_run_config(args.config, overrides)
    if args.print_config:
        print(json.dumps(to_dict(config), indent=2))
        return {}
    ds_config = resolve_ds_config(args)
    return Trainer(config, ds_config, resume=args.resume).run()


if __name__ == "__main__":
    main()
