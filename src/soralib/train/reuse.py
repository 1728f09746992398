"""Use a finished run again: re-evaluate it (`sora eval`), re-export it (`sora export`) or read its ranks
(`sora ranks`)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

from ..errors import InputError
from .config import TrainConfig
from .rundir import CONFIG, EVAL_ROWS, LABEL_NAMES, METRICS, SORA_ADAPTER, run_holding

logger = logging.getLogger(__name__)


def load_run_config(run_dir: str | Path) -> TrainConfig:
    from .config import load_saved

    run = Path(run_dir)
    if not (run / CONFIG).is_file():
        raise InputError(f"not a soralib run directory: {run} (no config.yaml)")
    return load_saved(run / CONFIG)


def load_trained_model(run_dir: str | Path, config: TrainConfig, spec):
    """The base model with the run's result applied: exported adapter, or trained parameters (checked to fit the
    base model and to be finite before any is applied)."""
    from .methods import get_method
    from .tasks import task_of

    run = Path(run_dir)
    model, tokenizer, fresh = task_of(config.task).load_model(config, spec)
    _warn_unsaved(config, fresh)
    return get_method(config.method).load_result(model, run).eval(), tokenizer


def evaluate_run(run_dir: str | Path, data_dir: str | None = None) -> dict[str, dict[str, float]]:
    """Metrics of every evaluation split of the run's task, recomputed from the saved result.

    A result whose outputs hold NaN or Inf is refused (`InputError`: `sora eval` exits 2, the saved run being the
    bad input) instead of scored: argmax over NaN logits gives a plausible-looking accuracy."""
    import tempfile

    from transformers import DataCollatorWithPadding, PrinterCallback, Trainer, TrainingArguments

    from . import data as data_mod
    from .config import unused_reason
    from .loop import evaluate, metrics_fn
    from .run import cache_dir, load_splits
    from .tasks import task_of

    config = load_run_config(run_dir)
    if not task_of(config.task).rescorable:
        raise InputError(f"{run_dir}: sora eval re-scores classification runs; an sft run's scores are in its "
                         "metrics.json (validation loss, perplexity, exact match)")
    if data_dir is not None:
        unused = unused_reason(config, "data_dir")  # a custom run re-reads the files its config.yaml names
        if unused:
            raise InputError(f"{run_dir}: --data-dir {unused}; the run re-reads its own train_file and validation_file")
        config = replace(config, data_dir=data_dir)
    spec, splits = load_splits(config)
    _check_same_data(Path(run_dir), spec, splits)
    model, tokenizer = load_trained_model(run_dir, config, spec)
    with tempfile.TemporaryDirectory(prefix="sora-eval-") as scratch:  # Trainer wants an output_dir
        args = TrainingArguments(output_dir=scratch, per_device_eval_batch_size=config.eval_batch_size,
                                 report_to=[], disable_tqdm=True, use_cpu=True)
        trainer = Trainer(model=model, args=args, data_collator=DataCollatorWithPadding(tokenizer))
        trainer.remove_callback(PrinterCallback)
        results = {}
        for name, rows in splits.items():
            if rows and name != "train":
                trainer.compute_metrics = _finite_only(metrics_fn(spec), run_dir, name)
                results[name] = evaluate(trainer, data_mod.tokenize_rows(rows, tokenizer, spec.text_columns,
                                                                         config.max_length, cache_dir()), name,
                                         task_of(config.task))
        return results


def _check_same_data(run: Path, spec, splits: dict) -> None:
    """The data as it is now against what metrics.json recorded at training (a run older than a record is not
    checked for it). A custom run's classes come from its training file: a class added or removed since would
    shift the label ids under the trained head. The rows of each evaluated split must be those the run was scored
    on: rows added to a custom run's file move its held-out halves (--protocol paper), a changed data directory
    its scores, both silently."""
    from .data import rows_fingerprint

    metrics = json.loads((run / METRICS).read_text()) if (run / METRICS).is_file() else {}
    saved = metrics.get(LABEL_NAMES)
    if saved is not None and list(saved) != list(spec.label_names):
        raise InputError(f"{run}: the classes changed since training: trained on {', '.join(map(str, saved))}; the "
                         f"data now gives {', '.join(spec.label_names) or 'none (regression)'}; restore the training "
                         "file the run was trained on")
    saved = metrics.get(EVAL_ROWS) or {}
    for name, rows in splits.items():
        if name in saved and rows is not None and rows_fingerprint(rows) != saved[name]:
            raise InputError(f"{run}: the {name} rows differ from the ones the run was scored on (the data changed "
                             f"since training); restore the data the run was trained on")


def _finite_only(compute, run_dir, split: str):
    """`compute` (a Trainer compute_metrics), refusing predictions that hold NaN or Inf."""
    import numpy as np

    def check(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        if not np.isfinite(np.asarray(logits, dtype=np.float64)).all():
            raise InputError(f"{run_dir}: the model's outputs on {split} hold NaN or Inf; the saved result is broken, "
                             "so no score is reported")
        return compute(prediction)
    return check


def export_run(run_dir: str | Path, layout: str, out_dir: str | None = None) -> Path:
    """Re-export a SoRA run's gated adapter (sora_adapter/) as a standard LoRA with `layout`. `out_dir` is new or an
    earlier export (export.MARK), in no run but this one's adapter-NAME/: nothing else is ever replaced."""
    import soralib.export  # the submodule itself: `import soralib` alone loads it only on first use of a name

    from ..io import foreign_entries, name_list

    run = Path(run_dir)
    _sora_run_config(run)
    if layout not in soralib.export.LAYOUTS:
        raise InputError(f"layout must be one of {', '.join(soralib.export.LAYOUTS)}, got {layout!r}")
    out = Path(out_dir) if out_dir else run / f"adapter-{layout}"
    inside = out.resolve() == run.resolve() or run.resolve() in out.resolve().parents
    if inside and not (out.resolve().parent == run.resolve() and out.name.startswith("adapter-")):
        raise InputError(f"--out {out} would overwrite part of the run {run}; use {run}/adapter-NAME or another dir")
    other = run_holding(out)
    if other is not None and other != run.resolve():
        raise InputError(f"--out {out} is inside another run, {other}; choose a directory outside it")
    if out.is_dir() and any(out.iterdir()) and not (out / "adapter_config.json").is_file():
        raise InputError(f"--out {out} is a non-empty directory that is not an adapter; choose another")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; choose a directory")
    in_the_way = foreign_entries(out, soralib.export.FILES)  # an earlier export is replaced, nothing else
    if in_the_way:
        raise InputError(f"--out {out} holds {name_list(in_the_way)}, which an export does not write; "
                         "move them out or choose another --out")
    # the run's own adapter-exact/ and adapter-uniform/ (rundir.RUN) may come from a version that wrote no MARK
    own = inside and out.name in {f"adapter-{name}" for name in soralib.export.LAYOUTS}
    if out.is_dir() and any(out.iterdir()) and not own and not soralib.export.written_by_export(out):
        raise InputError(f"--out {out} holds an adapter that sora export did not write, which it never replaces; "
                         "choose another --out")
    return soralib.export_lora(load_sora_run(run), out, layout=layout)


def ranks_run(run_dir: str | Path, out: str | None = None) -> str:
    """The JSON of a complete `peft.LoraConfig` giving each module the rank the run kept (`soralib.lora_config_from`);
    written atomically to `out`, a new file outside every run, when given. It is what `LoraConfig.save_pretrained`
    writes: `LoraConfig(**json.load(f))` rebuilds it, and saved as DIR/adapter_config.json,
    `LoraConfig.from_pretrained(DIR)` reads it."""
    import soralib

    from ..io import atomic_write_text

    run = Path(run_dir)
    _sora_run_config(run)
    if out is not None:
        _check_ranks_out(Path(out), run)
    config = soralib.lora_config_from(load_sora_run(run))
    text = json.dumps({k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()},
                      indent=2, sort_keys=True) + "\n"
    if out is not None:
        atomic_write_text(out, text)
    return text


def _check_ranks_out(out: Path, run: Path) -> None:
    """A new file outside every run: `sora ranks` replaces nothing (a data file of yours, a run's config.yaml)."""
    whole = run.resolve()  # `sora ranks .` has no name of its own
    beside = whole.parent / f"{whole.name}-ranks.json"
    hint = f"give a JSON file path such as {os.path.relpath(beside)}"
    if out.is_dir() or not out.resolve().parent.is_dir():
        what = "is a directory" if out.is_dir() else "is in a directory that does not exist"
        raise InputError(f"--out {out} {what}; {hint} (outside the run, which --overwrite would refuse)")
    holder = run_holding(out.parent)
    if holder is not None:
        raise InputError(f"--out {out} is inside the run {holder}; {hint} outside every run")
    if out.exists() or out.is_symlink():
        raise InputError(f"--out {out} exists; sora ranks writes a new file and replaces none: {hint} that does "
                         "not exist yet, or move the file away")


def load_sora_run(run_dir: str | Path):
    """The base model with the run's gated adapter (sora_adapter/) loaded, for export and rank reading."""
    import soralib

    from .methods import base_model_name
    from .tasks import task_of

    run = Path(run_dir)
    config = _sora_run_config(run)
    task = task_of(config.task)
    base, _, fresh = task.load_model(config, task.saved_spec(config, run))
    _warn_unsaved(config, fresh)
    model = soralib.load_adapter_safely(base, run / SORA_ADAPTER)
    # runs saved before load_base named the base portably recorded the venv path of "minilm"
    model.peft_config["default"].base_model_name_or_path = base_model_name(config.model)
    return model


def _sora_run_config(run: Path) -> TrainConfig:
    config = load_run_config(run)
    from .methods import get_method

    if not get_method(config.method).gated:
        raise InputError(f"{run} was trained with method {config.method}, not sora: only a SoRA run has gates")
    if not (run / SORA_ADAPTER / "adapter_config.json").is_file():
        raise InputError(f"{run} is not a finished SoRA run (no sora_adapter/)")
    return config


def _warn_unsaved(config: TrainConfig, fresh: list[str]) -> None:
    """A run from before soralib saved them: its randomly initialised modules are drawn anew at every load."""
    from .methods import get_method, within

    trains_all = get_method(config.method).trains_all
    lost = [m for m in fresh if not trains_all and not within(m, config.modules_to_save or ())]
    if lost:
        logger.warning("%s not in the checkpoint nor saved with this run: randomly initialised again, so the "
                       "outputs differ from training", ", ".join(lost))
