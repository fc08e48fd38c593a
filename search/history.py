"""history.csv: one row per unique evaluation, appended and flushed as soon as it finishes.

Columns: ``index, generation, config`` (canonical JSON), every raw metric (in the order of the
first evaluation), one ``obj_<name>`` column per objective (minimised value), ``seconds``.
Floats are written with ``repr`` so they read back bit for bit. A last line without its newline
(a search killed mid-write) is dropped on load.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from supernet.errors import SupernetError
from supernet.space import Config

from .objectives import Objective
from .space import Encoding

LEAD = ["index", "generation", "config"]
TAIL = ["seconds"]


@dataclass(frozen=True)
class Record:
    """One evaluated configuration."""

    index: int
    generation: int
    config: Config
    metrics: dict[str, float]
    objectives: tuple[float, ...]
    seconds: float


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def records_frame(
    records: Sequence[Record], metric_names: Sequence[str], objectives: Sequence[Objective],
) -> pd.DataFrame:
    """Records as a DataFrame with the columns of history.csv (config as canonical JSON)."""
    columns = LEAD + list(metric_names) + [o.column for o in objectives] + TAIL
    rows = [_row(r, metric_names) for r in records]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.astype({"index": "int64", "generation": "int64"})


def write_records(path: Path, records: Sequence[Record], metric_names: Sequence[str],
                  objectives: Sequence[Objective]) -> None:
    """Write records as a CSV with history.csv's columns and float format, atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(LEAD + list(metric_names) + [o.column for o in objectives] + TAIL)
    writer.writerows(_row(r, metric_names) for r in records)
    write_atomic(Path(path), buffer.getvalue())


def _row(record: Record, metric_names: Sequence[str]) -> list:
    config = json.dumps(record.config, separators=(",", ":"))
    metrics = [record.metrics[m] for m in metric_names]
    return [record.index, record.generation, config, *metrics, *record.objectives, record.seconds]


class HistoryFile:
    """Reads and appends history.csv for one search."""

    def __init__(self, path: Path, encoding: Encoding, objectives: Sequence[Objective]) -> None:
        self.path = Path(path)
        self.encoding = encoding
        self.objectives = tuple(objectives)
        self.metric_names: list[str] | None = None

    def header(self, metric_names: Sequence[str]) -> list[str]:
        return LEAD + list(metric_names) + [o.column for o in self.objectives] + TAIL

    def load(self) -> list[Record]:
        """Every complete row; a partial last line (and a partial header) is dropped and the file trimmed."""
        if not self.path.exists():
            return []
        text = self.path.read_text()
        lines = text.splitlines(keepends=True)
        complete = [line for line in lines if line.endswith("\n")]
        if len(complete) != len(lines):
            write_atomic(self.path, "".join(complete))  # our own file: drop the line cut off mid-write
        if not complete:
            return []
        rows = list(csv.reader(io.StringIO("".join(complete))))
        self.metric_names = self._metric_names(rows[0])
        return [self._parse(row, n + 2) for n, row in enumerate(rows[1:])]

    def _metric_names(self, header: list[str]) -> list[str]:
        k = len(self.objectives)
        objective_columns = [o.column for o in self.objectives]
        if header[:3] != LEAD or header[-1:] != TAIL or header[-1 - k:-1] != objective_columns:
            raise SupernetError(f"{self.path} does not have the columns of this search's history")
        return header[3:-1 - k]

    def _parse(self, row: list[str], line: int) -> Record:
        names = self.metric_names or []
        if len(row) != len(self.header(names)):
            raise SupernetError(f"{self.path}, line {line}: expected {len(self.header(names))} fields, got {len(row)}")
        try:
            config = self.encoding.decode(self.encoding.encode(json.loads(row[2])))
            metrics = {m: float(v) for m, v in zip(names, row[3:3 + len(names)], strict=True)}
            return Record(int(row[0]), int(row[1]), config, metrics,
                          tuple(o.value(metrics) for o in self.objectives), float(row[-1]))
        except (ValueError, TypeError, AttributeError, SupernetError) as e:
            raise SupernetError(f"{self.path}, line {line} is corrupt: {e}") from None

    def append(self, record: Record) -> None:
        """Append one row (writing the header first if the file is new) and flush it."""
        if self.metric_names is None:
            self.metric_names = list(record.metrics)
            with self.path.open("w", newline="") as f:
                csv.writer(f, lineterminator="\n").writerow(self.header(self.metric_names))
        if set(record.metrics) != set(self.metric_names):
            raise SupernetError(
                f"the evaluator returned metrics {sorted(record.metrics)}, "
                f"but earlier evaluations returned {sorted(self.metric_names)}"
            )
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(_row(record, self.metric_names))
        with self.path.open("a", newline="") as f:
            f.write(buffer.getvalue())
            f.flush()
