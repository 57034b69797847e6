"""Honest metrics: eval loss over real rows from gathered predictions; result files stay strict JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mpomoe_ds.training.checkpoint import atomic_write_json
from mpomoe_ds.training.evaluate import eval_loss


def test_classification_eval_loss_is_the_mean_cross_entropy_of_the_real_rows():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(7, 3)), rng.integers(0, 3, size=7)
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert eval_loss("classification", logits, labels) == pytest.approx(-log_probs[np.arange(7), labels].mean(),
                                                                        rel=1e-6)


def test_regression_and_lm_eval_losses_follow_the_model_definitions():
    preds, gold = np.array([0.5, 2.0, -1.0]), np.array([1.0, 2.0, 0.0])
    assert eval_loss("regression", preds, gold) == pytest.approx((0.25 + 0 + 1) / 3, rel=1e-6)
    # lm rows: (summed token NLL, tokens); a padded row contributes (0, 0) and changes nothing
    rows = np.array([[6.0, 3.0], [2.0, 1.0], [0.0, 0.0]])
    assert eval_loss("lm", rows, np.zeros(3)) == pytest.approx(8.0 / 4.0)


def test_result_files_write_non_finite_values_as_null(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"loss": math.nan, "nested": [1.0, math.inf], "ok": 2.5})
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == {
        "loss": None, "nested": [1.0, None], "ok": 2.5}
