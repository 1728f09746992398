"""What in a run directory `sora train` wrote, and the lock that keeps one `sora train` per directory.

`--overwrite` deletes only the names in RUN and refuses while anything else is in the directory (a file of
yours, a folder, a symlink): it never deletes what a run did not write. A new file a run writes must be added
to RUN, or overwriting a run that has it is refused (test_train_methods checks a real run has nothing foreign).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterator

from ..errors import InputError
from ..io import name_list

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows: no lock, one run per directory is up to the user)
    fcntl = None

LOCK = ".sora.lock"  # held by the writing process; kept afterwards, with the pid of the last one
FILE, WHOLE = "file", "whole"  # a file; a directory written whole by a library (Trainer's checkpoints)
ADAPTER_FILES = {"adapter_config.json": FILE, "adapter_model.safetensors": FILE, "README.md": FILE}
# The names `sora train` writes, which eval, export, report and bench read (one spelling, here).
CONFIG, STATE, METRICS = "config.yaml", "state.json", "metrics.json"  # settings, stage progress, the scores
SPARSITY, HISTORY, STAGES = "sparsity.json", "history.jsonl", "stages.jsonl"  # kept ranks, log lines, stages
ADAPTER, SORA_ADAPTER = "adapter", "sora_adapter"  # the exported plain LoRA; SoRA's gated adapter
GENERATIONS = "generations.jsonl"  # an sft run's greedy generations on validation prompts (tasks/sft.py)
# The top-level keys of METRICS, which run.py writes and eval, export, report and bench read. Never rename one:
# bench/results/*.jsonl store whole metrics.json objects. (STAGES lines, STATE and SPARSITY spell some of their own
# fields alike, e.g. "kept_params" from prune.sparsity_report: those are theirs, not these.)
TASK = "task"  # the task's name (config.task)
METHOD = "method"  # the method's name (config.method)
SEED = "seed"  # config.seed
MODEL = "model"  # config.model: an absolute local path, a hub id or a shortcut such as "minilm" as given
MAIN_METRIC = "main_metric"  # the name of the metric that selects models (TaskSpec.main_metric), a key of EVAL
HIGHER_IS_BETTER = "higher_is_better"  # whether MAIN_METRIC improves upwards (false for a loss)
EVAL = "eval"  # the validation split's metrics, name -> value (an sft run adds its generation scores)
TEST = "test"  # the test split's metrics (protocol paper); a further dev set (MNLI's) is under its split name
KEPT_PARAMS = "kept_params"  # the result's size: in + out per live rank (adapters), trained parameters (full)
LORA_PARAMS_AT_R_MAX = "lora_params_at_r_max"  # the size of a plain LoRA at rank r; None without one (full, bitfit)
EXPORTED_PARAMS = "exported_params"  # SoRA only: the parameters adapter/ stores (layout uniform pads the ranks)
TRAIN_SECONDS = "train_seconds"  # training time of all stages and resumes, evaluations excluded
STEPS = "steps"  # optimizer steps of the (last) stage: its Trainer's global_step
SKIPPED_STEPS = "skipped_steps"  # steps skipped for a non-finite loss or gradients, over all stages
NUM_LABELS = "num_labels"  # the task's number of classes (1: regression)
LABEL_NAMES = "label_names"  # classification: the class of each of the head's outputs, in order
EVAL_ROWS = "eval_rows"  # split -> sha256 of the rows it was scored on (data.rows_fingerprint), train excluded
RUN = {
    GENERATIONS: FILE, CONFIG: FILE, STATE: FILE, METRICS: FILE, SPARSITY: FILE, HISTORY: FILE, STAGES: FILE,
    LOCK: FILE, ADAPTER: ADAPTER_FILES, SORA_ADAPTER: ADAPTER_FILES, "model": {"trainable.safetensors": FILE},
    "adapter-exact": ADAPTER_FILES, "adapter-uniform": ADAPTER_FILES,  # `sora export RUN`'s default --out
    "stages": {"stage-*": {ADAPTER: ADAPTER_FILES, SPARSITY: FILE}},
    # .staging: where earlier versions wrote a checkpoint before renaming it into place (an old run may hold one);
    # README.md: the model card TRL's SFTTrainer writes beside its checkpoints
    "checkpoints": {"stage-*": {"checkpoint-*": WHOLE, ".staging": WHOLE, "README.md": FILE}},
    "logs": {"stage-*": {"events.out.tfevents.*": FILE}},
    "report": {"report.md": FILE, "*.png": FILE},  # `sora report`
}
REPLACED = re.compile(r"(adapter|sora_adapter|model|stages/[^/]+/adapter)/.")  # whole directories a run rewrites
_TEMPORARY = re.compile(r"\.(.+)\.(old|[^.]+\.tmp)")  # soralib.io's staging names: .NAME.XXXXXXXX.tmp, .NAME.old


def foreign(out: Path, spec: dict = RUN, prefix: str = "") -> list[str]:
    """Paths under `out` that a run does not write (directories end in "/", symlinks in "@"), shallowest."""
    found = []
    for entry in sorted(out.iterdir()):
        rule = _rule(spec, entry.name)
        shown = prefix + entry.name + ("@" if entry.is_symlink() else "/" if entry.is_dir() else "")
        if rule == WHOLE and not entry.is_symlink():
            continue
        if rule is None or entry.is_symlink() or (rule == FILE) != entry.is_file():
            found.append(shown)
        elif isinstance(rule, dict):
            found += foreign(entry, rule, shown)
    return found


def _rule(spec: dict, name: str):
    temporary = _TEMPORARY.fullmatch(name)
    if temporary and _rule(spec, temporary.group(1)) is not None:
        return WHOLE
    return next((rule for pattern, rule in spec.items() if fnmatch.fnmatchcase(name, pattern)), None)


def written_by_sora(config_yaml: Path) -> bool:
    """A config.yaml as `sora train` writes it: a mapping of TrainConfig fields naming task, method, model."""
    import yaml

    from .config import FIELDS

    try:
        data = yaml.safe_load(config_yaml.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and set(data) <= set(FIELDS) and {"task", "method", "model"} <= set(data)


def run_holding(path: str | os.PathLike) -> Path | None:
    """The run directory that `path` is or lies in (the nearest with a config.yaml `sora train` wrote), else None:
    `sora export` and `sora ranks` write into no run but the one they were given."""
    path = Path(path).resolve()
    return next((p for p in (path, *path.parents) if (p / CONFIG).is_file() and written_by_sora(p / CONFIG)), None)


def remove_run(out: Path) -> None:
    """Delete what an earlier run wrote in `out`, leaving the rest (and the held lock) alone.

    config.yaml goes last: a delete cut short still leaves a run that --overwrite recognises."""
    for entry in sorted(out.iterdir(), key=lambda p: p.name == "config.yaml"):
        if entry.name == LOCK or _rule(RUN, entry.name) is None:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def lock_holder(out: Path) -> int | None:
    """The pid of another live process holding `out`'s lock, else None. Writes nothing.

    A lock left by a killed process does not count: the kernel drops a flock when its holder dies. The probe
    takes a shared lock, so two processes probing at once (every rank under torchrun) do not see each other."""
    if fcntl is None or not (out / LOCK).is_file():
        return None
    fd = os.open(out / LOCK, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _pid(fd)
        return None if pid == os.getpid() else (pid or -1)
    finally:
        os.close(fd)  # also releases the probe's lock
    return None


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold `out`'s lock until the block ends; InputError naming the holder's pid if another process has it."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for attempt in range(20):  # a probe (lock_holder) holds it for microseconds; a run, for its whole length
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 19:
                    raise InputError(in_use(out, _pid(fd) or -1)) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def in_use(out: Path, pid: int) -> str:
    holder = f"pid {pid}" if pid > 0 else "pid unknown"
    return f"{out} is in use by another sora train ({holder}); wait for it to end or choose another --output-dir"


def refuse_foreign(out: Path, paths: list[str], what: str) -> None:
    if paths:
        raise InputError(f"{what} {out}: it holds {name_list(paths)}, which a run does not write; "
                         "move them out first")


def _pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None
