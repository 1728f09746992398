"""Causal-LM supervised fine-tuning (`--task sft`): instruction rows, a language-model head, TRL's SFTTrainer.

The rows are tokenized here, not by TRL, so that every bad row is refused before the run writes anything,
and the loss mask (completion tokens only) is the one this module documents; SFTTrainer then packs (with
--packing), collates and computes the loss. Metrics: validation loss and perplexity on completion tokens, and,
once at the end, exact match of greedy generations on the first --max-generate-samples validation prompts
(when the references carry a `#### N` answer), whose texts go to generations.jsonl. Under DDP the ranks
share the generations out (`generate_shared_out`).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .glue import TaskSpec
from .task import Task, limit_samples

if TYPE_CHECKING:
    from ..config import TrainConfig

SPEC = TaskSpec("sft", ("prompt", "completion"), 0, (), "loss", False)


class SftTask(Task):
    name = label = "sft"
    fields = ("train_file", "validation_file", "prompt_column", "completion_column", "chat_template", "packing",
              "max_generate_samples", "max_new_tokens")
    peft_task_type = "CAUSAL_LM"
    higher_is_better = False  # the main metric is the validation loss
    max_length = 512  # GSM8K's longest question and answer, with SmolLM2's system prompt: about 450 tokens
    rescorable = False  # its scores are computed at the end of training (metrics.json)

    def check(self, config: TrainConfig) -> None:
        from ...errors import InputError

        if not (config.train_file and config.validation_file):
            raise InputError("task sft needs train_file and validation_file (prompt and completion columns, or "
                             "a messages column)")
        if config.prompt_column == config.completion_column:  # the model would learn to repeat its prompt
            raise InputError(f"--prompt-column and --completion-column are both {config.prompt_column!r}: name two "
                             "columns")
        from ..methods import get_method

        if config.packing and config.max_steps <= 0 and get_method(config.method).needs_total_steps:
            raise InputError(f"--packing with method {config.method} needs --max-steps: the method sets its "
                             "schedule from the step count, which packing changes after the model is wrapped")

    def load_data(self, config: TrainConfig):
        from .sft_data import read_sft_rows

        splits = {split: read_sft_rows(path, config.prompt_column, config.completion_column)
                  for split, path in (("train", config.train_file), ("validation", config.validation_file))}
        return SPEC, limit_samples(splits, config)

    def saved_spec(self, config: TrainConfig, run: Path) -> TaskSpec:
        return SPEC

    def load_model(self, config: TrainConfig, spec: TaskSpec):
        from ..methods import load_causal_lm

        return load_causal_lm(config)

    def check_fits(self, config: TrainConfig, model, tokenizer, splits: dict) -> None:
        """No adapter on the output layer; and the final generations: a prompt and its --max-new-tokens past the
        model's positions crash a model with learned positions (GPT-2) at the very end of training, and run a RoPE
        model where it never trained."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        from ...errors import InputError
        from .sft_data import prompt_ids, uses_chat_template

        head = model.get_output_embeddings()
        if isinstance(head, BaseTunerLayer):  # else TRL's SFTTrainer refuses it, after config.yaml is written
            name = next(n for n, m in model.get_base_model().named_modules() if m is head)
            raise InputError(f"--target-modules reaches the output layer {name!r}, which --task sft cannot adapt: "
                             "the loss is computed from its weight directly, so its adapter would never train; "
                             "leave it out of --target-modules")
        positions = getattr(model.config, "max_position_embeddings", None)
        rows = splits["validation"][: config.max_generate_samples]
        if not isinstance(positions, int) or not rows:
            return
        chat = uses_chat_template(config.chat_template, tokenizer)
        longest = max(len(prompt_ids(tokenizer, row["prompt"], chat)) for row in rows)
        room = positions - longest
        if config.max_new_tokens > room:
            fix = f"--max-new-tokens {room} or less" if room >= 1 else "shorter prompts"
            raise InputError(f"max_new_tokens {config.max_new_tokens}: the longest of the {len(rows)} prompts to "
                             f"generate from is {longest} tokens, and {longest} + {config.max_new_tokens} is more "
                             f"than the model's {positions} positions (max_position_embeddings); pass {fix}, "
                             "or fewer --max-generate-samples")

    def features(self, config: TrainConfig, spec: TaskSpec, splits: dict, tokenizer) -> dict[str, Any]:
        from datasets import Dataset

        from ...errors import InputError
        from .sft_data import tokenize_sft, uses_chat_template

        if tokenizer.eos_token_id is None:  # else TRL's collator fails on a None id, after the run dir is written
            raise InputError(f"model {config.model!r}: its tokenizer has no EOS token, which --task sft needs to end "
                             "each answer (and to pad with); set eos_token in its tokenizer_config.json")
        chat = uses_chat_template(config.chat_template, tokenizer)
        return {name: Dataset.from_list(tokenize_sft(rows, tokenizer, config.max_length, chat))
                for name, rows in splits.items() if rows}

    def subset(self, features, indices: list[int]):
        return features.select(indices)

    def trainer_parts(self, config: TrainConfig, spec: TaskSpec, tokenizer, args: dict[str, Any]):
        from trl import SFTConfig

        # Rows arrive tokenized and cut to max_length: TRL's own cut (a pass over the data) only runs to pack
        # them into max_length windows with --packing.
        sft_args = SFTConfig(**args, max_length=config.max_length if config.packing else None,
                             packing=config.packing, shuffle_dataset=False, dataset_num_proc=None)
        return sft_trainer_class(), sft_args, {}

    def evaluate(self, trainer, features, split: str) -> dict[str, float]:
        metrics = super().evaluate(trainer, features, split)
        if "loss" in metrics:
            metrics["perplexity"] = math.exp(min(metrics["loss"], 700.0))  # exp overflows a float past ~709
        return metrics

    def final_metrics(self, model, tokenizer, config: TrainConfig, splits: dict, out: Path | None) -> dict[str, Any]:
        from ...io import atomic_write_text
        from ..rundir import GENERATIONS
        from .generate import generate_shared_out, generation_metrics
        from .sft_data import uses_chat_template

        rows = splits["validation"][: config.max_generate_samples]
        if not rows:
            return {}
        chat = uses_chat_template(config.chat_template, tokenizer)
        texts = generate_shared_out(model, tokenizer, rows, chat, config.max_new_tokens, config.eval_batch_size)
        metrics, records = generation_metrics(rows, texts)
        if out is not None:
            atomic_write_text(out / GENERATIONS, "".join(json.dumps(r) + "\n" for r in records))
        return metrics


class TokenMeanEvalLoss:
    """An evaluation's `{prefix}_loss` as the mean over all the split's completion tokens (Σ token losses / Σ
    tokens, every rank's sums added), whatever the eval batch size, with or without packing.

    Trainer's evaluation_loop repeats each batch's loss (a mean over that batch's tokens) once per row and
    averages: a mean of batch means weighted by rows, which moves with --eval-batch-size. TRL's prediction_step
    returns the batch's mean over the next-token labels that are not -100 (with packing too: its padding-free
    collator sets each sequence's first label to -100), so that mean times their count is the batch's sum.
    Under DDP, accelerate completes the ranks' last batches with rows from the split's start: those rows count
    twice, as they did in Trainer's mean (docs/distributed.md)."""

    token_loss: list[float] | None = None  # [Σ token losses, Σ tokens] of the evaluation in progress

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        import torch

        self.token_loss = [0.0, 0.0]
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            total, tokens = self.token_loss
        finally:
            self.token_loss = None
        if self.args.world_size > 1:
            both = torch.tensor([total, tokens], dtype=torch.float64, device=self.args.device)
            total, tokens = self.accelerator.reduce(both, reduction="sum").tolist()
        key = f"{metric_key_prefix}_loss"
        if key in output.metrics and tokens > 0:  # Trainer.evaluate logs and returns these metrics next
            output.metrics[key] = total / tokens
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        import torch

        # counted before the forward, as the model counts them: labels shifted by one (or pre-shifted ones)
        labels = inputs["shift_labels"] if "shift_labels" in inputs else inputs["labels"][..., 1:]
        tokens = int((labels != -100).sum())
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        # Trainer leaves a non-finite batch loss out of its mean (logging_nan_inf_filter): so does the sum
        counted = loss is not None and (bool(torch.isfinite(loss)) or not self.args.logging_nan_inf_filter)
        if self.token_loss is not None and counted:
            self.token_loss[0] += float(loss) * tokens
            self.token_loss[1] += tokens
        return loss, logits, labels


@functools.cache
def sft_trainer_class():
    """SoraTrainer's additions (checkpoints, log lines, SoRA's loss term, length-grouped epochs) and the
    token-weighted validation loss on TRL's SFTTrainer: the MRO runs SoraTrainer, TokenMeanEvalLoss, SFTTrainer,
    then Trainer. Built on first use: trl is slow to import."""
    from trl import SFTTrainer

    from ..loop import SoraTrainer

    return type("SoraSFTTrainer", (SoraTrainer, TokenMeanEvalLoss, SFTTrainer), {"__module__": __name__})
