"""The dense baseline (moe.enabled: false) and the specialisation metrics through the training CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from conftest import TINY_DS, tiny_run_config


def write_configs(tmp_path: Path, run: dict) -> tuple[Path, Path]:
    run_path, ds_path = tmp_path / "run.yaml", tmp_path / "ds.json"
    run_path.write_text(yaml.safe_dump(run))
    ds_path.write_text(json.dumps(TINY_DS))
    return run_path, ds_path


def test_moe_disabled_trains_the_dense_model_through_the_cli(tmp_path):
    from mpomoe_ds.cli.train import run as train_cli

    config = tiny_run_config(tmp_path / "dense")
    config["moe"] = {"enabled": False}
    run, ds = write_configs(tmp_path, config)
    metrics = train_cli(["--config", str(run), "--deepspeed_config", str(ds)])
    written = json.loads((tmp_path / "dense" / "metrics.json").read_text())
    assert written["step"] == 6 and math.isfinite(written["train_loss_last"])
    assert set(written["eval"]) == {"toy_sentiment", "toy_topic"}
    params = written["parameters"]
    assert params["expert_global"] == params["central_global"] == 0  # nothing was converted
    assert params["total_local"] == params["dense_local"]
    assert written["diversity"] == {} and written["init_distance"] == {"output_rel": 0.0, "weight_rel": {}}
    assert list((tmp_path / "dense" / "tensorboard").glob("events.*"))  # the same TensorBoard output
    assert metrics["eval"] == written["eval"]


def test_moe_run_logs_specialisation_metrics_and_init_distance(tmp_path):
    from mpomoe_ds.cli.train import run as train_cli

    config = tiny_run_config(tmp_path / "moe")
    config["moe"].update(ep_size=1, rotation_angle=0.3, layers="all")
    run, ds = write_configs(tmp_path, config)
    train_cli(["--config", str(run), "--deepspeed_config", str(ds)])
    written = json.loads((tmp_path / "moe" / "metrics.json").read_text())
    diversity = written["diversity"]
    for layer in (0, 1):
        assert 0.0 < diversity[f"diversity/layer{layer}/specific_energy"] < 1.0
        assert 0.0 <= diversity[f"routing/layer{layer}/entropy"] <= math.log(4) + 1e-9
        assert 0.0 <= diversity[f"routing/layer{layer}/task_expert_mi"] <= math.log(2) + 1e-9  # two tasks
    init = written["init_distance"]
    assert init["output_rel"] > 0
    assert len(init["weight_rel"]) == 2
    assert all(0.1 < d < 2.0 for block in init["weight_rel"].values() for d in block.values())
