"""``run_search``: one search into one output directory, resumable.

Files (all in ``out_dir``): ``search.json`` (format, settings, space), ``history.csv`` (one row
per unique evaluation, see :mod:`supernet.search.history`), ``pareto.csv`` (the non-dominated
rows of history.csv by the objective columns, ties kept, sorted by the objectives then index),
``subnets/<index>.json`` (one per Pareto member: index, config, metrics, objectives; readable
by ``supernet eval --subnet``) and, for the allocator, ``selected.json``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from supernet.errors import SupernetError
from supernet.files import exclusive, write_atomic
from supernet.space import SearchSpace
from supernet.validate import jsonable

from .context import EvaluateFn, MapFn, SearchContext
from .encoding import CostFn, Encoding, parse_constraint
from .halving import RUNG_FILE
from .history import HistoryFile, Record, records_frame, write_records
from .objectives import resolve_objectives
from .pareto import pareto_front
from .settings import SearchSettings
from .strategies import STRATEGIES

FORMAT = 1
LOCK = ".lock"  # held by the one process writing a search (see :func:`supernet.files.exclusive`)
ENUMERABLE = 4096  # a space this small is checked whole for a feasible configuration before a search starts


@dataclass
class SearchResult:
    """What a search returns.

    Attributes:
        out_dir: the output directory.
        settings: the settings it ran with.
        history: history.csv as a DataFrame (config as canonical JSON).
        pareto: pareto.csv as a DataFrame.
        objective_columns: the minimised objective columns (``obj_<name>``), in settings order.
        selected: the allocator's answer (index, config, steps, ...), else None.
        evaluator_calls: evaluations this call ran (the rest came from a resumed history).
    """

    out_dir: Path
    settings: SearchSettings
    history: pd.DataFrame
    pareto: pd.DataFrame
    objective_columns: list[str]
    selected: dict[str, Any] | None
    evaluator_calls: int


def manifest(space: SearchSpace, settings: SearchSettings) -> dict[str, Any]:
    """The content of search.json."""
    return json.loads(json.dumps({"format": FORMAT, "settings": settings.to_json(), "space": space.to_json()}))


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SupernetError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise SupernetError(f"{path} is not a search manifest")
    return data


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    settings_old, settings_new = old.get("settings", {}), new["settings"]
    keys = sorted(k for k in set(settings_old) | set(settings_new) if settings_old.get(k) != settings_new.get(k))
    parts = [f"{k}: {settings_old.get(k)!r} there, {settings_new.get(k)!r} now" for k in keys]
    if old.get("space") != new["space"]:
        parts.append("the search space differs")
    if old.get("format") != new["format"]:
        parts.append(f"format {old.get('format')!r} there, {new['format']!r} now")
    return "; ".join(parts)


def _check_out_dir(out_dir: Path, wanted: dict[str, Any], resume: bool) -> None:
    """Refuse a resume without a search, a resume with other settings, or a new search into a used directory."""
    path = out_dir / "search.json"
    if resume:
        if not path.is_file():
            raise SupernetError(f"cannot resume: {out_dir} holds no search (no search.json)")
        diff = _differences(_read_manifest(path), wanted)
        if diff:
            raise SupernetError(f"cannot resume {out_dir} with different settings ({diff})")
        return
    if path.is_file():
        diff = _differences(_read_manifest(path), wanted)
        if diff:
            raise SupernetError(f"{out_dir} holds a search with different settings ({diff}); choose another directory")
        raise SupernetError(f"{out_dir} already holds this search; use --resume to continue it")
    if out_dir.exists() and (not out_dir.is_dir() or any(p.name != LOCK for p in out_dir.iterdir())):
        raise SupernetError(f"{out_dir} exists and is not an empty directory; choose another output directory")


def _preflight(ctx: SearchContext, check: Callable[[SearchContext], None] | None) -> None:
    """Input errors that need the cost function, before anything is written.

    A constraint that no configuration can meet is refused here rather than after a search that
    evaluates nothing, where that is certain: a space small enough to enumerate is checked
    configuration by configuration; in a larger one a bound that the most favourable extreme
    violates (the smallest configuration for ``<=``/``<``, the largest for ``>=``/``>``) cannot be
    met, since every cost (MACs, parameters, bytes) grows with every choice. Anything else is
    left to the search, which leaves nothing behind if it evaluates nothing.
    """
    constraint = ctx.constraint
    if constraint is not None:
        smallest, largest = ctx.space.min_config(), ctx.space.max_config()
        ctx.violation(smallest)  # needs a cost function giving every constrained metric
        if ctx.encoding.size <= ENUMERABLE:
            impossible = all(ctx.violation(c) > 0 for c in ctx.encoding.all_configs())
        else:
            impossible = any(b.violation(ctx.cost(smallest if b.op in ("<=", "<") else largest)) > 0
                             for b in constraint.bounds)
        if impossible:
            low, high = ctx.cost(smallest), ctx.cost(largest)
            shown = ", ".join(f"{m} {low[m]:.4g} to {high[m]:.4g}" for m in dict.fromkeys(constraint.metrics))
            raise SupernetError(f"no configuration satisfies the constraint {constraint} (from the smallest to the "
                                f"largest configuration: {shown}); nothing was written")
    if check is not None:
        check(ctx)


def run_search(
    space: SearchSpace, evaluate: EvaluateFn, cost: CostFn | None, out_dir: str | Path,
    settings: SearchSettings | None = None, resume: bool = False, progress: bool = False,
    map_fn: MapFn | None = None, evaluate_at: Callable | None = None, max_samples: int | None = None,
) -> SearchResult:
    """Search ``space`` and write the results to ``out_dir``.

    Args:
        space: the search space (one integer variable per group).
        evaluate: ``config -> raw metrics`` (accuracy, loss, ...); called once per unique feasible config.
        cost: ``config -> cheap metrics`` (macs, params), used for constraints and the allocator's
            budget and merged into the history's metrics; may be None when neither is used.
        out_dir: a new or empty directory, or (with ``resume``) the directory of an earlier search.
        settings: the search settings (default: ``SearchSettings()``).
        resume: continue the search in ``out_dir``, evaluating only configs not in its history.
        progress: show a tqdm progress bar.
        map_fn: ``map_fn(evaluate, configs) -> [(metrics, seconds), ...]``: how the new configs of
            one generation are evaluated (default: one after another in this process; the CLI
            passes one that splits them across distributed processes).
        evaluate_at: ``(config, examples) -> raw metrics`` on the first ``examples`` of the
            ``max_samples`` examples ``evaluate`` scores: the lower fidelities of ``halving``.

    One process at a time writes a search: a second one, fresh or resumed, is refused while the
    first runs (a lock file, :data:`LOCK`, released by the system when its holder exits). A new
    search that ends before its first evaluation (bad input, no feasible configuration, an
    interrupt) leaves nothing behind.

    Raises:
        SupernetError: on bad input; nothing is written then.
    """
    settings = settings or SearchSettings()
    out_dir = Path(out_dir)
    wanted = manifest(space, settings)
    _check_out_dir(out_dir, wanted, resume)
    strategy = STRATEGIES[settings.algorithm]
    if resume:
        with exclusive(out_dir / LOCK, f"search {str(out_dir)!r}"):
            _check_out_dir(out_dir, wanted, resume)
            return _search(space, evaluate, cost, out_dir, settings, strategy, wanted, resume, progress, map_fn,
                           evaluate_at, max_samples)
    return _search(space, evaluate, cost, out_dir, settings, strategy, wanted, resume, progress, map_fn,
                   evaluate_at, max_samples)


def _search(space, evaluate, cost, out_dir: Path, settings: SearchSettings, strategy, wanted: dict, resume: bool,
            progress: bool, map_fn: MapFn | None, evaluate_at: Callable | None = None,
            max_samples: int | None = None) -> SearchResult:
    encoding = Encoding.from_space(space)
    objectives = resolve_objectives(settings.objectives)
    history = HistoryFile(out_dir / "history.csv", encoding, objectives)
    limit = settings.evaluations if strategy.budgeted else None
    ctx = SearchContext(space, encoding, settings, evaluate, cost, objectives, parse_constraint(settings.constraint),
                        limit, history, progress, map_fn, evaluate_at, max_samples)
    try:
        _preflight(ctx, strategy.check)
        if resume:
            strategy.run(ctx)
            return _finish(ctx, out_dir)
        created = not out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            with exclusive(out_dir / LOCK, f"search {str(out_dir)!r}"):  # through pareto.csv and subnets/
                _check_out_dir(out_dir, wanted, resume)  # another process may have started it meanwhile
                try:
                    write_atomic(out_dir / "search.json", json.dumps(wanted, indent=2) + "\n")
                    strategy.run(ctx)
                    if not ctx.records:
                        raise SupernetError("the search found no configuration that satisfies the constraint "
                                            f"{ctx.constraint}; nothing was written")
                except BaseException:
                    if not history.path.is_file() and not (out_dir / RUNG_FILE).is_file():
                        # nothing evaluated: remove what this search wrote
                        _discard(out_dir)
                    raise
                return _finish(ctx, out_dir)
        finally:
            if created and out_dir.is_dir() and not any(out_dir.iterdir()):
                out_dir.rmdir()
    finally:
        ctx.close()


def _discard(out_dir: Path) -> None:
    """Remove what a new search wrote before its first evaluation (its lock file last, while held)."""
    for name in ("search.json", "pareto.csv", "selected.json"):
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / "subnets", ignore_errors=True)
    (out_dir / LOCK).unlink(missing_ok=True)


def _finish(ctx: SearchContext, out_dir: Path) -> SearchResult:
    """Write pareto.csv, subnets/ and selected.json; build the result."""
    metric_names = ctx.history.metric_names or []
    history = records_frame(ctx.records, metric_names, ctx.objectives)
    columns = [o.column for o in ctx.objectives]
    pareto = pareto_front(history, columns)
    by_index = {r.index: r for r in ctx.records}
    front = [by_index[int(i)] for i in pareto["index"]]
    write_records(out_dir / "pareto.csv", front, metric_names, ctx.objectives)
    subnets = out_dir / "subnets"
    subnets.mkdir(exist_ok=True)
    for record in front:
        write_atomic(subnets / f"{record.index}.json", _json(_subnet(record, ctx)))
    if ctx.selected is not None:
        write_atomic(out_dir / "selected.json", _json(ctx.selected))
    return SearchResult(out_dir, ctx.settings, history, pareto, columns, ctx.selected, ctx.evaluator_calls)


def _subnet(record: Record, ctx: SearchContext) -> dict[str, Any]:
    objectives = {o.name: v for o, v in zip(ctx.objectives, record.objectives, strict=True)}
    return {"index": record.index, "config": record.config, "metrics": record.metrics, "objectives": objectives}


def _json(data: Any) -> str:
    """Strict JSON (infinite ratios become null)."""
    return json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n"
