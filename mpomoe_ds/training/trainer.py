"""The training loop: one run from a resolved config to its final metrics.

:class:`Trainer` owns the order of a run (start-up, build, optional resume,
baseline eval, steps, periodic eval and checkpoints, final metrics) and one
optimizer step. Everything MoE layers need to know about the step goes
through one :class:`~mpomoe_ds.moe.step.MoEStep`; everything people look at
goes through the rank-0 :class:`~mpomoe_ds.training.monitor.Monitor`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from mpomoe_ds import parallel
from mpomoe_ds.config import to_dict
from mpomoe_ds.data.sampling import check_same_plan, train_batches
from mpomoe_ds.data.tokenize import prepare_tasks
from mpomoe_ds.moe.grad_mask import mix_seed
from mpomoe_ds.moe.step import MoEStep
from mpomoe_ds.omoe.optimizer import OrthogonalExpertOptimizer, check_update_mode_supported
from mpomoe_ds.training import checkpoint, integrity, preflight, reshard
from mpomoe_ds.training.build import build_engine, build_model, run_tokenizer
from mpomoe_ds.training.engine import clip_grad_norm_
from mpomoe_ds.training.evaluate import diversity_metrics, evaluate
from mpomoe_ds.training.flops import mfu, training_flops_per_token
from mpomoe_ds.training.guard import NonFiniteCounter, NonFiniteError, SkipGate, agree_on_step, model_is_finite
from mpomoe_ds.training.integrity import CheckpointError
from mpomoe_ds.training.launch import init_distributed
from mpomoe_ds.training.monitor import Monitor, logger, setup_logging
from mpomoe_ds.training.run_config import RunConfig


class Trainer:
    """One training run; ``run()`` returns the final metrics (rank 0) or {} elsewhere."""

    def __init__(self, config: RunConfig, ds_config: dict[str, Any], resume: bool) -> None:
        self.config = config
        self.ds_config = ds_config
        self.resume = resume
        self.output_dir = Path(config.train.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.train_loss_first: Optional[float] = None
        self.reshard = False  # resuming a checkpoint of another world size / ep_size

    # ------------------------------------------------------------------ start-up

    def setup(self) -> None:
        self.rank, self.world = init_distributed()
        setup_logging(self.rank)
        self.config = dataclasses.replace(self.config, moe=self.config.moe.with_ep_size(self.world))
        parallel.check_ep_size(self.config.moe.ep_size, self.config.moe.num_experts)
        cfg = self.config
        # Everything checkable from configs and files, before any data or model work.
        preflight.check_before_build(cfg, self.ds_config)
        self.resume_from = self._choose_checkpoint() if self.resume else None
        micro = self._micro_batch()
        # Data first: bad input fails here, before any model is built.
        self.tasks = prepare_tasks(cfg.data, run_tokenizer(cfg))
        self.ep_group = parallel.expert_parallel_group(cfg.moe.ep_size) if cfg.moe.ep_size > 1 else None
        self.model, self.report = build_model(cfg, self.tasks, self.ep_group)
        self.engine, self.own_clip = build_engine(self.model, cfg, self.ds_config)
        self.skip_gate = SkipGate(self.engine)
        self.nonfinite = NonFiniteCounter(cfg.train.max_nonfinite_steps)
        self.batches = train_batches(self.tasks, cfg.data, micro, rank=self.rank, world_size=self.world)
        check_same_plan(self.batches.sampler)
        self.omoe = self._build_omoe()
        self.moe_step = MoEStep(self.model, participants=[self.omoe] if self.omoe is not None else [])
        for layer in self.moe_step.layers:  # moe.dispatch auto weighs bytes per optimizer step
            layer.set_accumulation(self.engine.gradient_accumulation_steps())
        self.start_step = self._maybe_resume()
        self._write_run_files()
        self.monitor = Monitor(self.rank, self.output_dir, cfg.train.max_steps, self.start_step,
                               tensorboard=cfg.train.tensorboard, progress_bar=cfg.train.progress_bar)
        self.monitor.log(self.report.summary())
        self.flops_per_token = self._flops_per_token()
        self.monitor.log(f"world {self.world}, ep_size {cfg.moe.ep_size}, micro-batch {micro}, "
                         f"grad accumulation {self.engine.gradient_accumulation_steps()}, "
                         f"starting at step {self.start_step} of {cfg.train.max_steps}")

    def _micro_batch(self) -> int:
        return int(self.ds_config.get("train_micro_batch_size_per_gpu", 16))

    def _flops_per_token(self) -> float:
        hf_config = self.model.backbone.config
        layers = next(getattr(hf_config, k) for k in ("num_hidden_layers", "n_layer", "num_layers")
                      if hasattr(hf_config, k))
        hidden = next(getattr(hf_config, k) for k in ("hidden_size", "n_embd", "d_model") if hasattr(hf_config, k))
        return training_flops_per_token(self.model, layers, self.config.data.max_seq_len, hidden)

    def _build_omoe(self) -> Optional[OrthogonalExpertOptimizer]:
        if not self.config.omoe.enabled:
            return None
        if self.config.omoe.projection == "update":
            check_update_mode_supported(self.engine)
        omoe = OrthogonalExpertOptimizer(self.model, self.config.omoe, ep_group=self.ep_group,
                                         expert_dp_group=parallel.expert_data_parallel_group(self.config.moe.ep_size))
        cost = omoe.cost(micro_batches=self.engine.gradient_accumulation_steps())
        logger.info(f"OMoE: projectors {cost.projector_bytes / 2**20:.1f} MiB, step snapshot "
                    f"{cost.snapshot_bytes / 2**20:.1f} MiB, bases {cost.basis_bytes / 2**20:.1f} MiB, "
                    f"{cost.orth_step_macs / 1e9:.2f} GMAC "
                    f"per orthogonal step, {cost.collectives_per_cycle} all-reduce(s) of "
                    f"{cost.comm_bytes_per_cycle / 2**20:.1f} MiB per {self.config.omoe.cycle_steps}-step cycle")
        return omoe

    def _choose_checkpoint(self) -> Optional[tuple[str, dict[str, Any]]]:
        """The newest checkpoint that verifies (fallbacks logged), checked against this run; None: start fresh."""
        found = integrity.newest_verified(
            self.checkpoint_dir, logger.warning, share=(self.rank, self.world),
            combine=lambda problems: [p for rank_problems in parallel.all_gather_object(problems)
                                      for p in rank_problems],
            tags=parallel.broadcast_object(integrity.candidate_tags(self.checkpoint_dir)))
        if found is None:
            logger.info(f"--resume: no checkpoint in {self.checkpoint_dir}, starting from step 0")
            return None
        tag, manifest = found
        preflight.check_resume_config(manifest["run_config"], to_dict(self.config), str(self.checkpoint_dir / tag))
        preflight.check_resume_global_batch(manifest.get("data_plan", {}), self._micro_batch(), self.world,
                                            str(self.checkpoint_dir / tag))
        self.reshard = self._needs_reshard(tag, manifest)
        # The ranks shared the verification; make sure they chose the same checkpoint.
        steps = parallel.all_reduce(torch.tensor([float(manifest["step"]), 1.0], dtype=torch.float64))
        if float(steps[0]) != manifest["step"] * float(steps[1]):
            raise CheckpointError(f"--resume: ranks chose different checkpoints in {self.checkpoint_dir} "
                                  f"(different files on different nodes?); every rank must see the same folder")
        return tag, manifest

    def _needs_reshard(self, tag: str, manifest: dict[str, Any]) -> bool:
        """Whether the checkpoint was written at another world size or ep_size (then loaded by global name)."""
        saved_world, saved_ep = manifest.get("world_size"), manifest.get("ep_size", manifest.get("world_size"))
        if (saved_world, saved_ep) == (self.world, self.config.moe.ep_size):
            return False
        where = f"--resume from {self.checkpoint_dir / tag} (world {saved_world}, ep_size {saved_ep}; now world " \
                f"{self.world}, ep_size {self.config.moe.ep_size})"
        if f"{reshard.FOLDER}/rank0.pt" not in manifest.get("files", {}):
            raise CheckpointError(f"{where}: the checkpoint has no world-size-independent copy (saved with "
                                  f"train.reshardable_checkpoints false or by an older version); launch "
                                  f"{saved_world} ranks with moe.ep_size={saved_ep}")
        if self.config.omoe.enabled:
            raise CheckpointError(f"{where}: OMoE projectors are saved per local expert and are not resharded; "
                                  f"launch {saved_world} ranks with moe.ep_size={saved_ep}")
        logger.warning(f"{where}: resharding parameters and Adam moments by global name")
        return True

    def _maybe_resume(self) -> int:
        if self.resume_from is None:
            return 0
        tag = self.resume_from[0]
        if self.reshard:
            client_state = reshard.load(self.engine, self.checkpoint_dir / tag, self.config.moe.ep_size)["client_state"]
            self.batches.load_state_dict(client_state["train_batches"])
            self.train_loss_first = client_state.get("train_loss_first")
            self.nonfinite.total = int(client_state.get("nonfinite_total", 0))
            logger.info(f"resumed (resharded) from {self.checkpoint_dir / tag} at step {self.engine.global_steps}")
            return int(self.engine.global_steps)
        _, client_state = self.engine.load_checkpoint(str(self.checkpoint_dir), tag=tag)
        self.batches.load_state_dict(client_state["train_batches"])
        self.train_loss_first = client_state.get("train_loss_first")
        self.nonfinite.total = int(client_state.get("nonfinite_total", 0))
        rank_state = checkpoint.load_rank_state(self.checkpoint_dir, tag, self.rank)
        if self.omoe is not None and rank_state is not None:
            self.omoe.load_state_dict(rank_state["omoe"])
        logger.info(f"resumed from {self.checkpoint_dir / tag} at step {self.engine.global_steps}")
        return int(self.engine.global_steps)

    def _write_run_files(self) -> None:
        if self.rank == 0:
            checkpoint.atomic_write_json(self.output_dir / "run_config.json", to_dict(self.config))
            checkpoint.atomic_write_json(self.output_dir / "ds_config.json", self.ds_config)

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        self.setup()
        cfg = self.config.train
        baseline = self.eval_and_log(self.start_step) if cfg.eval_at_start and self.start_step == 0 else {}
        # Train mode for every module, however the run began (a pretrained backbone loads in eval mode).
        self.engine.module.train()
        batch_iter = iter(self.batches)
        window_tokens, window_start, losses = 0, time.perf_counter(), []
        step = self.start_step
        while step < cfg.max_steps:
            stats = self.train_step(step, batch_iter)
            step += 1
            window_tokens += stats["tokens"]
            losses.append(stats["global_loss"])
            if self.train_loss_first is None:
                self.train_loss_first = stats["global_loss"]
            self._check_finite(step, stats, losses, baseline)
            self.monitor.advance(1, {"loss": stats["global_loss"]})
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

    def _check_finite(self, step: int, stats: dict[str, Any], losses: list[float], baseline: dict) -> None:
        """Count a skipped step; after too many in a row write metrics.json (valid JSON) and stop."""
        if not stats["finite"]:
            self.monitor.log(f"step {step}: loss or gradient norm not finite on some rank: update skipped "
                             f"({self.nonfinite.consecutive + 1} in a row, stop at "
                             f"{self.nonfinite.max_consecutive})")
        try:
            latest = checkpoint.latest_tag(self.checkpoint_dir)
            self.nonfinite.record(step, stats["finite"], str(self.checkpoint_dir / latest) if latest else None)
        except NonFiniteError as err:
            self._final_metrics(step, {}, baseline, losses, stopped=str(err))
            self.monitor.close()
            raise

    def train_step(self, step: int, batch_iter: Iterator[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """One optimizer step (gradient accumulation included).

        ``loss`` is this rank's mean over its micro-batches, ``global_loss`` the
        token-weighted mean over all ranks; ``task_losses`` this rank's mean per
        task, ``global_task_losses`` each task's row-weighted mean over all
        ranks (carried by the same all-reduce, no extra collective); ``finite`` is False on every rank
        when any rank saw a non-finite loss or gradient norm (the update was then skipped).
        """
        engine = self.engine
        accumulation = engine.gradient_accumulation_steps()
        stats: dict[str, Any] = {"loss": 0.0, "aux_loss": 0.0, "tokens": 0}
        counts = None
        task_losses: dict[str, list[float]] = {}
        task_sums = torch.zeros(2 * len(self.tasks), dtype=torch.float64)  # per task: sum loss x rows, rows
        loss_x_tokens, local_finite, agreement = 0.0, True, None
        self.moe_step.begin_step(step)
        for micro in range(accumulation):
            # Dropout as a function of (seed, step, micro-batch, rank): a resumed run draws the same masks.
            torch.manual_seed(mix_seed(self.config.train.seed, step, micro, self.rank))
            self.moe_step.begin_micro_batch(micro, is_last=micro == accumulation - 1)
            batch = next(batch_iter)
            out = engine(**{k: v.to(engine.device) for k, v in batch.items()})
            loss = out["loss"]
            if step + 1 in self.config.train.inject_nonfinite_steps and self.rank == self.world - 1:
                loss = loss * float("nan")  # fault injection (train.inject_nonfinite_steps)
            engine.backward(loss)
            tokens = int(batch["attention_mask"].sum())
            loss_x_tokens += loss.item() * tokens
            local_finite = local_finite and bool(torch.isfinite(loss.detach()))
            task_id, rows, task_loss = int(batch["task_id"][0]), batch["task_id"].numel(), out["task_loss"].item()
            task_sums[2 * task_id] += task_loss * rows
            task_sums[2 * task_id + 1] += rows
            task_losses.setdefault(self.tasks[task_id].spec.name, []).append(task_loss)
            if engine.is_gradient_accumulation_boundary():
                if self.own_clip is not None:
                    stats["grad_norm"] = clip_grad_norm_(engine.module, self.own_clip, self.ep_group)
                    local_finite = local_finite and bool(np.isfinite(stats["grad_norm"]))
                agreement = agree_on_step(local_finite, loss_x_tokens, stats["tokens"] + tokens, task_sums)
                self.skip_gate.set(not agreement.finite)
            engine.step()
            stats["loss"] += loss.item() / accumulation
            stats["aux_loss"] += out["aux_loss"].item() / accumulation
            stats["tokens"] += tokens
            if "expert_counts" in out:
                counts = out["expert_counts"] if counts is None else counts + out["expert_counts"]
        self.moe_step.end_step(step)
        stats["finite"] = agreement.finite and engine.was_step_applied()
        stats["global_loss"] = agreement.loss
        stats["task_losses"] = {t: float(np.mean(v)) for t, v in task_losses.items()}
        stats["global_task_losses"] = self._global_task_losses(agreement.extra)
        stats["expert_counts"] = counts
        return stats

    def _global_task_losses(self, sums: torch.Tensor) -> dict[str, float]:
        """Each task's train loss of this step over all ranks: row-weighted mean of its micro-batch losses."""
        sums = sums.view(-1, 2)
        return {task.spec.name: float(total / rows) for task, (total, rows) in zip(self.tasks, sums.tolist())
                if rows > 0}

    # ------------------------------------------------------------------ eval, logging, checkpoints

    def eval_and_log(self, step: int) -> dict[str, dict[str, float]]:
        results = evaluate(self.engine, self.tasks, self.config, self.rank, self.world)
        diversity = diversity_metrics(self.engine.module, self.tasks, self.config, self.engine.device)
        if self.rank == 0:
            flat = {f"eval/{task}/{name}": value
                    for task, metrics in results.items() for name, value in metrics.items()}
            self.monitor.scalars({**flat, **diversity}, step)
            summary = "; ".join(f"{task}: " + ", ".join(f"{k}={v:.4f}" for k, v in m.items())
                                for task, m in results.items())
            self.monitor.log(f"eval @ step {step}: {summary}")
            if diversity:
                cos = np.mean([v for k, v in diversity.items() if k.endswith("cosine")])
                self.monitor.log(f"expert output similarity @ step {step}: mean cosine {cos:.4f}")
        return {**results, "diversity": diversity} if self.rank == 0 else {}

    def log_step(self, step: int, stats: dict[str, Any], window_tokens: int, window_seconds: float) -> None:
        counts = stats["expert_counts"]
        if counts is not None:
            counts = counts.detach().float().clone()
            counts = parallel.all_reduce(counts)  # tokens per expert over all ranks
        tokens = parallel.all_reduce(torch.tensor(float(window_tokens)))
        source_tokens = self._tokens_seen()
        if self.rank != 0:
            return
        lr = self.engine.get_lr()[0]
        scalars = {"train/loss": stats["global_loss"], "train/aux_loss": stats["aux_loss"], "train/lr": lr,
                   "train/tokens_per_s": float(tokens) / max(window_seconds, 1e-9)}
        scalars["train/nonfinite_steps"] = self.nonfinite.total
        scalars.update({f"train/task_loss/{t}": v for t, v in stats["global_task_losses"].items()})
        scalars["train/model_tflops_per_s"] = scalars["train/tokens_per_s"] * self.flops_per_token / 1e12
        if self.config.train.peak_tflops:
            scalars["train/mfu"] = mfu(scalars["train/tokens_per_s"], self.flops_per_token,
                                       self.config.train.peak_tflops, self.world)
        scalars.update({f"train/tokens_seen/{name}": n for name, n in source_tokens.items()})
        if "grad_norm" in stats:
            scalars["train/grad_norm"] = stats["grad_norm"]
        masks = [layer.central_mask for layer in self.moe_step.layers if layer.central_mask is not None]
        if masks:
            scalars["moe/mask_keep_ratio"] = float(np.nanmean([m.keep_ratio() for m in masks]))
        if self.omoe is not None:
            scalars.update(self.omoe.stats())
        self.monitor.scalars(scalars, step)
        self.monitor.record(scalars, step)
        if counts is not None:
            self.monitor.expert_load(counts, step)
        per_layer = stats["aux_loss"] / max(len(self.moe_step.layers), 1)
        self.monitor.log(f"step {step}/{self.config.train.max_steps} loss {stats['global_loss']:.4f} "
                         f"balance loss/layer {per_layer:.3f} (1 = balanced) lr {lr:.3g} "
                         f"tokens/s {scalars['train/tokens_per_s']:.0f}"
                         + (f" MFU {100 * scalars['train/mfu']:.2f}%" if "train/mfu" in scalars else ""))

    def _tokens_seen(self) -> dict[str, float]:
        """Real tokens read so far per task and pretraining corpus, over all ranks."""
        names = list(self.batches.tokens_seen)
        seen = parallel.all_reduce(torch.tensor([float(self.batches.tokens_seen[n]) for n in names],
                                                dtype=torch.float64))
        return dict(zip(names, seen.tolist()))

    def save(self, step: int) -> None:
        """DeepSpeed checkpoint + per-rank state + manifest; 'latest' moves only once the manifest is on disk.

        A model with a non-finite parameter on any rank is never saved.
        """
        if not agree_on_step(model_is_finite(self.engine.module), 0.0, 0).finite:
            self.monitor.log(f"step {step}: the model has non-finite parameters; checkpoint NOT saved, "
                             f"{checkpoint.latest_tag(self.checkpoint_dir)} stays the latest")
            return
        tag = checkpoint.tag_for(step)
        if self.rank == 0:  # a folder being rewritten (after a fallback) is incomplete until its new manifest
            (self.checkpoint_dir / tag / integrity.MANIFEST).unlink(missing_ok=True)
        parallel.barrier()
        # Token counts saved as totals over ranks, so a resume at any world size carries them on exactly.
        data_state = {**self.batches.state_dict(), "tokens_seen": self._tokens_seen()}
        client_state = {"train_batches": data_state, "step": step,
                        "train_loss_first": self.train_loss_first, "nonfinite_total": self.nonfinite.total,
                        "world_size": self.world, "ep_size": self.config.moe.ep_size}
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, save_latest=False, client_state=client_state)
        checkpoint.save_rank_state(self.checkpoint_dir, tag, self.rank,
                                   {"omoe": self.omoe.state_dict() if self.omoe is not None else None})
        if self.config.train.reshardable_checkpoints:
            reshard.save(self.engine, self.checkpoint_dir / tag, self.config.moe.ep_size,
                         {"client_state": client_state})
        parallel.barrier()
        if self.rank == 0:
            self.monitor.flush()
            integrity.write_manifest(self.checkpoint_dir / tag, to_dict(self.config), client_state)
            checkpoint.atomic_write_text(self.checkpoint_dir / "latest", tag)
            removed = checkpoint.prune(self.checkpoint_dir, self.config.train.keep_last)
            self.monitor.log(f"saved checkpoint {tag}" + (f", removed {removed}" if removed else ""))
        parallel.barrier()

    def _final_metrics(self, step: int, final: dict, baseline: dict, losses: list[float],
                       stopped: Optional[str] = None) -> dict[str, Any]:
        if self.rank != 0:
            return {}
        finite = [v for v in losses if np.isfinite(v)]
        metrics = {"step": step, "world_size": self.world, "ep_size": self.config.moe.ep_size,
                   "train_loss_first": self.train_loss_first,
                   "train_loss_last": float(np.mean(finite[-10:])) if finite else None,
                   "nonfinite_steps": self.nonfinite.total, "stopped": stopped,
                   "eval": {k: v for k, v in final.items() if k != "diversity"},
                   "diversity": final.get("diversity", {}),
                   "untrained_eval": {k: v for k, v in baseline.items() if k != "diversity"},
                   "untrained_diversity": baseline.get("diversity", {}),
                   "omoe": self.omoe.stats() if self.omoe is not None else None,
                   "parameters": self.report.as_dict()["params_after"],
                   "init_distance": self.report.init_distance()}
        checkpoint.atomic_write_json(self.output_dir / "metrics.json", metrics)
        if stopped is None:
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
