"""Merged export with a ``trust_remote_code`` modeling file, for BERT-family models (no native MoE class).

Writes ``config.json`` (model type ``mpomoe_bert``, ``auto_map`` to the shipped
``modeling_mpomoe.py``), that file (:mod:`mpomoe_ds.models.remote_code.modeling_mpomoe`,
torch + transformers only) and ``model.safetensors`` (the merged expert weights).
Then, without mpomoe_ds::

    model = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True)

The folder is not read by :func:`mpomoe_ds.models.export.load_converted` (use the
``mpo`` or ``merged`` mode for that). Only what the file computes exactly is
written: bare ``BertModel``-family encoders, dropless layers, one config for all layers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Union

from torch import nn

from mpomoe_ds.models.convert import ConversionSpec
from mpomoe_ds.models.export import merge_expert_state, save_tensors

REMOTE_FILE = Path(__file__).parent / "remote_code" / "modeling_mpomoe.py"

REMOTE_CLASSES = {"BertModel": "MPOEBertModel"}


def save_remote_code(model: nn.Module, out_dir: Union[str, Path]) -> Path:
    """Write a converted BERT-family encoder as a remote-code folder (see the module docstring).

    Raises:
        ValueError: not a bare BERT-family encoder, experts split over ranks,
            or capacity-limited routing (the file routes dropless).
    """
    name = type(model).__name__
    spec = ConversionSpec.of(model)
    if spec.family != "bert" or name not in REMOTE_CLASSES:
        raise ValueError(f"remote-code export covers {sorted(REMOTE_CLASSES)} of the bert family, not {name} "
                         f"({spec.family}); use save_converted (mpo / merged)")
    if not spec.moe.dropless or spec.moe.ep_size != 1:
        raise ValueError(f"remote-code export needs dropless routing with every expert in this process "
                         f"(moe.dropless={spec.moe.dropless}, ep_size={spec.moe.ep_size})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.update(model_type="mpomoe_bert", architectures=[REMOTE_CLASSES[name]],
                  auto_map={"AutoConfig": "modeling_mpomoe.MPOEBertConfig",
                            "AutoModel": f"modeling_mpomoe.{REMOTE_CLASSES[name]}"},
                  mpomoe={"blocks": list(spec.blocks), "num_experts": spec.moe.num_experts, "k": spec.moe.k,
                          "gate_weighting": spec.moe.gate_weighting, "activation": spec.moe.activation,
                          "gated": spec.moe.gated})
    config.pop("transformers_version", None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(REMOTE_FILE, out / "modeling_mpomoe.py")
    state = merge_expert_state(model, {k: v.detach() for k, v in model.state_dict().items()})
    save_tensors(state, out / "model.safetensors")
    return out
