"""`sora train` as a function: data → method → stages → budget → evaluation → export → metrics.

What lands in the run directory:
    config.yaml      everything used            metrics.json    task, method, seed, eval, kept_params, ...
    adapter/         standard LoRA (SoRA, LoRA) sparsity.json   per-module kept ranks (SoRA)
    sora_adapter/    the gated SoRA adapter     model/          trained parameters (full, BitFit)
    history.jsonl    one line per logging step  stages.jsonl    one line per scheduler stage
    stages/stage-k/  each stage's SoRA adapter  checkpoints/    resumable Trainer checkpoints
    logs/            TensorBoard                .sora.lock      held while a run writes (rundir.py)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

import soralib

from ..budget import trim_model_
from ..errors import InputError
from ..io import atomic_dir, atomic_write_json, atomic_write_text, disk_full
from . import data as data_mod
from .checkpoints import history_size, latest_checkpoint, resume_hint, rewind_history
from .config import TrainConfig, save_yaml
from .loop import is_main_process, make_trainer
from .methods import adapter_size, get_method, within
from .resume import check_same_rows, resumed_config
from .rundir import (ADAPTER, CONFIG, EVAL, EVAL_ROWS, HIGHER_IS_BETTER, HISTORY, LABEL_NAMES, LOCK, MAIN_METRIC,
                     METHOD,
                     METRICS, MODEL, NUM_LABELS, REPLACED, SEED, SKIPPED_STEPS, SPARSITY, STAGES, STATE, STEPS, TASK,
                     TRAIN_SECONDS, foreign, in_use, lock_holder, refuse_foreign, remove_run, run_lock, written_by_sora)
from .tasks import task_of

logger = logging.getLogger(__name__)
RUN_MARKERS = (CONFIG, STATE)


def check_output_dir(config: TrainConfig, overwrite: bool, resume: bool) -> bool:
    """Refuse to mix two runs in one directory, or to delete what a run did not write (see rundir.py).
    Writes nothing; True if an old run must be replaced."""
    out = Path(config.output_dir or "")
    if not config.output_dir:
        raise InputError("--output-dir is required")
    if overwrite and resume:
        raise InputError("--overwrite and --resume exclude each other")
    if out.is_symlink() and not out.exists():
        raise InputError(f"output directory {out} is a symlink to {os.readlink(out)}, which does not exist")
    holder = lock_holder(out) if out.is_dir() and is_main_process() else None  # rank 0 takes it, not the others
    if holder:
        raise InputError(in_use(out, holder))
    is_run = any((out / m).exists() for m in RUN_MARKERS)
    if resume:
        if not is_run:
            raise InputError(f"nothing to resume in {out}: no config.yaml from an earlier run")
        if (out / METRICS).exists():
            raise InputError(f"the run in {out} is finished (metrics.json exists); nothing to resume")
        refuse_foreign(out, [p for p in foreign(out) if REPLACED.match(p)], "cannot resume in")
        return False
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            raise InputError(f"output directory {out}: {parent} is a file")
    if out.exists() and any(p.name != LOCK for p in out.iterdir()):  # a lock alone: a start killed at once
        if not overwrite and not is_run:  # no flag would help: --overwrite deletes only a run, --resume goes on one
            raise InputError(f"output directory {out} is not empty and holds no soralib run (no config.yaml); choose "
                             "another --output-dir")
        if not overwrite:
            raise InputError(f"output directory {out} is not empty; pass --overwrite to replace it or --resume")
        if not is_run:
            raise InputError(f"refusing to overwrite {out}: it is not a soralib run directory (no config.yaml)")
        if (out / CONFIG).exists() and not written_by_sora(out / CONFIG):
            raise InputError(f"refusing to overwrite {out}: it is not a soralib run directory (its config.yaml "
                             "was not written by sora train)")
        refuse_foreign(out, foreign(out), "refusing to overwrite")
        return True
    return False


def load_splits(config: TrainConfig):
    """(task spec, {"train", "validation", "test", ...} rows) with the sample limits applied."""
    return task_of(config.task).load_data(config)


def cache_dir() -> Path:
    return Path(os.environ.get("SORALIB_CACHE", Path.home() / ".cache" / "soralib"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def train(config: TrainConfig, overwrite: bool = False, resume: bool = False, show_progress: bool = False) -> dict:
    """Run one experiment end to end; returns what metrics.json holds.

    The main process holds the output directory's lock from its first write to the end (a second `sora train`
    there is refused, naming its pid); a write that fails for lack of space raises DiskFull. Ctrl-C raises
    KeyboardInterrupt with a one-line message: the command that resumes and its checkpoint."""
    with contextlib.ExitStack() as lock:
        try:
            return _train(config, overwrite, resume, show_progress, lock)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(resume_hint(Path(config.output_dir))) from None
        except Exception as err:
            full = disk_full(err, config.output_dir or ".")
            if full is None or full is err:
                raise
            raise full from err


def _train(config: TrainConfig, overwrite: bool, resume: bool, show_progress: bool,
           lock: contextlib.ExitStack) -> dict:
    if resume and not overwrite and _no_run_yet(config.output_dir):  # killed before it wrote anything
        logger.warning("--resume: no run in %s yet; starting it from scratch", config.output_dir)
        resume = False
    if not resume:
        config.validate()
    check_output_dir(config, overwrite, resume)
    if resume:  # the saved run's config wins (flags that disagree are refused); the output directory may differ
        config = resumed_config(Path(config.output_dir or "."), config)
    thresholds = config.stage_thresholds()
    # Everything that can fail on bad input (data, model path, tokenizer) runs before anything is written.
    task = task_of(config.task)
    spec, splits = task.load_data(config)
    rows = {name: data_mod.rows_fingerprint(r) for name, r in splits.items() if r is not None}
    if resume:
        check_same_rows(Path(config.output_dir), _read_json(Path(config.output_dir) / STATE, {}), rows)
    seed_everything(config.seed)
    model, tokenizer, fresh = task.load_model(config, spec)
    data_mod.check_max_length(config.max_length, model)
    fresh = [m for m in fresh if not within(m, config.modules_to_save or ())]  # listed already: no nested wrapper
    # Full fine-tuning saves every parameter anyway; a resumed run keeps its saved config and optimizer groups.
    method = get_method(config.method)
    if fresh and not method.trains_all and not resume:
        logger.warning("%s not in the checkpoint (randomly initialised): trained and saved with the result",
                       ", ".join(fresh))
        config = replace(config, modules_to_save=[*(config.modules_to_save or ()), *fresh])
    features = task.features(config, spec, splits, tokenizer)
    memorize = random.Random(config.seed).sample(range(len(features["train"])),
                                                 min(config.memorization_samples, len(features["train"])))
    steps = _steps_per_stage(config, len(features["train"]))  # packed SFT rows: an upper bound
    seed_everything(config.seed)  # the adapter's init must not depend on how much tokenizing happened
    # bad target modules fail here, before any write; so does a budget the model cannot meet
    model = method.wrap(config, model, total_steps=steps, adapter_budget=config.target_params)
    budget = method.budget(config, model)
    task.check_fits(config, model, tokenizer, splits)
    out = Path(config.output_dir)
    processes = PartialState()  # under torchrun: one per rank, and only rank 0 writes
    # On CPU this PartialState is not distributed yet (Trainer sets that up): every rank calls itself main and
    # the barrier below waits for no one. RANK tells them apart, and only rank 0 takes the lock and writes.
    fresh_state = {"stages_done": 0, "train_seconds": 0.0, "skipped_steps": 0, "history_bytes": 0, "data_rows": rows}
    if processes.is_main_process and is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        lock.enter_context(run_lock(out))
        if check_output_dir(config, overwrite, resume):  # again, locked: another run may have written meanwhile
            remove_run(out)  # only now, with data and model loaded: a failed start must not cost the old run
        if not resume:
            # the data it started with, first: a run killed between the two is still checked when resumed
            atomic_write_json(out / STATE, fresh_state)
            save_yaml(config, out / CONFIG)
    processes.wait_for_everyone()
    # A new run starts from zero; under torchrun on CPU, rank 1 can get here before rank 0 deleted the old run.
    state = _read_json(out / STATE, fresh_state) if resume else fresh_state

    for stage, threshold in enumerate(thresholds, start=1):
        stage_dir = out / "stages" / f"stage-{stage}"
        if stage <= state["stages_done"]:
            continue
        if stage > 1 and state["stages_done"] == stage - 1 and resume:
            _load_adapter(model, out / "stages" / f"stage-{stage - 1}" / ADAPTER)
        trainer = make_trainer(config, model, tokenizer, features["train"], spec, out, stage, threshold,
                               show_progress, budget if stage == len(thresholds) else None,
                               eval_features=features["validation"], seconds_before=state["train_seconds"], task=task)
        checkpoint = latest_checkpoint(Path(trainer.args.output_dir)) if resume else None
        if checkpoint:
            method.check_checkpoint(Path(checkpoint))
        if resume and processes.is_main_process:
            rewind_history(out / HISTORY, checkpoint, state)
        trainer.train(resume_from_checkpoint=checkpoint)
        state["train_seconds"] = trainer.training_seconds()  # evaluations excluded; a resume keeps the time before
        state["skipped_steps"] = state.get("skipped_steps", 0) + trainer.nonfinite.skipped
        if budget:
            trim_model_(model, *budget, config.effective_min_rank())  # held by the controller already; the guarantee
        if config.schedule or config.thresholds:  # a schedule's stages, even one: stages.jsonl, memorization
            _finish_stage(trainer, task, model, spec, features, memorize, stage, threshold, stage_dir, out)
        if stage < len(thresholds) and processes.is_main_process:
            # The last stage is never marked done: metrics.json marks the run done, and a run killed
            # before writing it resumes the last stage from its newest checkpoint.
            state["stages_done"], state["history_bytes"] = stage, history_size(out / HISTORY)
            atomic_write_json(out / STATE, state)
    return _finish_run(trainer, task, model, tokenizer, config, spec, splits, features, out, state, rows)


def _finish_stage(trainer, task, model, spec, features, memorize, stage, threshold, stage_dir, out) -> None:
    report = soralib.sparsity_report(model)
    line = {
        "stage": stage, "threshold": threshold, "kept_params": report["kept_params"],
        "kept_rank": report["kept_rank"], "kept_fraction": report["kept_fraction"],
        "main_metric": spec.main_metric,
        "generalization": task.evaluate(trainer, features["validation"], "validation"),
        "memorization": task.evaluate(trainer, task.subset(features["train"], memorize), "memorization"),
        "checkpoint": f"stages/stage-{stage}",
    }
    if trainer.args.should_save:
        with atomic_dir(stage_dir / ADAPTER) as tmp:
            model.save_pretrained(str(tmp))
        atomic_write_json(stage_dir / SPARSITY, report)
        lines = _read_lines(out / STAGES)
        lines = [x for x in lines if x["stage"] < stage] + [line]
        atomic_write_text(out / STAGES, "".join(json.dumps(x) + "\n" for x in lines))


def _finish_run(trainer, task, model, tokenizer, config, spec, splits, features, out, state, rows) -> dict:
    metrics: dict[str, Any] = {
        TASK: config.task, METHOD: config.method, SEED: config.seed, MODEL: config.model,
        MAIN_METRIC: spec.main_metric, HIGHER_IS_BETTER: task.higher_is_better,
        EVAL: task.evaluate(trainer, features["validation"], "validation"),
        **adapter_size(config, model),
        TRAIN_SECONDS: round(state["train_seconds"], 3),
        STEPS: trainer.state.global_step,
        SKIPPED_STEPS: state.get("skipped_steps", 0),
        NUM_LABELS: spec.num_labels,
        **({LABEL_NAMES: list(spec.label_names)} if spec.label_names else {}),
        EVAL_ROWS: {name: digest for name, digest in rows.items() if name != "train"},  # hashed once, at the start
    }
    for name in features:
        if name not in ("train", "validation"):
            metrics[name] = task.evaluate(trainer, features[name], name)
    # On every rank: SFT shares its generations out among the ranks (SftTask.final_metrics); rank 0 writes.
    writes = trainer.args.should_save
    metrics[EVAL].update(task.final_metrics(model, tokenizer, config, splits, out if writes else None))
    if writes:
        get_method(config.method).export(model, config, out)
        atomic_write_json(out / METRICS, metrics)
    return metrics


def _steps_per_stage(config: TrainConfig, n_train: int) -> int:
    if config.max_steps > 0:
        return config.max_steps
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_epoch = max(1, -(-n_train // (config.batch_size * world)) // config.gradient_accumulation_steps)
    return max(1, int(per_epoch * config.epochs))


def _load_adapter(model, path: Path) -> None:
    import peft
    from safetensors.torch import load_file

    peft.set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))


def _no_run_yet(output_dir: str) -> bool:
    out = Path(output_dir)
    # a lock file alone: a start killed right after taking it
    return bool(output_dir) and (not out.exists() or (out.is_dir() and not any(p.name != LOCK for p in out.iterdir())))


def _read_json(path: Path, default: dict) -> dict:
    return json.loads(path.read_text()) if path.is_file() else dict(default)


def _read_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
