"""Every parameter DeepSpeed's engine broadcasts is contiguous, for every model family and expert type.

``DeepSpeedEngine._broadcast_model`` sends ``p.data.view(torch.uint8)``, which
refuses a tensor whose last stride is not 1; pretrained nn.Linear weights read
in x @ W orientation are exactly such transposed views.
"""

from __future__ import annotations

import pytest
import torch
from dist import family_zoo

from mpomoe_ds.models import families
from mpomoe_ds.models.convert import convert_model
from mpomoe_ds.moe.config import MoEConfig


def test_every_convertible_family_is_covered():
    covered = set(family_zoo.FAMILY_OF.values())
    assert covered == {a.name for a in families.FAMILIES}, "add the new family to tests/dist/family_zoo.py"


# Every family of the zoo with both expert types, except the pretrained MiniLM with MPO experts: decomposing
# it costs ~30 s on 2 cores, and MPO cores come out of the SVD sweep contiguous (the tiny models check that
# path); with plain experts it is the layout that crashed (pretrained nn.Linear weights read as x @ W).
CASES = [(case, expert_type) for case in sorted(family_zoo.CASES) for expert_type in ("ffn", "mpo")
         if not (case == "minilm" and expert_type == "mpo")]


@pytest.mark.parametrize("case, expert_type", CASES, ids=[f"{c}-{e}" for c, e in CASES])
def test_converted_model_parameters_are_contiguous_and_byte_viewable(case, expert_type):
    model = family_zoo.build(case)
    convert_model(model, MoEConfig(num_experts=4, expert_type=expert_type))
    params = dict(model.named_parameters())
    assert any("deepspeed_experts" in name for name in params)
    bad = [name for name, p in params.items() if not p.is_contiguous()]
    assert not bad, f"non-contiguous parameters: {bad[:4]}"
    for p in params.values():
        p.data.view(torch.uint8)  # what _broadcast_model does; raises on a bad stride
