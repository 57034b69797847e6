"""MPO (tensor-train matrix) math: decomposition, shared-central reconstruction, accounting.

Pure tensor math on torch, no DeepSpeed and no modules. Modules:
``decomposition`` (factors, the validated ``MPO`` container, ``decompose``),
``reconstruction`` (contraction in the cheapest order, batched experts around
one shared central core, multiply-add accounting), ``config`` (the ``mpo``
section), ``gauge`` (the balanced gauge, rotations of the central core's
bonds, partial re-initialisation). The public functions are importable from here
(``from mpomoe_ds.mpo import decompose, reconstruct``); they load on first use,
so reading ``mpomoe_ds.mpo.config`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "decomposition": ("DEFAULT_NUM_CORES", "MPO", "check_factors", "decompose", "factorize", "full_bond_dims"),
    "reconstruction": ("dense_matmul_macs", "reconstruct", "reconstruct_shared", "reconstruction_macs",
                       "shared_plan_macs", "shared_reconstruction_macs"),
    "gauge": ("balance", "core_rms", "fractional_rotation", "haar_rotation", "reinit_partially",
              "rotate_central_bonds", "rotation"),
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)


def __getattr__(name: str) -> Any:
    for module, names in _EXPORTS.items():
        if name in names:
            return getattr(importlib.import_module(f"mpomoe_ds.mpo.{module}"), name)
    raise AttributeError(f"module 'mpomoe_ds.mpo' has no attribute {name!r}")
