"""World-size-independent checkpoints: every parameter and its Adam moments, keyed by global name.

Owns the ``<tag>/global/`` part of a checkpoint and the loader that places it
for the current world size, ``ep_size`` and ZeRO stage. DeepSpeed's own files
next to it are per rank: its native MoE saves expert optimizer state per
expert-parallel rank, reloads experts at another ``ep_size`` for weights only,
and its universal checkpoint skips native MoE. This module goes beyond that.

Naming:

    local name   ``named_parameters()`` of this rank's model: an expert's
                 parameters sit under ``deepspeed_experts.<local id>.``
    global name  the same with the *global* expert id
                 (``ep_rank * num_local_experts + local id``), so it names one
                 tensor in every world; a sharded central tensor
                 (``moe.shard_central``) has its full shape under its name
    entry        ``{"param": fp32, "exp_avg", "exp_avg_sq", "step"}`` of one
                 global name (moments absent before the parameter's first update)

Save (collective, every rank): each entry is gathered to full size (ZeRO-1/2
partitions over their data-parallel group, central shards over the
expert-parallel group) and written once, by the first replica: dense and
central entries by rank 0, an expert's by the rank holding it whose
expert-data-parallel rank is 0. ``rank<r>.pt`` holds rank r's entries; rank 0's
also the schedule, the engine's step counters and the run's client state.
The manifest covers these files like every other.

Load (every rank): read every ``rank*.pt``, take the entries of the
parameters this rank holds, cut the local slice (central shards), copy values
into the model and ZeRO's fp32 partitions and moments into the optimizer
state. The same global batch then gives the same continuation as a run that
never stopped, up to float reduction order (tests: ``rtol 1e-4``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional

import torch

from mpomoe_ds import parallel
from mpomoe_ds.moe.layer import moe_layers
from mpomoe_ds.moe.params import parameter_kind

FOLDER = "global"
MOMENTS = ("exp_avg", "exp_avg_sq")
_LOCAL_EXPERT = re.compile(r"(\.deepspeed_experts\.)(\d+)(\.)")


class ReshardError(RuntimeError):
    """The checkpoint cannot be placed on this world; the message says why and what to do."""


class Placed(NamedTuple):
    """One parameter of this rank and where its global entry lives."""

    name: str  # global name
    param: torch.nn.Parameter
    local: Callable[[torch.Tensor], torch.Tensor]  # full tensor -> what this rank holds
    central_shard: Optional[Any]  # the CentralTensors holding this flat shard, or None
    owner: bool  # this rank writes the entry


def placed_parameters(model: torch.nn.Module, ep_size: int) -> Iterator[Placed]:
    """Every parameter of this rank with its global name, in ``named_parameters`` order (same on all ranks)."""
    layers = dict(moe_layers(model))
    expert_dp_rank = parallel.group_rank(parallel.expert_data_parallel_group(ep_size))
    first_replica = {"dense": parallel.rank() == 0, "central": parallel.rank() == 0, "expert": expert_dp_rank == 0}
    for name, param in model.named_parameters():
        layer_name, layer = _layer_of(name, layers)
        kind = parameter_kind(param)
        central = layer.central if layer is not None and kind == "central" and layer.central.sharded else None
        if kind == "expert" and _LOCAL_EXPERT.search(name):
            ids = layer.global_expert_ids
            name = _LOCAL_EXPERT.sub(lambda m: f"{m.group(1)}{ids[int(m.group(2))]}{m.group(3)}", name, count=1)
        local = central.local_slice if central is not None else (lambda full: full)
        yield Placed(name, param, local, central, first_replica[kind])


def _layer_of(name: str, layers: dict[str, Any]) -> tuple[Optional[str], Optional[Any]]:
    for layer_name, layer in layers.items():
        if name.startswith(layer_name + "."):
            return layer_name, layer
    return None, None


# --------------------------------------------------------------------------- save


def _optimizer_state(engine: Any, param: torch.nn.Parameter) -> Optional[dict[str, Any]]:
    """ZeRO 0: torch's per-parameter state (None before the parameter's first update)."""
    state = engine.optimizer.state.get(param)
    return state if state else None


def _zero_step(engine: Any) -> Optional[float]:
    """ZeRO 1/2: Adam's step count of the flat partitions (equal for all; None before the first update)."""
    for state in engine.optimizer.optimizer.state.values():
        if "step" in state:
            return float(state["step"])
    return None


def _link_zero_state(engine: Any) -> None:
    """Point every parameter's ZeRO fragment at the current Adam state (DeepSpeed links it once, lazily)."""
    engine.optimizer._hp_optimizer_states_linked = False
    engine.optimizer._lazy_init_hp_params_optimizer_state()


def _full(placed: Placed, tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``tensor`` at full size: central shards all-gathered over the expert-parallel group (collective)."""
    if tensor is None:
        return None
    tensor = tensor.detach().float()
    if placed.central_shard is None:
        return tensor.cpu().clone()
    shape = placed.central_shard.full_shapes[placed.name.rsplit(".", 1)[1]]
    return parallel.all_gather_flat(tensor.reshape(-1), placed.central_shard.ep_group)[:shape.numel()].view(shape).cpu()


def _entry(engine: Any, placed: Placed, zero: bool, zero_step: Optional[float]) -> dict[str, Any]:
    """The full entry of one parameter (collective: every rank calls it for every parameter in order)."""
    param = placed.param
    if zero:
        value = parallel.zero_full_tensor(param)
        moments = {k: parallel.zero_full_tensor(param, k) if zero_step is not None else None for k in MOMENTS}
        step = zero_step if value is not None else None
        value = param if value is None else value
    else:
        state = _optimizer_state(engine, param)
        value, moments = param, {k: state[k] if state else None for k in MOMENTS}
        step = float(state["step"]) if state else None
    entry = {"param": _full(placed, value), "step": step}
    entry.update({k: _full(placed, v) for k, v in moments.items()})
    return entry


def global_state(engine: Any, ep_size: int) -> dict[str, dict[str, Any]]:
    """This rank's entries (those it owns), keyed by global name. Collective over the world."""
    zero = bool(engine.zero_optimization())
    zero_step = _zero_step(engine) if zero else None
    if zero_step is not None:
        _link_zero_state(engine)
    entries = {}
    for placed in placed_parameters(engine.module, ep_size):
        entry = _entry(engine, placed, zero, zero_step)
        if placed.owner:
            entries[placed.name] = entry
    return entries


def save(engine: Any, folder: Path, ep_size: int, meta: dict[str, Any]) -> None:
    """Write ``folder/global/rank<r>.pt`` (rank 0 adds ``meta`` and the engine's counters). Collective."""
    entries = global_state(engine, ep_size)
    out = Path(folder) / FOLDER
    out.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"entries": entries}
    if parallel.rank() == 0:
        payload["meta"] = {**meta, "zero_stage": int(engine.zero_optimization_stage()),
                           "global_steps": engine.global_steps, "global_samples": engine.global_samples,
                           "skipped_steps": engine.skipped_steps,
                           "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler else None}
    path = out / f"rank{parallel.rank()}.pt"
    tmp = path.with_name("." + path.name + ".tmp")  # hidden: never listed by the manifest
    torch.save(payload, tmp)
    tmp.replace(path)


# --------------------------------------------------------------------------- load


def read(folder: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """(every entry by global name, rank 0's meta) of a checkpoint's global files."""
    files = sorted((Path(folder) / FOLDER).glob("rank*.pt"))
    if not files:
        raise ReshardError(f"{folder} has no {FOLDER}/ files (saved with train.reshardable_checkpoints false, "
                           f"or by an older version): resume it with the world size and ep_size it was saved with")
    entries, meta = {}, None
    for path in files:
        payload = torch.load(path, weights_only=False, map_location="cpu")
        entries.update(payload["entries"])
        meta = payload.get("meta", meta)
    return entries, meta


def load(engine: Any, folder: Path, ep_size: int) -> dict[str, Any]:
    """Place a checkpoint's global entries on this rank; returns its meta. Not collective."""
    entries, meta = read(folder)
    stage = int(engine.zero_optimization_stage())
    if meta["zero_stage"] != stage:
        raise ReshardError(f"{folder} was written under ZeRO stage {meta['zero_stage']}, this run uses stage "
                           f"{stage}: resume at another world size with the same zero_optimization.stage")
    placed = list(placed_parameters(engine.module, ep_size))
    missing = [p.name for p in placed if p.name not in entries]
    if missing:
        raise ReshardError(f"{folder}: no saved tensor for {len(missing)} parameter(s) of this model, e.g. "
                           f"{missing[:3]}; the checkpoint is of another model")
    if stage:
        _ensure_zero_state(engine, entries, placed)
    with torch.no_grad():
        for p in placed:
            _place(engine, p, entries[p.name], bool(stage))
    _restore_schedule(engine, meta)
    return meta


def _place(engine: Any, placed: Placed, entry: dict[str, Any], zero: bool) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    param = placed.param
    value = placed.local(entry["param"]).to(param.device)
    if value.shape != param.shape:
        raise ReshardError(f"{placed.name}: saved shape {tuple(value.shape)}, this model's {tuple(param.shape)}")
    param.data.copy_(value.to(param.dtype))
    moments = {k: entry[k] for k in MOMENTS if entry.get(k) is not None}
    if zero:
        safe_set_full_fp32_param(param, value.float())
        for key, moment in moments.items():
            safe_set_full_optimizer_state(param, placed.local(moment).to(param.device), key)
    elif moments:
        engine.optimizer.state[param] = {"step": torch.tensor(entry["step"], dtype=torch.float32),
                                         **{k: placed.local(m).to(param.device).clone() for k, m in moments.items()}}


def _ensure_zero_state(engine: Any, entries: dict[str, dict[str, Any]], placed: list[Placed]) -> None:
    """Create Adam's state of ZeRO's flat fp32 partitions (lazy in torch) and link the fragments to it."""
    steps = {entries[p.name]["step"] for p in placed if entries[p.name].get("exp_avg") is not None}
    if not steps:
        return
    zero_opt = engine.optimizer
    for flat in zero_opt.single_partition_of_fp32_groups:
        zero_opt.optimizer.state[flat] = {"step": torch.tensor(max(steps), dtype=torch.float32),
                                          **{k: torch.zeros_like(flat) for k in MOMENTS}}
    _link_zero_state(engine)


def _restore_schedule(engine: Any, meta: dict[str, Any]) -> None:
    """LR schedule (and the groups' current lr) and the engine's step counters."""
    scheduler = engine.lr_scheduler
    if scheduler is not None and meta.get("lr_scheduler") is not None:
        scheduler.load_state_dict(meta["lr_scheduler"])
        for group, lr in zip(engine.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    engine.global_steps = int(meta["global_steps"])
    engine.global_samples = int(meta["global_samples"])
    engine.skipped_steps = int(meta["skipped_steps"])
