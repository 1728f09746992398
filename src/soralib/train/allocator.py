"""PEFT AdaLoRA under Trainer: the rank allocation it needs after every step, and checkpoints that resume exactly.

What AdaLoRA's training goes on from, and where its checkpoint keeps it:
- the adapter with every rank, pruned ones included: a pruned triplet's singular value is zeroed, but its
  A row and B column keep training (the orthogonality term, weight decay) and the loss's gradient grows its
  singular value again, so a later allocation may take it back; the optimizer state holds every rank too.
  PEFT saves an adapter cut down to the ranks of its `rank_pattern`, which cannot be loaded back into the
  model being trained, so checkpoints are written with the pattern set aside (`every_rank_saved`; the
  adapter is the same function, its pruned singular values being zero);
- the allocation: `rank_pattern` (masks every step after the final allocation, and cuts the final adapter)
  and the allocator's importance scores (exponential moving averages of |p·∇p| and of their uncertainty,
  from step 1 on), which Trainer knows nothing of: saved by `AdaLoraAllocator.on_save` as ALLOCATOR_FILE and
  restored at `on_train_begin`, after Trainer has loaded the adapter and the optimizer.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..errors import InputError
from ..io import atomic_write_bytes

logger = logging.getLogger(__name__)

ALLOCATOR_FILE = "adalora_allocator.pt"  # in each checkpoint of an AdaLoRA run
SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # the RankAllocator's dicts, parameter name → tensor


class AdaLoraAllocator(TrainerCallback):
    """PEFT AdaLoRA must see every step after backward and before zero_grad; Trainer does not call it.

    A step the guard skipped has no gradients, which AdaLoRA's importance scores (p·∇p) cannot take; from
    its final allocation on (step total_step − tfinal) AdaLoRA only masks, so those steps always run.
    Each checkpoint gets the allocation (`ALLOCATOR_FILE`) before CompleteCheckpoints, added to the Trainer
    after this callback, marks it complete; a resumed run takes it back before its first step."""

    def __init__(self, guard):
        self.guard = guard

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model = _unwrap(model)
        config = model.peft_config[model.active_adapter]
        if self.guard.in_a_row and state.global_step < config.total_step - config.tfinal:
            return
        model.base_model.update_and_allocate(state.global_step)

    def on_save(self, args, state, control, model=None, **kwargs):
        if args.should_save:
            model = _unwrap(model)
            allocator = model.base_model.rankallocator
            saved = {"rank_pattern": model.peft_config[model.active_adapter].rank_pattern,
                     **{name: {k: v.cpu() for k, v in getattr(allocator, name).items()} for name in SCORES}}
            buffer = io.BytesIO()
            torch.save(saved, buffer)
            atomic_write_bytes(_checkpoint(args, state) / ALLOCATOR_FILE, buffer.getvalue())

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:  # a new run: nothing to take back
            return
        path = _checkpoint(args, state) / ALLOCATOR_FILE
        if not path.is_file():  # an older soralib saved it before the first allocation (check_checkpoint: after)
            logger.warning("%s has no AdaLoRA allocation (saved by an older soralib): the importance scores start "
                           "again from zero, so the run does not go on exactly as it would have", path.parent)
            return
        model = _unwrap(model)
        saved = torch.load(path, map_location="cpu", weights_only=True)
        # Only now: with a rank_pattern in the config, loading the adapter would have cut the model down to it
        model.peft_config[model.active_adapter].rank_pattern = saved["rank_pattern"]
        allocator = model.base_model.rankallocator
        device = next(p.device for p in model.parameters() if p.requires_grad)
        for name in SCORES:
            setattr(allocator, name, {k: v.to(device) for k, v in saved[name].items()})


@contextlib.contextmanager
def every_rank_saved(model) -> Iterator[None]:
    """Within it, PEFT saves the AdaLoRA adapter of `model` with every rank (see the module's docstring)."""
    config = model.peft_config[model.active_adapter]
    pattern, config.rank_pattern = config.rank_pattern, None
    try:
        yield
    finally:
        config.rank_pattern = pattern


def check_checkpoint(checkpoint: Path) -> None:
    """InputError if the AdaLoRA `checkpoint` cannot be resumed: an older soralib saved its adapter cut down to
    the ranks kept (its adapter_config.json holds a rank_pattern), and the pruned ranks are lost."""
    config = checkpoint / "adapter_config.json"  # absent: Trainer says what the checkpoint lacks
    if config.is_file() and json.loads(config.read_text()).get("rank_pattern"):
        raise InputError(f"cannot resume from {checkpoint}: an older soralib saved it with AdaLoRA's adapter cut "
                         "down to the ranks it kept, and training goes on with the pruned ones too; start the run "
                         "again with --overwrite")


def _checkpoint(args, state) -> Path:
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"


def _unwrap(model):
    return getattr(model, "module", model)
