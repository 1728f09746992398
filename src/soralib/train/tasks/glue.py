"""The GLUE task table: text columns, label sets, metrics and evaluation splits of each task."""

from __future__ import annotations

from dataclasses import dataclass

from soralib.errors import InputError

# Tasks with >= this many training rows count as "large" in the SoRA paper's evaluation protocol.
LARGE_TASK_MIN_TRAIN_ROWS = 10_000


@dataclass(frozen=True)
class TaskSpec:
    """What the harness needs to know about a sentence(-pair) task.

    Attributes:
        name: task name (``"rte"``, ..., or ``"custom"``).
        text_columns: one or two text fields of a row, in the order they are fed to the tokenizer.
        num_labels: number of classes; 1 means regression (float labels).
        label_names: class names; a row's ``label`` is an index into this tuple (empty for regression).
        main_metric: the metric used for model selection (a key of ``compute_metrics``'s result).
        is_large: large tasks hold out training rows for validation in the paper protocol;
            small ones split the dev set in half.
        eval_splits: names of the dev splits, all of which are evaluated and reported.
    """

    name: str
    text_columns: tuple[str, ...]
    num_labels: int
    label_names: tuple[str, ...]
    main_metric: str
    is_large: bool
    eval_splits: tuple[str, ...] = ("validation",)

    @property
    def is_regression(self) -> bool:
        """True for a regression task (one output, float labels)."""
        return self.num_labels == 1


# Label orders follow the Hugging Face `nyu-mll/glue` dataset, so hub and TSV labels agree.
GLUE_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("cola", ("sentence",), 2, ("unacceptable", "acceptable"), "matthews_correlation", False),
        TaskSpec("sst2", ("sentence",), 2, ("negative", "positive"), "accuracy", True),
        TaskSpec("mrpc", ("sentence1", "sentence2"), 2, ("not_equivalent", "equivalent"), "f1", False),
        TaskSpec("qqp", ("question1", "question2"), 2, ("not_duplicate", "duplicate"), "f1", True),
        TaskSpec("stsb", ("sentence1", "sentence2"), 1, (), "pearson", False),
        TaskSpec(
            "mnli",
            ("premise", "hypothesis"),
            3,
            ("entailment", "neutral", "contradiction"),
            "accuracy",
            True,
            eval_splits=("validation_matched", "validation_mismatched"),
        ),
        TaskSpec("qnli", ("question", "sentence"), 2, ("entailment", "not_entailment"), "accuracy", True),
        TaskSpec("rte", ("sentence1", "sentence2"), 2, ("entailment", "not_entailment"), "accuracy", False),
    )
}


def get_task(name: str) -> TaskSpec:
    """Return the GLUE task called `name` (case-insensitive); InputError for an unknown name."""
    spec = GLUE_TASKS.get(name.lower())
    if spec is None:
        raise InputError(f"unknown task {name!r}; allowed: {', '.join(GLUE_TASKS)}")
    return spec
