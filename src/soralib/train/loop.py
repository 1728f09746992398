"""One training stage on transformers' Trainer, plus the few hooks SoRA and budgets need (AdaLoRA's: allocator.py).

Trainer brings DDP under `torchrun` / `accelerate launch`, gradient clipping, the linear warm-up/decay
schedule, length-grouped batches, checkpoints that resume exactly (optimizer state, which holds the
threshold, scheduler, RNG, data position) and TensorBoard. Everything SoRA adds is in this file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import PrinterCallback, Trainer, TrainerCallback

from ..budget import steer_to_budget
from ..optim import set_threshold
from ..errors import TrainingDiverged
from .checkpoints import CLOCK, CompleteCheckpoints, ResumedAtTheEnd, latest_checkpoint
from .config import TrainConfig
from .methods import get_method
from .rundir import HISTORY
from .sampler import LengthGroupedEpochs

logger = logging.getLogger(__name__)


class SoraTrainer(Trainer):
    """Trainer + the method's extra loss term (SoRA's optional ℓ1 gate term) and log scalars (SoRA's threshold and
    kept size) in every log line (TensorBoard and history.jsonl); evaluations report the task loss alone."""

    def __init__(self, *args, run: TrainConfig, history: Path, stage: int, seconds_before: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.run, self.history, self.stage = run, history, stage
        self.seconds_before = seconds_before  # training seconds of the earlier stages
        self.started, self.eval_seconds = time.perf_counter(), 0.0
        self.last_eval: tuple | None = None  # (dataset, (step, ignore_keys, weights), metrics): see evaluate
        self.eval_logs: dict | None = None  # what an evaluation in progress logs, as Trainer hands it over
        self.add_callback(CompleteCheckpoints(self))  # marks each checkpoint complete, keeps the newest two
        self.add_callback(ResumedAtTheEnd())

    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        self.started, self.eval_seconds = time.perf_counter(), 0.0
        clock = Path(resume_from_checkpoint) / CLOCK if resume_from_checkpoint else None
        if clock is not None and clock.is_file():  # the work after that checkpoint is redone, and counted again
            saved = json.loads(clock.read_text())
            self.seconds_before = saved["training_seconds"]
            self.nonfinite.skipped = saved.get("skipped_steps", 0)
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        except KeyboardInterrupt:  # end the progress bars' line: the message about resuming gets its own line
            for callback in self.callback_handler.callbacks:
                for bar in (getattr(callback, "training_bar", None), getattr(callback, "prediction_bar", None)):
                    if bar is not None:
                        bar.close()
            raise

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Trainer writes each checkpoint's model files here: the method saves what training goes on from
        with get_method(self.run.method).checkpointing(_unwrap(self.model)):
            super().save_model(output_dir, _internal_call)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        # Resumed from the checkpoint of the last step (--max-steps inside an epoch): Trainer checks for the end
        # only after a step, so it would train one more. No batch, no step; the loop ends here.
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def get_train_dataloader(self) -> DataLoader:
        if self.args.train_sampling_strategy != "group_by_length":
            return super().get_train_dataloader()  # random order: accelerate seeds it with data_seed + epoch
        lengths = [len(feature["input_ids"]) for feature in self.train_dataset]
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        # The state's epoch is e + (steps done in epoch e) / (steps per epoch): whole only at an epoch's end.
        sampler = LengthGroupedEpochs(lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                      seed, epoch=lambda: int(self.state.epoch or 0))
        # The features hold only what the tokenizer gives the model, and labels: no columns to remove.
        loader = DataLoader(self.train_dataset, batch_size=self.args.train_batch_size, sampler=sampler,
                            collate_fn=self.data_collator, drop_last=self.args.dataloader_drop_last,
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    @property
    def nonfinite(self) -> "NonFiniteGuard":
        return next(c for c in self.callback_handler.callbacks if isinstance(c, NonFiniteGuard))

    def training_seconds(self) -> float:
        """Seconds spent training so far in the run, evaluations excluded: the x axis of time-to-score."""
        return self.seconds_before + time.perf_counter() - self.started - self.eval_seconds

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        # A run's final validation repeats the pass its last step had (per-epoch evaluation) on the same weights:
        # its metrics are reused under the new prefix, and logged as an evaluation logs them (an SFT pass: minutes).
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        key = (self.state.global_step, ignore_keys, _trainable_digest(self.model))
        if self.last_eval is not None and self.last_eval[0] is dataset and self.last_eval[1] == key:
            metrics = {f"{metric_key_prefix}_{k}": v for k, v in self.last_eval[2].items()}
            self.log(metrics)
            return metrics
        self.eval_logs = {}
        try:
            with get_method(self.run.method).evaluating(_unwrap(self.model)):
                metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            logged = self.eval_logs  # the evaluation's own metrics, before TRL's log adds its training counters
        finally:
            self.eval_logs = None
        speed = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time")
        self.last_eval = (dataset, key, {k[len(metric_key_prefix) + 1:]: v for k, v in logged.items()
                                         if k.startswith(metric_key_prefix + "_") and not k.endswith(speed)})
        return metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # a training term: an evaluation (model.eval()) reports the task loss alone, as `sora eval` does
        extra = get_method(self.run.method).extra_loss(self.run, model) if model.training else None
        if extra is None:
            return result
        if return_outputs:
            return result[0] + extra, result[1]
        return result + extra

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.eval_logs is not None:  # before SFTTrainer.log, which adds its train/eval counters in place
            self.eval_logs.update(logs)
        # Added here, before Trainer hands the dict to its callbacks: a callback's on_log runs after
        # TensorBoard has written the line.
        if "loss" in logs:
            logs = {**logs, **get_method(self.run.method).log_scalars(self.model, self.optimizer)}
        if self.nonfinite.skipped and "loss" in logs:
            logs = {**logs, "skipped_steps": self.nonfinite.skipped}
        if self.args.should_save:
            self.eval_seconds += sum(v for k, v in logs.items() if k.endswith("_runtime") and k != "train_runtime")
            line = {"step": self.state.global_step, "stage": self.stage,
                    "elapsed_seconds": round(self.training_seconds(), 3), **logs}
            if "eval_runtime" in logs:  # Trainer's own per-epoch evaluation (the final ones use other prefixes)
                line["split"] = "validation"
            with open(self.history, "a") as f:  # append-only log: a torn last line is skipped by readers
                f.write(json.dumps(line) + "\n")
        super().log(logs, start_time)


class NonFiniteGuard(TrainerCallback):
    """Skip a step whose gradients hold NaN or Inf, and stop after `limit` such steps in a row.

    Dropping every `.grad` makes torch's optimizers (and the prox step) leave all parameters alone, so
    weights and gates never take a non-finite value. Under DDP the all-reduced gradients are identical on
    every rank, so every rank skips the same steps.
    """

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.skipped = limit, 0, 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if all(bool(torch.isfinite(g).all()) for g in grads):
            self.in_a_row = 0
            return
        for p in model.parameters():
            p.grad = None
        self.in_a_row += 1
        self.skipped += 1
        logger.warning("step %d: non-finite gradients, step skipped (%d in a row)", state.global_step + 1,
                       self.in_a_row)
        if self.in_a_row >= self.limit:
            last = latest_checkpoint(Path(args.output_dir))
            raise TrainingDiverged(f"stopped after {self.in_a_row} consecutive non-finite steps (step "
                                   f"{state.global_step + 1}); last good checkpoint: {last or 'none'}")


class BudgetController(TrainerCallback):
    """`soralib.BudgetSchedule`'s step (`steer_to_budget`: ramp, then hold; why: its docstring) for a budget
    `sora train` has checked already. `measure` is a key of `sparsity_report`: "kept_params" (for
    --target-params) or "kept_rank" (for --target-rank, the budget then being mean rank × modules). Stateless
    like the schedule: a resumed run finds τ in the optimizer's state. run.py makes the final trim.
    """

    def __init__(self, target: float, measure: str, min_rank: int = 0, final_fraction: float = 0.75,
                 ramp: str = "threshold"):
        self.target, self.measure, self.min_rank, self.final_fraction = target, measure, min_rank, final_fraction
        self.ramp = ramp

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.ramp == "trim":  # τ 0 from the first step: the optimizer's own threshold would cut before any trim
            set_threshold(optimizer, 0.0)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        progress = min(state.global_step / max(state.max_steps, 1), 1.0)
        steer_to_budget(_unwrap(model), optimizer, self.target, self.measure, progress, self.min_rank,
                        self.final_fraction, self.ramp)


def _unwrap(model):
    return getattr(model, "module", model)


def training_args(config: TrainConfig, output_dir: Path, show_progress: bool) -> dict[str, Any]:
    """TrainingArguments' fields for one stage (a Task turns them into its arguments class)."""
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        activation_checkpointing=config.gradient_checkpointing,
        # the base model is frozen: reentrant checkpointing would see no input that needs a gradient
        activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        bf16=config.bf16,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.lr,
        lr_scheduler_type="linear",
        warmup_steps=config.warmup_ratio,  # a float < 1 is a ratio of the stage's steps
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "epoch",
        save_steps=config.save_steps or 500,
        save_total_limit=None,  # CompleteCheckpoints keeps the newest two complete checkpoints itself
        eval_strategy="steps" if config.eval_fraction else "epoch" if config.eval_each_epoch else "no",
        eval_steps=config.eval_fraction,  # a float < 1 is a ratio of the stage's steps
        seed=config.seed,
        data_seed=config.seed,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        report_to=[],
        disable_tqdm=not show_progress,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        deepspeed=config.deepspeed,
    )


def metrics_fn(spec):
    from .metrics import compute_metrics

    def compute(prediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return compute_metrics(spec, np.asarray(logits), np.asarray(prediction.label_ids))

    return compute


def make_trainer(config: TrainConfig, model, tokenizer, train_features, spec, run_dir: Path, stage: int,
                 threshold: float, show_progress: bool = False, budget: tuple[float, str] | None = None,
                 eval_features: list | None = None, seconds_before: float = 0.0, task=None) -> SoraTrainer:
    """A Trainer for one stage: a fresh optimizer (at `threshold`), warm-up and decay, its own checkpoints.
    The task (default: the config's) gives the Trainer class, its arguments, collator and metrics."""
    from .tasks import task_of

    task = task or task_of(config.task)
    trainer_class, args, parts = task.trainer_parts(
        config, spec, tokenizer, training_args(config, run_dir / "checkpoints" / f"stage-{stage}", show_progress))
    method = get_method(config.method)
    optimizer = method.make_optimizer(config, model, threshold)
    guard = NonFiniteGuard(config.max_bad_steps)
    callbacks: list[TrainerCallback] = [guard, *method.callbacks(config, guard, budget)]
    if args.should_save:
        from transformers.integrations import TensorBoardCallback

        tensorboard = TensorBoardCallback()
        # Its own writer, reopened after training for the evaluation lines, must stay in the run's logs/.
        tensorboard.logging_dir = str(run_dir / "logs" / f"stage-{stage}")
        callbacks.append(tensorboard)
    trainer = trainer_class(
        model=model, args=args, train_dataset=train_features, eval_dataset=eval_features, processing_class=tokenizer,
        **parts, optimizers=(optimizer, None), callbacks=callbacks, run=config, history=run_dir / HISTORY,
        stage=stage, seconds_before=seconds_before)
    trainer.remove_callback(PrinterCallback)  # library code does not print; history.jsonl has every line
    return trainer


def _trainable_digest(model) -> str:
    """A hash of the trainable weights' bytes: equal digests, equal weights (an evaluation's inputs)."""
    digest = hashlib.blake2b(digest_size=16)
    for p in model.parameters():
        if p.requires_grad:
            local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2: this rank's shard
            digest.update(local.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def evaluate(trainer: Trainer, features, split: str, task=None) -> dict[str, float]:
    """The task metrics of `features`, logged with `split` as prefix (history.jsonl) and returned without.
    `task`: the run's Task (default: the one of a SoraTrainer's config)."""
    from .tasks import task_of

    return (task or task_of(trainer.run.task)).evaluate(trainer, features, split)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
