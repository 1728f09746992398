"""GLUE metrics agree with sklearn/scipy computed independently on fixed predictions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from soralib.train.metrics import compute_metrics, main_metric
from soralib.train.tasks import GLUE_TASKS, TaskSpec, get_task

# Two-class logits whose argmax is PRED (worked out by hand, not by the code under test).
LOGITS = np.array([[2.0, -1.0], [0.1, 0.3], [-0.5, 1.5], [3.0, 2.0], [0.0, 4.0], [1.0, 0.9], [-2.0, -1.0], [0.2, 0.1]])
PRED = [0, 1, 1, 0, 1, 0, 1, 0]
GOLD = [0, 1, 0, 0, 1, 1, 1, 1]


def test_cola_matthews_correlation_matches_sklearn():
    metrics = compute_metrics(get_task("cola"), LOGITS, GOLD)
    assert metrics == {"matthews_correlation": pytest.approx(matthews_corrcoef(GOLD, PRED))}
    assert metrics["matthews_correlation"] == pytest.approx(0.2581988897)


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_mrpc_and_qqp_report_f1_and_accuracy_matching_sklearn(task):
    metrics = compute_metrics(get_task(task), LOGITS, np.array(GOLD))
    assert metrics == {"accuracy": pytest.approx(accuracy_score(GOLD, PRED)), "f1": pytest.approx(f1_score(GOLD, PRED))}
    assert metrics["accuracy"] == pytest.approx(5 / 8)


@pytest.mark.parametrize("task", ["sst2", "qnli", "rte"])
def test_other_binary_tasks_report_accuracy_only(task):
    assert compute_metrics(get_task(task), LOGITS, GOLD) == {"accuracy": pytest.approx(accuracy_score(GOLD, PRED))}


def test_mnli_accuracy_uses_argmax_over_three_classes():
    logits = np.array([[0.1, 0.5, 0.2], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.3, 0.2, 0.1]])
    gold = [1, 0, 1, 2]
    expected = accuracy_score(gold, [1, 0, 2, 0])
    assert compute_metrics(get_task("mnli"), logits, gold) == {"accuracy": pytest.approx(expected)}


def test_stsb_pearson_spearman_and_combined_match_scipy():
    predictions = np.array([[4.8], [0.3], [2.2], [3.9], [1.1], [2.9]])
    gold = [5.0, 0.0, 2.6, 3.2, 1.6, 2.4]
    flat = [4.8, 0.3, 2.2, 3.9, 1.1, 2.9]
    pearson, spearman = pearsonr(flat, gold)[0], spearmanr(flat, gold)[0]
    metrics = compute_metrics(get_task("stsb"), predictions, gold)
    assert metrics == {
        "pearson": pytest.approx(pearson),
        "spearmanr": pytest.approx(spearman),
        "combined": pytest.approx((pearson + spearman) / 2),
    }
    assert compute_metrics(get_task("stsb"), np.array(flat), gold) == metrics  # (n,) works like (n, 1)


def test_constant_regression_predictions_give_zero_correlation_not_nan():
    metrics = compute_metrics(get_task("stsb"), np.full((4, 1), 2.5), [1.0, 2.0, 3.0, 4.0])
    assert metrics == {"pearson": 0.0, "spearmanr": 0.0, "combined": 0.0}


def test_class_id_predictions_are_accepted_as_well_as_logits():
    assert compute_metrics(get_task("rte"), np.array(PRED), GOLD) == compute_metrics(get_task("rte"), LOGITS, GOLD)


def test_custom_regression_task_gets_correlations():
    spec = TaskSpec("custom", ("t",), 1, (), "pearson", False)
    metrics = compute_metrics(spec, [[0.1], [0.5], [0.9]], [0.0, 0.4, 1.0])
    assert metrics["pearson"] == pytest.approx(pearsonr([0.1, 0.5, 0.9], [0.0, 0.4, 1.0])[0])
    assert main_metric(spec) == "pearson"


@pytest.mark.parametrize("task", sorted(GLUE_TASKS))
def test_main_metric_is_one_of_the_computed_metrics(task):
    spec = get_task(task)
    n = spec.num_labels
    logits = np.eye(max(n, 2))[[0, 1, 1, 0]][:, :n] if n > 1 else np.array([[1.0], [2.0], [3.0], [2.5]])
    labels = [0, 1, 0, 0] if n > 1 else [1.0, 2.0, 2.5, 3.0]
    assert main_metric(spec) in compute_metrics(spec, logits, labels)
    expected = {"cola": "matthews_correlation", "stsb": "pearson", "mrpc": "f1", "qqp": "f1"}.get(task, "accuracy")
    assert main_metric(spec) == expected
