"""Export: trained MPOE models as files that rebuild a working transformers model.

This module owns the on-disk format of a converted model and the ways into it:

    save_converted               a converted model in this process -> folder
    load_converted               folder -> a converted transformers model (ep_size=1)
    export_deepspeed_checkpoint  a DeepSpeed MoE checkpoint written with any
                                 ep_size -> one full model -> folder
    mpomoe-export                the same from the command line (:mod:`mpomoe_ds.cli.export`)

Folder layout (``save_pretrained`` style):

    config.json                the base model's Hugging Face config
    mpomoe_config.json         format version, model class, mode, converted
                               blocks, MoE and MPO configs
    mpomoe_model.safetensors   the full state dict

The weights file deliberately does not use transformers' name
(``model.safetensors``): ``AutoModel.from_pretrained`` on the folder would
otherwise load the dense skeleton, skip every MoE weight with a warning and
leave random FFNs. It fails loudly instead; :func:`load_converted` is the way in.

Modes:
    mpo     the trained tensors as they are: central and auxiliary MPO cores.
    merged  every expert's dense matrices, reconstructed from its cores once at
            export time, stored as plain ("ffn") experts: inference runs no
            reconstruction. The router and biases are unchanged. Causal LMs
            of the Llama / Mistral / Qwen3 families are written instead as
            transformers' own Mixtral / Qwen3-MoE (``config.json`` +
            ``model.safetensors``), which ``AutoModelForCausalLM.from_pretrained``
            loads without mpomoe_ds (:mod:`mpomoe_ds.models.native_moe`, exact
            or refused).
    remote  for families without a native MoE class (BERT, GPT-2, DistilBERT,
            T5): the merged weights as ``model.safetensors`` with a generated
            ``modeling_mpomoe.py`` that ``AutoModel.from_pretrained(folder,
            trust_remote_code=True)`` loads without mpomoe_ds
            (:mod:`mpomoe_ds.models.remote_export`); not read by load_converted.

A DeepSpeed MoE checkpoint (0.19.8, ``engine._save_moe_checkpoint``) is a tag
folder holding ``mp_rank_00_model_states.pt``, whose ``'module'`` dict has
every non-expert parameter (dense, router, central tensors; full values for
ZeRO 0-2), and for each MoE layer L (in model order) and global expert G a
file ``layer_{L}_expert_{G}_mp_rank_00_model_states.pt`` whose keys are the
model keys with the local expert index replaced by G:
``<moe module>.deepspeed_moe.experts.deepspeed_experts.<G>.<param>``.
With ep_size=1 the global id is the local index, so the files load as they are.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from mpomoe_ds.config import from_dict, to_dict
from mpomoe_ds.models.convert import ConversionSpec, convert_model
from mpomoe_ds.models.hf import load_model
from mpomoe_ds.models.merged import EXPERTS_PREFIX, merge_expert_state, save_tensors
from mpomoe_ds.models.native_moe import has_native_target, save_native_moe
from mpomoe_ds.models.remote_export import save_remote_code
from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.moe.layer import MPOEMoE, moe_layers
from mpomoe_ds.mpo.config import MPOConfig

PathLike = Union[str, Path]


MODES = ("mpo", "merged", "remote")


LOADABLE_MODES = ("mpo", "merged")  # what load_converted reads; "remote" folders load with transformers alone


FORMAT_VERSION = 1


MPOMOE_CONFIG_NAME = "mpomoe_config.json"


WEIGHTS_NAME = "mpomoe_model.safetensors"


DS_MAIN_FILE = "mp_rank_00_model_states.pt"


TRAINER_PREFIX = "backbone."  # the training CLI's MultiTaskModel keeps the transformers model here


def save_converted(model: nn.Module, out_dir: PathLike, mode: str = "mpo") -> Path:
    """Write a converted model (all experts in this process) to ``out_dir``.

    Args:
        model: a model converted by :func:`mpomoe_ds.models.convert.convert_model`
            with ep_size=1 (for expert-parallel runs export the DeepSpeed
            checkpoint with :func:`export_deepspeed_checkpoint`).
        out_dir: created if missing; existing files of the same names are replaced.
        mode: "mpo" (cores as trained), "merged" (dense expert matrices) or
            "remote" (dense expert matrices with a trust_remote_code modeling file).

    Returns:
        ``out_dir`` as a Path.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {list(MODES)}")
    spec = ConversionSpec.of(model)
    for name, layer in moe_layers(model):
        if layer.ep_size != 1:
            raise ValueError(f"{name} holds {layer.num_local_experts} of {layer.num_experts} experts "
                             f"(ep_size={layer.ep_size}); save_converted needs every expert in one process. "
                             f"Save a DeepSpeed checkpoint and use export_deepspeed_checkpoint")
    if mode == "remote":
        return save_remote_code(model, out_dir)
    if mode == "merged" and has_native_target(model):
        return save_native_moe(model, out_dir)  # Mixtral / Qwen3-MoE: plain transformers loads it
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if mode == "merged":
        state = merge_expert_state(model, state)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)  # the caller's model keeps its config untouched
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    meta = {"format_version": FORMAT_VERSION, "model_class": type(model).__name__, "family": spec.family,
            "mode": mode, "blocks": list(spec.blocks), "moe": to_dict(spec.moe), "mpo": to_dict(spec.mpo)}
    (out / MPOMOE_CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    save_tensors(state, out / WEIGHTS_NAME)
    return out


def read_export_config(out_dir: PathLike) -> dict:
    """The ``mpomoe_config.json`` of an export folder, checked."""
    path = Path(out_dir) / MPOMOE_CONFIG_NAME
    if not path.is_file() and (Path(out_dir) / "modeling_mpomoe.py").is_file():
        raise FileNotFoundError(f"{out_dir} is a remote-code export (mode 'remote'): load it with transformers, "
                                f"AutoModel.from_pretrained(folder, trust_remote_code=True); load_converted "
                                f"reads the 'mpo' and 'merged' modes")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {out_dir} is not an mpomoe_ds export "
                                f"(write one with mpomoe_ds.models.export.save_converted)")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r}, this mpomoe_ds reads "
                         f"{FORMAT_VERSION}")
    if meta.get("mode") not in LOADABLE_MODES:
        raise ValueError(f"{path}: mode {meta.get('mode')!r} is not one of {list(LOADABLE_MODES)}")
    return meta


def load_converted(out_dir: PathLike) -> nn.Module:
    """Rebuild the transformers model saved by :func:`save_converted`, converted, with its weights.

    The model class comes from ``mpomoe_config.json`` (e.g. ``BertModel``,
    ``GPT2LMHeadModel``), its config from ``config.json``; the conversion is
    replayed with ep_size=1 ("ffn" experts for a merged export) and the saved
    weights loaded. The auxiliary-loss collector is ``model.moe_aux``.

    Returns:
        The model, in eval mode.
    """
    import transformers
    from safetensors.torch import load_file

    out = Path(out_dir)
    meta = read_export_config(out)
    model_cls = getattr(transformers, meta["model_class"], None)
    if model_cls is None:
        raise ValueError(f"{out / MPOMOE_CONFIG_NAME}: transformers {transformers.__version__} has no class "
                         f"{meta['model_class']!r}")
    config = transformers.AutoConfig.from_pretrained(out, local_files_only=True)
    model = model_cls(config)
    moe = from_dict(MoEConfig, meta["moe"], "moe")
    mpo = from_dict(MPOConfig, meta["mpo"], "mpo")
    # expert_init "copy": the saved weights replace the initial experts anyway.
    moe = dataclasses.replace(moe, ep_size=1, shard_central=False, layers=list(meta["blocks"]), expert_init="copy",
                              expert_type="ffn" if meta["mode"] == "merged" else moe.expert_type)
    convert_model(model, moe, mpo)
    load_weights(model, load_file(str(out / WEIGHTS_NAME)))
    return model.eval()


def _is_core_key(key: str) -> bool:
    return bool(re.search(r"\.central\.(gate|up|down)$|\.(gate|up|down)_aux\.\d+$", key))


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict into a converted model; every key must match.

    MPO cores may differ in shape from the freshly converted model's (bond
    dims truncated by ``rel_tol`` depend on the weights that were decomposed):
    such parameters are resized in place, keeping the Parameter objects and
    their attributes and hooks. Any other shape mismatch is an error.
    """
    params = dict(model.named_parameters())
    for key, tensor in state.items():
        p = params.get(key)
        if p is not None and p.shape != tensor.shape:
            if not _is_core_key(key):
                raise ValueError(f"{key}: saved shape {tuple(tensor.shape)} but the model has {tuple(p.shape)}; "
                                 f"the model was not built like the saved one")
            p.data = torch.empty(tensor.shape, dtype=p.dtype, device=p.device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {sorted(missing)[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {sorted(unexpected)[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''} (was the export mode or the MoE config "
                         f"different?)")


def latest_tag(checkpoint_dir: PathLike) -> Optional[str]:
    """The tag written in ``checkpoint_dir/latest``, if that file and the tag's folder exist."""
    marker = Path(checkpoint_dir) / "latest"
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    return tag if (Path(checkpoint_dir) / tag).is_dir() else None


def resolve_tag(checkpoint_dir: PathLike, tag: Optional[str]) -> str:
    """``tag``, or the one recorded in ``checkpoint_dir/latest``."""
    if tag is not None:
        return str(tag)
    latest = latest_tag(checkpoint_dir)
    if latest is None:
        raise FileNotFoundError(f"no tag given and {Path(checkpoint_dir) / 'latest'} does not name an existing "
                                f"checkpoint folder; pass the tag (a sub-folder of {checkpoint_dir})")
    return latest


def deepspeed_checkpoint_state(checkpoint_dir: PathLike, tag: Optional[str], model: nn.Module) -> dict:
    """The full state dict of ``model`` assembled from a DeepSpeed MoE checkpoint.

    ``model`` must be the checkpointed model's single-process twin (same
    class, conversion, MoE layers with ep_size=1); its MoE layers are matched
    to the expert files by order (``layer_{L}``).
    """
    folder = Path(checkpoint_dir) / resolve_tag(checkpoint_dir, tag)
    main_file = folder / DS_MAIN_FILE
    if not main_file.is_file():
        found = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else []
        raise FileNotFoundError(f"{main_file} does not exist (found {found[:10]}); expected a DeepSpeed "
                                f"checkpoint saved with ZeRO stage 0, 1 or 2 (MoE cannot use stage 3)")
    # The main file pickles DeepSpeed objects (the ds_config); it is our own checkpoint, so full unpickling.
    checkpoint = torch.load(main_file, map_location="cpu", weights_only=False)
    prefix = _checkpoint_prefix(checkpoint["module"], model)
    state = _strip_prefix(checkpoint["module"], prefix)
    layers = list(moe_layers(model))
    for layer_id, (name, layer) in enumerate(layers):
        if layer.ep_size != 1:
            raise ValueError(f"the model builder must build MoE layers with ep_size=1, {name} has {layer.ep_size}")
        state.update(_expert_state(folder, layer_id, name, layer, prefix))
    extra = sorted(p.name for p in folder.glob(f"layer_{len(layers)}_expert_*_model_states.pt"))
    if extra:
        raise ValueError(f"{folder} has more MoE layers than the model ({len(layers)}), e.g. {extra[0]}; "
                         f"the model builder does not match the checkpoint")
    return state


def _checkpoint_prefix(module_state: dict[str, torch.Tensor], model: nn.Module) -> str:
    """"" for a checkpoint of ``model`` itself, TRAINER_PREFIX for one of the training CLI's wrapper."""
    names = [name for name, _ in model.named_parameters()]
    if any(name in module_state for name in names):
        return ""
    if any(TRAINER_PREFIX + name in module_state for name in names):
        return TRAINER_PREFIX
    return ""  # nothing matches: load_weights names the mismatch


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under ``prefix``, without it (the training CLI's task heads are dropped)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _expert_state(folder: Path, layer_id: int, name: str, layer: MPOEMoE, prefix: str) -> dict[str, torch.Tensor]:
    state = {}
    for g in range(layer.num_experts):
        path = folder / f"layer_{layer_id}_expert_{g}_mp_rank_00_model_states.pt"
        if not path.is_file():
            found = sorted(p.name for p in folder.glob(f"layer_{layer_id}_expert_*"))
            raise FileNotFoundError(f"{path.name} is missing: MoE layer {layer_id} ({name}) has "
                                    f"{layer.num_experts} experts but the checkpoint holds {found}")
        expert = _strip_prefix(torch.load(path, map_location="cpu", weights_only=True), prefix)
        expected = f"{name}.{EXPERTS_PREFIX}.{g}."
        wrong = [k for k in expert if not k.startswith(expected)]
        if wrong or not expert:
            raise ValueError(f"{path.name}: key {(wrong or ['(none)'])[0]!r} is not under {prefix + expected!r}; "
                             f"MoE layer {layer_id} of the model builder's model is not the checkpoint's")
        state.update(expert)
    return state


def export_deepspeed_checkpoint(checkpoint_dir: PathLike, tag: Optional[str], model_builder: Callable[[], nn.Module],
                                out_dir: PathLike, mode: str = "merged") -> Path:
    """Assemble one full model from a DeepSpeed MoE checkpoint (any ep_size) and :func:`save_converted` it.

    Args:
        checkpoint_dir: the folder given to ``engine.save_checkpoint``.
        tag: the checkpoint tag (None: the ``latest`` file's).
        model_builder: returns the checkpointed model's single-process twin:
            same transformers class and config, converted with the same MoE /
            MPO configs but ``ep_size=1``. Its weights are all replaced.
        out_dir: where the export goes.
        mode: "merged", "mpo" or "remote" (see the module docstring).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {list(MODES)}")
    model = model_builder()
    load_weights(model, deepspeed_checkpoint_state(checkpoint_dir, tag, model))
    return save_converted(model.eval(), out_dir, mode)


def config_model_builder(model: str, moe: MoEConfig, mpo: Optional[MPOConfig] = None,
                         task: Optional[str] = None,
                         config_overrides: Optional[dict[str, Any]] = None) -> Callable[[], nn.Module]:
    """A builder: the transformers model described by ``model``'s config.json, converted with ep_size=1.

    Only the config is read (every weight comes from the checkpoint); ``model``
    may also be a bare model type with ``config_overrides``, as a random-init
    training run built it. The class is the one for ``task`` (see
    :data:`mpomoe_ds.models.hf.TASKS`), else the config's ``architectures[0]``,
    else the bare ``AutoModel``.
    """
    def build() -> nn.Module:
        built = load_model(model, task or "architecture", weights=False, config_overrides=config_overrides)
        convert_model(built, dataclasses.replace(moe, ep_size=1, shard_central=False), mpo)
        return built

    return build
