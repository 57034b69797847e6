"""Benchmark reporting that feeds the README: the marker paste and the specialisation sweep's paired table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import specialisation  # noqa: E402

import common  # noqa: E402


def test_paste_into_readme_replaces_only_between_its_own_markers(tmp_path: Path) -> None:
    readme, md = tmp_path / "README.md", tmp_path / "table.md"
    readme.write_text("intro\n<!-- table.md -->\nold\nrows\n<!-- end table.md -->\nafter\n"
                      "<!-- other.md -->\nkept\n<!-- end other.md -->\n")
    md.write_text("| a |\n|---|\n| 1 |\n")
    assert common.paste_into_readme(md, readme)
    assert readme.read_text() == ("intro\n<!-- table.md -->\n| a |\n|---|\n| 1 |\n<!-- end table.md -->\nafter\n"
                                  "<!-- other.md -->\nkept\n<!-- end other.md -->\n")
    assert common.paste_into_readme(md, readme)  # idempotent
    assert readme.read_text().count("| 1 |") == 1
    unmarked = tmp_path / "plain.md"
    unmarked.write_text("x")
    before = readme.read_text()
    assert not common.paste_into_readme(unmarked, readme) and readme.read_text() == before


def test_paired_table_pairs_each_seed_with_copy_and_ffn() -> None:
    def run(steps: int, rows: dict[str, list[tuple[float, float]]]) -> dict:
        return {"meta": {"steps": steps, "seeds": 2},
                "results": {arm: [{"cosine": c, "loss": loss} for c, loss in r] for arm, r in rows.items()}}

    short = run(100, {"copy": [(0.9, 1.1), (0.8, 2.2)], "ffn": [(0.7, 1.0), (0.6, 2.0)],
                      "rot": [(0.5, 1.2), (0.6, 2.2)]})
    long = run(300, {"copy": [(0.9, 1.0), (0.9, 1.0)], "ffn": [(0.8, 1.0), (0.8, 1.0)]})
    table = specialisation.paired_table([short, long]).splitlines()
    rows = {line.split(" | ")[0].strip("| "): line for line in table if line.startswith("| ") and "---" not in line}
    assert list(rows)[-1] == "ffn"  # the loss reference closes the table
    # rot: d cosine per seed -0.4, -0.2 -> -0.300 +- 0.141; loss / ffn - 1: +20%, +10% -> +15.0% +- 7.1%
    assert rows["rot"] == "| rot | -0.300 +- 0.141 | +15.0% +- 7.1% |  |  |"
    assert rows["copy"].startswith("| copy | 0 (0.850) | +10.0% +- 0.0% | 0 (0.900) | +0.0% +- 0.0% |")
    assert rows["ffn"].endswith("| -0.100 +- 0.000 | 0 |")
    with pytest.raises(KeyError):
        specialisation.paired_table([run(100, {"copy": [(0.9, 1.0)]})])  # no FFN reference: no loss pairing


def test_layer_benchmark_files_aux_gather_runs_under_the_aux_gather_report() -> None:
    """A committed results file regenerates with one command: its name picks the report (no hand edits)."""
    import layer
    import report

    assert layer.report_name(["mpoe", "mpoe_aux", "ds"]) == "aux_gather_layer"
    assert layer.report_name(["mpoe", "ds", "ffn"]) == "layer"
    data = common.read_json(ROOT / "benchmarks" / "results" / "aux_gather_layer.json")
    assert data["benchmark"] == "aux_gather_layer" and hasattr(report, "write_aux_gather_report")


def test_a_smoke_run_outside_results_never_pastes_into_the_real_readme(tmp_path: Path) -> None:
    """``--out /tmp/x/aux_gather_layer.json`` writes its own .md; the committed README keeps its numbers."""
    md = tmp_path / "aux_gather_layer.md"  # a name the README has markers for
    md.write_text("| smoke |\n")
    before = common.README.read_text()
    assert "<!-- aux_gather_layer.md -->" in before
    assert not common.paste_into_readme(md)
    assert common.README.read_text() == before
