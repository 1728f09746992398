"""The `sora` command: argument parsing and calls, no logic.

    sora train --task mrpc --model minilm --method sora --output-dir runs/mrpc [--any-config-field VALUE]
    sora report RUN_DIR
    sora eval RUN_DIR [--data-dir DIR]
    sora export RUN_DIR --layout uniform [--out DIR]
    sora ranks RUN_DIR [--out FILE.json]
    sora bench speed|quality|tables [ARGS]   (repository checkout only: runs python -m bench.<tool> ARGS)
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from typing import Sequence

from .errors import InputError, TrainingDiverged

RUN_CONTROL = ("config", "resume", "overwrite")


def _train_parser(sub) -> None:
    from .train.config import FIELDS, METHODS

    p = sub.add_parser("train", help="fine-tune with SoRA or a baseline and export the result",
                       description="Every TrainConfig field is a flag; defaults come from the method's YAML.")
    p.add_argument("--config", help="a YAML of config fields (overrides the method's defaults)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --output-dir")
    p.add_argument("--method", default=None, help=f"one of {', '.join(METHODS)} (default: the --config file's, else sora)")
    for name in FIELDS:
        if name == "method":
            continue
        doc = _field_docs().get(name, "")
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, metavar=name.upper(), help=doc)


@functools.lru_cache(maxsize=1)
def _field_docs() -> dict[str, str]:
    """The docstring under each TrainConfig field (litgpt style), for --help."""
    import ast
    import inspect

    from .train import config as module

    body = ast.parse(inspect.getsource(module.TrainConfig)).body[0].body
    return {node.target.id: str(nxt.value.value).replace("%", "%%")
            for node, nxt in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)}


def cmd_train(args: argparse.Namespace) -> int:
    from .train.config import FIELDS, build_config
    from .train.run import train

    overrides = {k: v for k, v in vars(args).items() if k in FIELDS and k != "method"}
    config = build_config(args.method, args.config, overrides)
    _progress_logging()
    metrics = train(config, overwrite=args.overwrite, resume=args.resume, show_progress=True)
    print(json.dumps({k: metrics[k] for k in ("task", "method", "eval", "kept_params") if k in metrics}))
    out = config.output_dir
    what = "adapter" if config.method in ("sora", "lora", "adalora") else "model"
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
    parser = argparse.ArgumentParser(prog="sora", description="SoRA: sparse low-rank adaptation")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    p = sub.add_parser("report", help="PNG plots and a markdown summary of a run")
    p.add_argument("run_dir")
    p = sub.add_parser("eval", help="re-evaluate a saved run")
    p.add_argument("run_dir")
    p.add_argument("--data-dir", "--task-data", dest="data_dir", default=None, help="GLUE data directory to use")
    p = sub.add_parser("export", help="re-export a SoRA run's adapter with another layout")
    p.add_argument("run_dir")
    p.add_argument("--layout", default="uniform", help="exact or uniform (default uniform)")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/adapter-LAYOUT)")
    p = sub.add_parser("ranks", help="the ranks a SoRA run kept, as a complete peft.LoraConfig JSON to retrain with")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="JSON file to write (default: print to stdout)")
    p = sub.add_parser("bench", add_help=False, help="benchmarks (repository checkout): speed, quality, tables; "
                       "`sora bench TOOL -h` for each")
    p.add_argument("tool", choices=("speed", "quality", "tables"))
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of python -m bench.TOOL")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"train": cmd_train, "report": cmd_report, "eval": cmd_eval, "export": cmd_export, "bench": cmd_bench,
                "ranks": cmd_ranks}
    try:
        return commands[args.command](args)
    except TrainingDiverged as err:
        print(f"sora {args.command}: error: {err}", file=sys.stderr)
        return 1
    except InputError as err:
        print(f"sora {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # a bad value caught by the library (config, export layout, ...)
        print(f"sora {args.command}: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C: one line, no traceback; `sora train`'s says how to resume
        print(f"sora {args.command}: {str(err) or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
