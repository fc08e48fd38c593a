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
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from supernet.errors import SupernetError
from supernet.files import write_atomic
from supernet.space import Config

from .encoding import Encoding
from .objectives import Objective

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
        """Every complete row, each checked; a partial last line (a kill mid-write) is dropped and
        the file trimmed, and a configuration recorded twice keeps its first row only (the others
        are dropped from the file, with a warning).

        Raises:
            SupernetError: naming the line, for a row that is not UTF-8 text, has the wrong number
                of fields, does not parse, or has a non-finite objective value (the search never
                writes one, so such a row was edited or corrupted, and must never be selected).
        """
        if not self.path.exists():
            return []
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise SupernetError(f"cannot read {self.path}: {e.strerror}") from None
        parts = data.split(b"\n")
        complete = [p + b"\n" for p in parts[:-1]]
        lines = []
        for n, line in enumerate(complete, start=1):
            try:
                lines.append(line.decode("utf-8"))
            except UnicodeDecodeError:
                raise SupernetError(f"{self.path}, line {n} is not text (binary data); it was not written by "
                                    "supernet: remove it, or start a new search") from None
        if not lines:
            if parts[-1]:
                write_atomic(self.path, "")  # our own file: drop the line cut off mid-write
            return []
        rows = list(csv.reader(io.StringIO("".join(lines))))
        self.metric_names = self._metric_names(rows[0])
        records, seen, repeated = [], set(), []
        for n, row in enumerate(rows[1:], start=2):
            record = self._parse(row, n)
            key = self.encoding.key(record.config)
            if key in seen:
                repeated.append(n)
                continue
            seen.add(key)
            records.append(record)
        if parts[-1] or repeated:  # our own file: keep exactly the rows that count
            kept = [lines[0]] + [line for n, line in enumerate(lines[1:], start=2) if n not in set(repeated)]
            write_atomic(self.path, "".join(kept))
        if repeated:
            print(f"supernet: warning: {self.path} recorded {len(repeated)} configuration(s) twice (lines "
                  f"{', '.join(map(str, repeated[:5]))}{', ...' if len(repeated) > 5 else ''}); kept the first row "
                  "of each", file=sys.stderr)
        return records

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
            record = Record(int(row[0]), int(row[1]), config, metrics,
                            tuple(o.value(metrics) for o in self.objectives), float(row[-1]))
        except (ValueError, TypeError, AttributeError, RecursionError, SupernetError) as e:
            raise SupernetError(f"{self.path}, line {line} is corrupt: {e}") from None
        for o, value in zip(self.objectives, record.objectives, strict=True):
            if not math.isfinite(value):
                raise SupernetError(f"{self.path}, line {line}: objective {o.name!r} is {value} ; a search never "
                                    "records a non-finite value, so the row was edited or corrupted: restore it, or "
                                    "start a new search under another --name")
        return record

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
