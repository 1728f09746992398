"""The `sora` command: argument parsing and calls, no logic.

    sora train --task mrpc --model minilm --method sora --output-dir runs/mrpc [--any-config-field VALUE]
    sora report RUN_DIR
    sora eval RUN_DIR [--data-dir DIR]
    sora export RUN_DIR --layout uniform [--out DIR]
    sora ranks RUN_DIR [--out FILE.json]
    sora bench speed|quality|tables [ARGS]   (repository checkout only: runs python -m bench.<tool> ARGS)

Building the parser imports no torch, transformers or peft (seconds on a small machine): `--help` and
usage errors are instant, and each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from typing import Any, Sequence

from .errors import DiskFull, InputError, TrainingDiverged
from .unknown_flags import unrecognized

RUN_DIR_HELP = "a run directory written by `sora train --output-dir`"


def _parser(sub, name: str, run, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose parsed arguments go to `run(args)`; abbreviated flags (--over) are refused."""
    p = sub.add_parser(name, allow_abbrev=False, **kwargs)
    p.set_defaults(run=run, parser=p)
    return p


def _train_parser(sub) -> None:
    from .train.config import CHOICES, FIELDS
    from .train.tasks import TASK_NAMES

    p = _parser(sub, "train", cmd_train, help="fine-tune with SoRA or a baseline and export the result",
                description="Every TrainConfig field is a flag. Precedence: the method's shipped YAML "
                "(soralib/configs/METHOD.yaml, whose values the defaults below show) < --config FILE < flags. "
                "A flag the chosen method or task does not use is an error.")
    p.add_argument("--config", metavar="FILE", help="a YAML of config fields (overrides the method's defaults)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --output-dir")
    choices = {**CHOICES, "task": TASK_NAMES}
    for name in FIELDS:
        flag, kind = f"--{name.replace('_', '-')}", _kind(name)
        doc = f"{_field_docs().get(name, '')} {_default_text(name)}".replace("%", "%%")
        if name == "method":
            doc = f"{_field_docs()['method']} (default: the --config file's, else sora)"
        if kind == "bool":  # --flag / --no-flag; `--flag false` still works (scripts, docs and bench use it)
            p.add_argument(flag, dest=name, nargs="?", const="true", default=None, metavar="BOOL", help=doc)
            p.add_argument(f"--no-{flag[2:]}", dest=name, action="store_const", const="false",
                           help=f"same as {flag} false")
            continue
        metavar = "{" + ",".join(choices[name]) + "}" if name in choices else _METAVARS.get(kind, name.upper())
        p.add_argument(flag, dest=name, default=None, metavar=metavar, help=doc)


_METAVARS = {"int": "INT", "float": "FLOAT", "list[float]": "X,Y,...", "list[str]": "A,B,..."}


def _kind(name: str) -> str:
    from .train.config import FIELDS

    return FIELDS[name].type.removeprefix("Optional[").removesuffix("]")


def _default_text(name: str) -> str:
    """`(default: 0.1; full: 0.01, bitfit: 0.0)`: the sora YAML's value and where another method's differs,
    plus which runs read the field at all."""
    from .train.config import METHODS, USED_ONLY

    per_method = {m: _method_defaults(m)[name] for m in METHODS}
    if per_method["sora"] == "":
        return "(required)"
    others = {}
    for method, value in per_method.items():
        if value != per_method["sora"]:
            others.setdefault(_show(value), []).append(method)
    text = "default: " + _show(per_method["sora"])
    if others:
        text += "; " + ", ".join(f"{'/'.join(ms)}: {v}" for v, ms in others.items())
    needs = [needs for _, needs, _ in USED_ONLY.get(name, ())]
    return f"({text})" + (f" Used only {', '.join(needs)}." if needs else "")


@functools.lru_cache(maxsize=None)
def _method_defaults(method: str) -> dict[str, Any]:
    from .train.config import CONFIG_DIR, FIELDS, TrainConfig, coerce, load_yaml

    values = TrainConfig().to_dict()
    values.update({k: coerce(k, v) for k, v in load_yaml(CONFIG_DIR / f"{method}.yaml").items()})
    return {k: values[k] for k in FIELDS}


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, list):
        return ",".join(_show(v) for v in value)
    return str(value)


@functools.lru_cache(maxsize=1)
def _field_docs() -> dict[str, str]:
    """The docstring under each TrainConfig field (litgpt style), for --help."""
    import ast
    import inspect

    from .train import config as module

    body = ast.parse(inspect.getsource(module.TrainConfig)).body[0].body
    return {node.target.id: " ".join(str(nxt.value.value).split())
            for node, nxt in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)}


def _negative_values_attached(argv: list[str]) -> list[str]:
    """`--lr -1e-3` as `--lr=-1e-3`: argparse takes a token such as -1e-3 for an unknown flag, not a value.
    The value then reaches validate(), which names it and the allowed range."""
    from .train.config import FIELDS

    numeric = {f"--{n.replace('_', '-')}" for n in FIELDS if _kind(n) in ("int", "float", "list[float]")}
    out: list[str] = []
    for token in argv:
        if out and out[-1] in numeric and token.startswith("-") and _is_number_list(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _is_number_list(token: str) -> bool:
    try:
        [float(part) for part in token.split(",")]
    except ValueError:
        return False
    return True


def train_config(args: argparse.Namespace):
    """The TrainConfig of a parsed `sora train` command line: only the flags given override the YAMLs."""
    from .train.config import FIELDS, build_config
    from .train.rundir import CONFIG

    overrides = {k: v for k, v in vars(args).items() if k in FIELDS and k != "method"}
    # A --resume's flags are checked against the saved run (train/resume.py), not alone: `--data-dir` without
    # the run's --task names that run's data.
    saved_run = args.resume and args.output_dir and os.path.isfile(os.path.join(args.output_dir, CONFIG))
    return build_config(args.method, args.config, overrides, check=not saved_run)


def cmd_train(args: argparse.Namespace) -> int:
    from .train.loop import is_main_process
    from .train.methods import get_method
    from .train.run import train
    from .train.rundir import EVAL, KEPT_PARAMS, METHOD, TASK

    config = train_config(args)
    _progress_logging()
    metrics = train(config, overwrite=args.overwrite, resume=args.resume, show_progress=True)
    if not is_main_process():  # under torchrun every rank trains; rank 0 alone speaks for the run
        return 0
    print(json.dumps({k: metrics[k] for k in (TASK, METHOD, EVAL, KEPT_PARAMS) if k in metrics}))
    out = config.output_dir
    what = get_method(config.method).output
    print(f"exported {what}: {out}/{what}\nmetrics: {out}/metrics.json\nreport: run `sora report {out}`")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    print(f"report: {write_report(args.run_dir)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .train.reuse import evaluate_run

    print(json.dumps(evaluate_run(args.run_dir, data_dir=args.data_dir), indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .train.reuse import export_run

    print(f"exported: {export_run(args.run_dir, layout=args.layout, out_dir=args.out)}")
    return 0


def cmd_ranks(args: argparse.Namespace) -> int:
    from .train.reuse import ranks_run

    text = ranks_run(args.run_dir, out=args.out)
    if args.out:
        print(f"wrote: {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Delegate to the repository's bench/ package (not installed): found next to src/ in an editable checkout."""
    import importlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if not (root / "bench" / "__init__.py").is_file():
        raise InputError(f"no bench/ directory next to {root / 'src'}: `sora bench` needs an editable install of a "
                         "soralib checkout (or run `python -m bench.<tool>` from the repository root)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"bench.{args.tool}").main(args.args) or 0


def _progress_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "peft", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sora", description="SoRA: sparse low-rank adaptation", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)

    p = _parser(sub, "report", cmd_report, help="PNG plots and a markdown summary of a run")
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR_HELP)

    p = _parser(sub, "eval", cmd_eval,
                help="re-evaluate a saved classification run (GLUE or custom; an SFT run's scores are in metrics.json)")
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR_HELP)
    p.add_argument("--data-dir", "--task-data", dest="data_dir", default=None, metavar="DIR",
                   help="GLUE data directory to use (default: the run's own); GLUE runs only: a custom run "
                        "re-reads its own files")

    p = _parser(sub, "export", cmd_export, help="re-export a SoRA run's adapter with another layout")
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR_HELP + " with method sora")
    p.add_argument("--layout", default="uniform", metavar="{exact,uniform}",
                   help="exact: per-module ranks; uniform: one padded rank (default: uniform)")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory: new, or an earlier export; outside "
                   "other runs (default: RUN_DIR/adapter-LAYOUT)")

    p = _parser(sub, "ranks", cmd_ranks, help="the ranks a SoRA run kept, as a complete peft.LoraConfig JSON to retrain with")
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR_HELP + " with method sora")
    p.add_argument("--out", default=None, metavar="FILE", help="a new JSON file outside every run, never one that "
                   "exists (default: print to stdout)")

    p = _parser(sub, "bench", cmd_bench, help="benchmarks (repository checkout): speed, quality, tables",
                description="Runs python -m bench.TOOL ARGS from a soralib checkout; `sora bench TOOL -h` "
                            "shows each tool's own arguments.")
    p.add_argument("tool", choices=("speed", "quality", "tables"), help="the benchmark to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of python -m bench.TOOL")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = build_parser().parse_known_args(_negative_values_attached(argv))
    if extra:
        args.parser.error(unrecognized(args.parser, extra))  # exit 2, after the subcommand's usage line
    try:
        return args.run(args)
    except TrainingDiverged as err:
        print(f"sora {args.command}: error: {err}", file=sys.stderr)
        return 1
    except DiskFull as err:  # "no space left on device at PATH"; free space, then --resume
        print(f"sora {args.command}: error: {err}", file=sys.stderr)
        return 1
    except InputError as err:
        print(f"sora {args.command}: error: {err}", file=sys.stderr)
        return 2
    except PermissionError as err:  # a directory the user may not write (--out, the cache): theirs to fix, no bug
        print(f"sora {args.command}: error: {err.strerror}: {err.filename}", file=sys.stderr)
        return 1
    except ValueError as err:  # a bad value caught by the library (config, export layout, ...)
        print(f"sora {args.command}: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C: one line, no traceback; `sora train`'s says how to resume
        print(f"sora {args.command}: {str(err) or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
