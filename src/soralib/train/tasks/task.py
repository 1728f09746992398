"""`Task`: the part of a run that depends on the data: model head, features, collator, Trainer and metrics.

The classification tasks (GLUE from a TSV folder or the hub, custom CSV/JSONL) live here; causal-LM SFT in
sft.py. Every method loads its heavy libraries inside, so that importing a Task costs nothing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..rundir import METRICS, NUM_LABELS
from .glue import TaskSpec, get_task

if TYPE_CHECKING:
    from ..config import TrainConfig


class Task:
    """What `sora train`, `sora eval` and `sora export` ask of a kind of data.

    The defaults are those of sequence classification (GLUE and custom tasks): a classification head,
    sentence(-pair) tokenization, padding collator and logits metrics.
    """

    name: str = ""
    peft_task_type: str = "SEQ_CLS"
    """The PEFT task type of the adapters (which PeftModel class loads them)."""
    higher_is_better: bool = True
    """Whether a larger main metric is better (accuracy: yes; a validation loss: no)."""
    fields: tuple[str, ...] = ()
    """The TrainConfig fields only some tasks read that this one reads (train/rules.py refuses the others)."""
    label: str = ""
    """How the rules name this task in "is used only with task ..." messages."""
    max_length: int = 128
    """The default of --max-length: tokens per example."""
    rescorable: bool = True
    """`sora eval` can score a finished run of this task again."""

    def check(self, config: TrainConfig) -> None:
        """Raise InputError for a config this task cannot run (TrainConfig.validate calls it)."""

    def load_data(self, config: TrainConfig) -> tuple[TaskSpec, dict[str, list[dict[str, Any]]]]:
        """(spec, {"train", "validation", ...} rows) with the protocol's split and the sample limits applied."""
        from .. import data as data_mod

        spec, loaded = self.read(config)
        split_seed = config.seed if config.split_seed is None else config.split_seed
        splits = data_mod.make_splits(spec, loaded, config.protocol, split_seed)
        return spec, limit_samples(splits, config)

    def read(self, config: TrainConfig) -> tuple[TaskSpec, dict[str, list[dict[str, Any]]]]:
        from .. import data as data_mod

        spec = get_task(config.task)
        return spec, data_mod.load_glue_dir(spec, config.data_dir) if config.data_dir else data_mod.load_hub(spec)

    def saved_spec(self, config: TrainConfig, run: Path) -> TaskSpec:
        """The spec of a finished run in `run` without reading its data (for `sora export` and `sora ranks`)."""
        return get_task(config.task)

    def load_model(self, config: TrainConfig, spec: TaskSpec):
        """(model, tokenizer, fresh): the pretrained model with the task's head (see methods.load_base)."""
        from ..methods import load_base

        return load_base(config, spec.num_labels)

    def check_fits(self, config: TrainConfig, model, tokenizer, splits: dict) -> None:
        """Refuse what the wrapped `model` cannot do with these rows to the end of the run; called once the rows are
        tokenized and the model wrapped, before anything is written."""

    def features(self, config: TrainConfig, spec: TaskSpec, splits: dict, tokenizer) -> dict[str, Any]:
        """Each non-empty split's rows as model inputs with labels (checked against max_length)."""
        from .. import data as data_mod
        from ..run import cache_dir

        return {name: data_mod.tokenize_rows(rows, tokenizer, spec.text_columns, config.max_length, cache_dir())
                for name, rows in splits.items() if rows}

    def subset(self, features, indices: list[int]):
        """The features at `indices` (the memorization sample), in the form `evaluate` takes."""
        return [features[i] for i in indices]

    def trainer_parts(self, config: TrainConfig, spec: TaskSpec, tokenizer, args: dict[str, Any]):
        """(Trainer class, its arguments object, extra keyword arguments: collator and metrics)."""
        from transformers import DataCollatorWithPadding, TrainingArguments

        from ..loop import SoraTrainer, metrics_fn

        return SoraTrainer, TrainingArguments(**args), {"data_collator": DataCollatorWithPadding(tokenizer),
                                                        "compute_metrics": metrics_fn(spec)}

    def evaluate(self, trainer, features, split: str) -> dict[str, float]:
        """The task's metrics of `features` (logged with `split` as prefix), without the prefix."""
        out = trainer.evaluate(eval_dataset=features, metric_key_prefix=split)
        skip = ("runtime", "samples_per_second", "steps_per_second", "epoch", "model_preparation_time")
        return {k[len(split) + 1:]: float(v) for k, v in out.items()
                if k.startswith(split + "_") and k[len(split) + 1:] not in skip
                and not (isinstance(v, float) and math.isnan(v))}

    def final_metrics(self, model, tokenizer, config: TrainConfig, splits: dict, out: Path | None) -> dict[str, Any]:
        """Metrics measured once at the end beyond `evaluate` (SFT: exact match of generations); written files
        go to `out` (None: nothing written)."""
        return {}


class ClassificationTask(Task):
    name, label = "glue", "a GLUE task"
    fields = ("data_dir", "protocol", "task_type")


class CustomTask(ClassificationTask):
    """Sentence(-pair) classification or regression from the user's CSV/JSONL files."""

    name = label = "custom"
    fields = ("train_file", "validation_file", "text_columns", "label_column", "protocol", "task_type")

    def check(self, config: TrainConfig) -> None:
        from ...errors import InputError

        if not (config.train_file and config.validation_file and config.text_columns):
            raise InputError("task custom needs train_file, validation_file and text_columns")

    def read(self, config: TrainConfig):
        from .. import data as data_mod

        loaded, spec = data_mod.load_custom(config.train_file, config.validation_file, config.text_columns,
                                            config.label_column, config.task_type)
        return spec, loaded

    def saved_spec(self, config: TrainConfig, run: Path) -> TaskSpec:
        import json

        from ...errors import InputError

        if not (run / METRICS).is_file():  # sora_adapter/ is written before the final evaluation, metrics.json after
            raise InputError(f"{run} did not finish (no metrics.json, which holds the custom task's number of "
                             "labels); finish it with sora train --resume")
        num_labels = int(json.loads((run / METRICS).read_text()).get(NUM_LABELS, 2))
        return TaskSpec("custom", tuple(config.text_columns or ()), num_labels, (), "", False)


def limit_samples(splits: dict[str, list], config: TrainConfig) -> dict[str, list]:
    """The first max_train_samples training rows and max_eval_samples rows of every other split."""
    if config.max_train_samples:
        splits["train"] = splits["train"][: config.max_train_samples]
    if config.max_eval_samples:
        splits = {k: (v[: config.max_eval_samples] if v and k != "train" else v) for k, v in splits.items()}
    return splits
