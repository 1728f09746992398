"""What `sora train --resume` continues with: the saved run's settings, refusing flags that disagree with them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..errors import InputError
from .config import CONFIG_DIR, FIELDS, TrainConfig, coerce, load_saved, load_yaml
from .fill import fill_in
from .rundir import CONFIG


def resumed_config(out: Path, given: TrainConfig) -> TrainConfig:
    """The config.yaml of the run in `out`, with `given`'s output directory, validated; InputError if `given` sets
    other values.

    `given` is not validated alone: its flags only name the saved run's values, so `--data-dir` without the
    run's --task is that run's data, not a data directory for no task."""
    if not (out / CONFIG).is_file():
        raise InputError(f"nothing to resume in {out}: no config.yaml from an earlier run")
    saved = load_saved(out / CONFIG)
    changed = changed_settings(saved, fill_in(replace(given)))
    if changed:
        raise InputError(f"cannot resume {out} with other settings ({changed}): drop these flags to resume it, "
                         "or start a new run in another --output-dir")
    return replace(saved, output_dir=given.output_dir).validate()


# Fields whose unset value stands for another, as the run reads them: a flag naming that value is no change.
UNSET_MEANS = {"min_rank": TrainConfig.effective_min_rank, "gate_lr": lambda c: c.gate_lr or c.lr}


def changed_settings(saved: TrainConfig, given: TrainConfig) -> str:
    """The fields the user set (to other than the method's defaults) that differ from the saved run's, as text.

    `given` holds every field, so only a value the user chose can disagree: re-issuing the run's command with
    --resume passes, and so does a bare `sora train --output-dir DIR --resume`. The output directory may differ.
    A field left unset is compared as validation fills it in (fill.fill_in): max_length from the task, which a
    bare --resume does not name, is no choice of the user's. Paths are compared absolute, as both sides hold them.
    """
    defaults = {**TrainConfig().to_dict(), "method": "sora"}  # "sora": the method when none is given
    defaults.update({k: coerce(k, v) for k, v in load_yaml(CONFIG_DIR / f"{given.method}.yaml").items()
                     if k != "method"})
    differ = []
    for name in FIELDS:
        old, new = getattr(saved, name), getattr(given, name)
        if name == "output_dir" or new == old:
            continue
        if new == getattr(fill_in(replace(given, **{name: defaults[name]})), name):
            continue  # the value `given` has had the user not set it: no choice of theirs
        if name == "modules_to_save" and old and new and old[:len(new)] == new:
            continue  # the run appended the modules its checkpoint lacked (see train)
        if name in UNSET_MEANS and UNSET_MEANS[name](saved) == UNSET_MEANS[name](replace(saved, **{name: new})):
            continue  # the value the saved run's unset field stands for: --min-rank 1 for a budget's null
        differ.append(f"{name}: saved {old!r}, given {new!r}")
    return "; ".join(differ)


def check_same_rows(out: Path, state: dict, rows: dict[str, str]) -> None:
    """InputError if a split's rows (`data.rows_fingerprint`) differ from those the run in `out` started with, as
    its state.json recorded them (a run older than the record is not checked): a resumed run would go on training,
    and be scored, on other data than its first steps."""
    for name, saved in state.get("data_rows", {}).items():
        if rows.get(name) != saved:
            raise InputError(f"cannot resume {out}: its {name} rows differ from the ones the run started with (the "
                             "data changed since); restore that data, or start the run again with --overwrite")
