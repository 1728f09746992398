"""Which of a stage's checkpoints may be resumed: only those marked complete, the newest KEEP of them.

Trainer writes `checkpoint-N` in place, file by file, then calls its callbacks' `on_save`. There, once every
rank has written its part, CompleteCheckpoints adds the training clock and, last, the COMPLETE marker. A run
killed during a save leaves a torn `checkpoint-N` without the marker: it is never resumed (`latest_checkpoint`)
and is deleted at the next start or save of its stage, as are complete checkpoints older than the newest KEEP.
All through Trainer's public callback API, so any Trainer subclass (TRL's SFTTrainer too) can use it.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from transformers import TrainerCallback

from ..io import atomic_write_bytes, atomic_write_text

COMPLETE = "COMPLETE"  # marker written last into a checkpoint: only marked checkpoints are resumed
CLOCK = "training_seconds.json"  # in each checkpoint: training time, skipped steps and history size up to it
KEEP = 2  # complete checkpoints kept per stage, the newest ones


class CompleteCheckpoints(TrainerCallback):
    """Mark each checkpoint complete once written whole, and delete torn and surplus ones of the stage.

    `trainer` gives the barrier (`accelerator`) and the clock: `training_seconds()` and `nonfinite.skipped`.
    Under DDP every rank writes its own RNG state into the checkpoint, so all wait for each other before rank 0
    marks it; only rank 0 (`args.should_save`) writes or deletes. No barrier after the deletions: the other
    ranks read no checkpoint until the next save, which they reach only through steps synchronised with rank 0.
    """

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # A torn checkpoint left by a killed run goes before Trainer writes again: none is ever written into.
        if args.should_save:
            _prune(Path(args.output_dir))

    def on_save(self, args, state, control, **kwargs):
        self.trainer.accelerator.wait_for_everyone()
        if args.should_save:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            history = getattr(self.trainer, "history", None)
            clock = {"training_seconds": self.trainer.training_seconds(),
                     "skipped_steps": self.trainer.nonfinite.skipped, "history_bytes": history_size(history)}
            atomic_write_text(checkpoint / CLOCK, json.dumps(clock))
            atomic_write_text(checkpoint / COMPLETE, "ok\n")
            _prune(Path(args.output_dir))


class ResumedAtTheEnd(TrainerCallback):
    """A run resumed from its last step's checkpoint redoes only what followed that checkpoint (the history was
    rewound to it): the epoch's end neither saves again nor, if the checkpoint was that epoch-end save (taken after
    the evaluation), evaluates again. SoraTrainer.get_batch_samples keeps it from training a further step."""

    def __init__(self):
        self.at_the_end = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.at_the_end = state.global_step >= state.max_steps  # only a resumed run starts there

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.at_the_end:  # after DefaultFlowCallback, which asked for both
            control.should_save = False
            control.should_evaluate = control.should_evaluate and args.save_strategy != "epoch"


def _checkpoints(directory: Path) -> list[Path]:
    found = [p for p in directory.glob("checkpoint-*") if p.name[11:].isdigit() and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def _complete_checkpoints(directory: Path) -> list[Path]:
    return [p for p in _checkpoints(directory) if (p / COMPLETE).is_file()]


def _prune(directory: Path) -> None:
    """Delete the torn checkpoints (this stage's run wrote them) and all but the newest KEEP complete ones."""
    complete = _complete_checkpoints(directory)
    for checkpoint in _checkpoints(directory):
        if checkpoint not in complete[-KEEP:] and not checkpoint.is_symlink():  # a link is not the run's
            shutil.rmtree(checkpoint)


def history_size(path: Path | None) -> int:
    """The log's size now, saved with each checkpoint and finished stage: the point a resume rewinds it to."""
    return path.stat().st_size if path is not None and path.is_file() else 0


def rewind_history(path: Path, checkpoint: str | None, state: dict) -> None:
    """Cut the log back to what it held when `checkpoint` (or, without one, the last finished stage in `state`)
    was saved: the resumed run redoes the steps after it and logs them again, so they would appear twice.
    Runs saved before sizes were recorded keep their log as it is."""
    clock = json.loads((Path(checkpoint) / CLOCK).read_text()) if checkpoint else state
    keep = clock.get("history_bytes")
    if keep is not None and path.is_file() and path.stat().st_size > keep:
        atomic_write_bytes(path, path.read_bytes()[:keep])


def latest_checkpoint(directory: Path) -> str | None:
    """The newest checkpoint that was completely written (has the COMPLETE marker), or None."""
    done = _complete_checkpoints(directory) if directory.is_dir() else []
    return str(done[-1]) if done else None


def resume_hint(run_dir: Path) -> str:
    """One line for an interrupted run: the command that resumes it, and the checkpoint it continues from."""
    stages = [p for p in (run_dir / "checkpoints").glob("stage-*") if p.name[6:].isdigit()]
    stages.sort(key=lambda p: int(p.name[6:]), reverse=True)
    newest = next(filter(None, map(latest_checkpoint, stages)), None)
    command = f"`sora train --output-dir {shlex.quote(str(run_dir))} --resume`"
    if newest is None:
        return f"interrupted before the first checkpoint; {command} starts the run again"
    return f"interrupted; {command} continues from {newest}"
