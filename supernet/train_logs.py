"""train_log.csv and eval_log.csv: appended row by row, cut back to a checkpoint on resume."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

from supernet.files import write_atomic


class _CsvAppender:
    def __init__(self, path: Path, header: list[str]):
        new = not path.exists() or path.stat().st_size == 0
        self.f = open(path, "a", newline="")
        self.w = csv.writer(self.f)
        if new:
            self.w.writerow(header)
            self.f.flush()

    def write(self, row: list) -> None:
        self.w.writerow(row)
        self.f.flush()


def _log_rows(path: Path) -> tuple[list[str], list[list[str]], int]:
    """Header, the rows whose step parses, and how many rows did not (hand-edited or torn)."""
    with open(path, newline="", errors="replace") as f:
        rows = list(csv.reader(f))
    if not rows:
        return [], [], 0
    good = []
    for r in rows[1:]:
        try:
            if len(r) == len(rows[0]):
                int(r[0])
                good.append(r)
        except ValueError:
            pass
    return rows[0], good, len(rows) - 1 - len(good)


def _truncate_log(path: Path, step: int) -> None:
    """Drop rows past ``step`` (written after the checkpoint we resume from) and unreadable rows."""
    if not path.exists():
        return
    header, rows, bad = _log_rows(path)
    if not header:
        return
    if bad:
        print(f"supernet: note: dropped {bad} unreadable row(s) from {path}", file=sys.stderr)
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header] + [r for r in rows if int(r[0]) <= step])
    write_atomic(path, buffer.getvalue())


def _rows_at(path: Path, step: int) -> list[dict]:
    """The validation rows logged at ``step``, as :meth:`Trainer.validate` returns them."""
    if not path.exists():
        return []
    header, rows, _ = _log_rows(path)
    out = []
    for r in rows:
        d = dict(zip(header, r, strict=True))
        if int(d["step"]) == step:
            out.append({"step": step, "subnet": d["subnet"], "accuracy": float(d["accuracy"]),
                        "loss": float(d["loss"]), "examples": int(d["examples"])})
    return out
