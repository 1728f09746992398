"""GLUE metrics from model outputs: Matthews correlation, Pearson/Spearman, F1 and accuracy."""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from soralib.train.tasks import TaskSpec

F1_TASKS = ("mrpc", "qqp")


def compute_metrics(task_spec: TaskSpec, predictions, labels) -> dict[str, float]:
    """Metrics of a task from logits `predictions` and gold `labels`.

    Classification: predictions are logits of shape (n, num_labels), reduced by argmax (an already
    reduced 1-D array of class ids is accepted too). Regression: predictions of shape (n,) or (n, 1).

    Returned keys: CoLA ``matthews_correlation``; regression (STS-B) ``pearson``, ``spearmanr`` and
    their mean ``combined`` (an undefined correlation, e.g. of constant predictions, counts as 0);
    MRPC/QQP ``f1`` and ``accuracy``; other tasks ``accuracy``.
    """
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if task_spec.is_regression:
        predictions = predictions.reshape(len(predictions), -1)[:, 0].astype(np.float64)
        pearson = _correlation(pearsonr, predictions, labels.astype(np.float64))
        spearman = _correlation(spearmanr, predictions, labels.astype(np.float64))
        return {"pearson": pearson, "spearmanr": spearman, "combined": (pearson + spearman) / 2}
    if predictions.ndim == 2:
        predictions = predictions.argmax(axis=-1)
    labels = labels.astype(np.int64)
    if task_spec.name == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(labels, predictions))}
    metrics = {"accuracy": float(accuracy_score(labels, predictions))}
    if task_spec.name in F1_TASKS:
        metrics["f1"] = float(f1_score(labels, predictions))
    return metrics


def _correlation(function, predictions: np.ndarray, labels: np.ndarray) -> float:
    """A correlation coefficient, 0.0 when undefined (constant input or fewer than 2 points)."""
    if len(predictions) < 2:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on constant input and returns nan
        value = float(function(predictions, labels)[0])
    return 0.0 if math.isnan(value) else value


def main_metric(task_spec: TaskSpec) -> str:
    """The metric used for model selection (higher is better)."""
    return task_spec.main_metric
