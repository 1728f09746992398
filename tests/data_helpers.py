"""What the test_data_* and test_sft_* files share: writing a data file line by line (or JSONL rows), and a GLUE
RTE directory."""

from __future__ import annotations

from pathlib import Path

RTE_HEADER = "index\tsentence1\tsentence2\tlabel"


def write(path: Path, lines: list[str], *, bom: bool = False, trailing_newline: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + ("\n" if trailing_newline else "")
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return path


def write_rows(path: Path, rows: list) -> Path:
    """JSONL: each row a JSON object, or a string written as it is (a bad line)."""
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_rte(root: Path, train: list[str], dev: list[str]) -> Path:
    write(root / "RTE" / "train.tsv", [RTE_HEADER, *train])
    write(root / "RTE" / "dev.tsv", [RTE_HEADER, *dev])
    return root
