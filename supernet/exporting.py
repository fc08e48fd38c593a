"""``supernet export``: ship one sub-network of a run, or every member of a search's Pareto front.

The sub-network is ``max``, ``mid``, ``min``, a JSON file ``{group: rank}`` (``subnets/<i>.json``
of a search works), ``best`` (the front member of ``--search`` with the highest whole-validation
accuracy that satisfies ``--constraint``), or with ``--pareto`` every front member. Each export
verifies itself on real validation examples (:mod:`supernet.export`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from supernet import validate
from supernet.errors import SupernetError
from supernet.export import FORMATS, check_format, export, read_manifest
from supernet.loader import Setup, load_run
from supernet.space import SearchSpace, load_config_file
from supernet.tasks import collate, rows_of

VERIFY_EXAMPLES = 8


def _search_dir(run_dir: Path, name: str | None) -> Path:
    root = run_dir / "search"
    if name is None:
        found = sorted(p.name for p in root.iterdir() if (p / "pareto.csv").is_file()) if root.is_dir() else []
        if len(found) != 1:
            raise SupernetError(f"name the search with --search ({'one of ' + ', '.join(found) if found else 'run'} "
                                f"{'' if found else repr(str(run_dir)) + ' has no finished search'})".strip())
        name = found[0]
    d = root / validate.run_name(name)
    if not (d / "pareto.csv").is_file():
        raise SupernetError(f"run {str(run_dir)!r} has no finished search {name!r} (no pareto.csv)")
    return d


def _front(search: Path) -> pd.DataFrame:
    try:
        front = pd.read_csv(search / "pareto.csv")
        front["config"].map(json.loads)
    except (OSError, ValueError, KeyError, pd.errors.ParserError) as e:
        raise SupernetError(f"{str(search / 'pareto.csv')!r} is corrupt: {e}") from None
    return front


def pick_best(front: pd.DataFrame, constraint: str | None) -> pd.Series:
    """The front member with the highest whole-validation accuracy (search accuracy if the final
    evaluation is missing) among those that satisfy ``constraint``."""
    from supernet.search import parse_constraint

    rule = parse_constraint(constraint)
    ok = front
    if rule is not None:
        missing = [m for m in rule.metrics if m not in front.columns]
        if missing:
            raise SupernetError(f"--constraint names {missing[0]!r}, which pareto.csv does not have")
        ok = front[[rule.violation(row) == 0 for row in front.to_dict(orient="records")]]
    if ok.empty:
        raise SupernetError(f"no front member satisfies {constraint!r}")
    column = "val_accuracy" if "val_accuracy" in ok.columns else "accuracy"
    return ok.sort_values([column, "index"], ascending=[False, True]).iloc[0]


def verification_batches(setup: Setup, n: int = VERIFY_EXAMPLES) -> list[dict]:
    """A few real validation examples as the model's inputs (labels dropped)."""
    ds = setup.enc.splits["validation"]
    batch = collate(setup.enc, rows_of(ds, range(min(n, len(ds)))))
    return [{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}]


def _metadata(row: pd.Series | None, source: str) -> dict:
    meta = {"source": source}
    if row is not None:
        for k in ("accuracy", "val_accuracy", "test_accuracy", "val_examples", "test_examples"):
            if k in row and pd.notna(row[k]):
                meta[k] = float(row[k]) if "accuracy" in k else int(row[k])
    return meta


def export_command(run_dir: str | Path, subnet: str | None, fmt: str, out: str | Path | None,
                   search: str | None = None, constraint: str | None = None, pareto: bool = False,
                   overwrite: bool = False) -> dict:
    """Export and verify; returns what was written."""
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise SupernetError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if pareto == (subnet is not None):
        raise SupernetError("give either --subnet (max, mid, min, best or a JSON file) or --pareto")
    if constraint is not None and subnet != "best":
        raise SupernetError("--constraint chooses among front members: use it with --subnet best")
    from supernet import run as runio

    record = runio.read_run_config(run_dir)
    runio.weights_path(run_dir)
    space = SearchSpace.from_json({"choices": record.get("choices") or {}})
    jobs: list[tuple[str, dict | None, pd.Series | None]] = []  # (name, config or None=named, row)
    source = subnet or "pareto"
    if pareto or subnet == "best":
        sdir = _search_dir(run_dir, search)
        front = _front(sdir)
        rows = [r for _, r in front.iterrows()] if pareto else [pick_best(front, constraint)]
        jobs = [(str(int(r["index"])), json.loads(r["config"]), r) for r in rows]
        source = f"search {sdir.name}"
    elif subnet in ("max", "mid", "min"):
        jobs = [(subnet, None, None)]
    else:
        data = space.validate(load_config_file(subnet))  # before the model loads: fail fast
        jobs = [(Path(subnet).stem, data, None)]
        source = f"file {subnet}"
    label = "pareto" if pareto else "best" if subnet == "best" else jobs[0][0]
    default = run_dir / "exports" / f"{label}-{fmt}"
    target = Path(out) if out is not None else default
    _check_out(target, pareto, overwrite)

    setup, _ = load_run(run_dir)
    check_format(setup.net, fmt)  # a format this run cannot produce: refused before anything is written
    batches = verification_batches(setup)
    written = []
    for name, config, row in jobs:
        config = setup.net.space.named_config(name) if config is None else setup.net.space.validate(config)
        dest = target / name if pareto else target
        manifest = export(setup.net, config, dest, fmt, batches=batches, tokenizer=setup.tokenizer,
                          macs=setup.net.macs(config, setup.cfg.max_length, merged=fmt != "peft"),
                          metadata=_metadata(row, source), overwrite=overwrite)
        written.append({"name": name, "path": str(dest), "config": json.dumps(config, sort_keys=True),
                        "shipped_params": manifest["shipped_params"], "macs": manifest.get("macs"),
                        "bytes_on_disk": sum(manifest.get("size_on_disk", {}).values()) or None,
                        **_metadata(row, source), "max_abs_diff": manifest["verification"]["max_abs_diff"]})
    if pareto:
        index = target / "index.csv"
        pd.DataFrame(written).to_csv(index.with_name("index.csv.tmp"), index=False)
        os.replace(index.with_name("index.csv.tmp"), index)
    return {"format": fmt, "out": str(target), "exports": written}


def _check_out(target: Path, pareto: bool, overwrite: bool) -> None:
    """Refuse an output folder that exists and is not an export of ours (before anything loads)."""
    if target.exists() and not target.is_dir():
        raise SupernetError(f"--out {str(target)!r} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()):
        if pareto:
            ours = (target / "index.csv").is_file() and all(
                p.is_dir() and read_manifest(p) is not None for p in target.iterdir() if p.name != "index.csv")
        else:
            ours = read_manifest(target) is not None
        if not ours:
            raise SupernetError(f"--out {str(target)!r} exists and is not a supernet export; choose another folder")
        if not overwrite:
            raise SupernetError(f"--out {str(target)!r} holds an export; pass --overwrite to replace it")
    validate.writable_dir("--out", target)
