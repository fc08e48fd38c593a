"""``supernet export``: ship one sub-network of a run, or every member of a search's Pareto front.

The sub-network is ``max``, ``mid``, ``min``, a JSON file ``{group: rank}`` (``subnets/<i>.json``
of a search works), ``best`` (the front member of ``--search`` with the highest whole-validation
accuracy that satisfies ``--constraint``), or with ``--pareto`` every front member. Each export
verifies itself on real validation examples (:mod:`supernet.export`).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from supernet import files, runfiles, validate
from supernet.errors import SupernetError
from supernet.export import (
    FORMAT_VERSION,
    FORMATS,
    MANIFEST,
    MARKER,
    check_export_target,
    check_format,
    export,
    staging_dir,
)
from supernet.files import write_atomic
from supernet.loader import Setup, load_run
from supernet.runfiles import write_json
from supernet.space import SearchSpace, load_config_file
from supernet.tasks import collate, rows_of

VERIFY_EXAMPLES = 8


SPEED_BATCH = 32  # the batch of the speed-up an elastic-width export reports


def _shrinks(setup: Setup) -> bool:
    """Whether a merged export is smaller than the original: cut widths, or layers an adapter kind
    replaces (JACTUS' factors)."""
    from supernet.adapters import ElasticAdapter

    return setup.net.width is not None or any(type(a).export_layer is not ElasticAdapter.export_layer
                                              for a in setup.net.adapters.values())


def _speed(setup: Setup, config: dict) -> dict:
    """Parameters of the cut (or factored) model and of the original, and the measured speed-up (this machine)."""
    from supernet.evaluator import compare_speed
    from supernet.export_core import base_model_copy, merged_model

    cut, original = merged_model(setup.net, config), base_model_copy(setup.net).eval()
    speed = compare_speed(cut, original, SPEED_BATCH, setup.cfg.max_length)
    return {"model_params": sum(p.numel() for p in cut.parameters()),
            "original_params": sum(p.numel() for p in original.parameters()),
            "speedup": speed["speedup"], "speed_batch": SPEED_BATCH, "speed_tokens": setup.cfg.max_length}


def run(args: argparse.Namespace) -> int:
    """``supernet export``: export and verify, one line per export on stderr, the summary as JSON on stdout."""
    out = export_command(args.run, args.subnet, args.format, args.out, args.search, args.constraint, args.pareto,
                         args.overwrite, peft_scale=args.peft_scale, sparse_storage=args.sparse_storage)
    for e in out["exports"]:
        size = f", {e['bytes_on_disk'] / 2**20:.1f} MB on disk" if e.get("bytes_on_disk") else ""
        print(f"exported {e['name']} ({args.format}, {e['shipped_params']:,} parameters shipped{size}, verified: "
              f"max |diff| {e['max_abs_diff']:.2e}) to {e['path']}", file=sys.stderr)
        if "speedup" in e:
            print(f"  smaller model: {e['model_params']:,} parameters (original {e['original_params']:,}, "
                  f"{1 - e['model_params'] / e['original_params']:.1%} fewer), {e['speedup']:.2f}x the original's "
                  f"speed at batch {e['speed_batch']} x {e['speed_tokens']} tokens (measured here, median of 5)",
                  file=sys.stderr)
    print(json.dumps(out))
    return 0


def finished_searches(run_dir: Path) -> list[str]:
    """The run's searches that finished: a ``search.json`` and a ``pareto.csv`` with at least one member.
    A search that stopped or failed before its end is not offered for export."""
    root = run_dir / "search"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "search.json").is_file()
                  and _front_rows(p / "pareto.csv") > 0)


def _front_rows(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return max(sum(1 for line in f if line.strip()) - 1, 0)
    except OSError:
        return 0


def _search_dir(run_dir: Path, name: str | None) -> Path:
    found = finished_searches(run_dir)
    if name is None:
        if len(found) != 1:
            raise SupernetError(f"name the search with --search ({'one of ' + ', '.join(found) if found else 'run'} "
                                f"{'' if found else repr(str(run_dir)) + ' has no finished search'})".strip())
        name = found[0]
    d = run_dir / "search" / validate.run_name(name)
    if name not in found:
        why = "it does not exist" if not d.is_dir() else "it never finished (no Pareto front)"
        raise SupernetError(f"run {str(run_dir)!r} has no finished search {name!r}: {why}"
                            + (f"; finished: {', '.join(found)}" if found else ""))
    return d


def _front(search: Path) -> pd.DataFrame:
    path = search / "pareto.csv"
    try:
        front = pd.read_csv(io.StringIO(validate.read_text("Pareto file", path)))
        front["config"].map(json.loads)
        front["index"] = front["index"].astype("int64")
    except (ValueError, KeyError, RecursionError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise SupernetError(f"{str(path)!r} is corrupt: {e}") from None
    if front.empty:
        raise SupernetError(f"{str(path)!r} has no members")
    return front


def pick_best(front: pd.DataFrame, constraint: str | None) -> pd.Series:
    """The front member with the highest whole-validation accuracy (search accuracy if the final
    evaluation is missing) among those that satisfy ``constraint``; a member without a finite
    accuracy is never chosen."""
    from supernet.search import parse_constraint

    rule = parse_constraint(constraint)
    column = "val_accuracy" if "val_accuracy" in front.columns else "accuracy"
    if column not in front.columns:
        raise SupernetError("the Pareto file has no accuracy column to choose the best member by")
    ok = front[np.isfinite(pd.to_numeric(front[column], errors="coerce").to_numpy(dtype=float))]
    if rule is not None:
        missing = [m for m in rule.metrics if m not in front.columns]
        if missing:
            raise SupernetError(f"--constraint names {missing[0]!r}, which pareto.csv does not have")
        ok = ok[[rule.violation(row) == 0 for row in ok.to_dict(orient="records")]]
    if ok.empty:
        what = f"satisfies {constraint!r}" if rule is not None else "has a finite accuracy"
        raise SupernetError(f"no front member {what}")
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


def format_options(fmt: str, peft_scale: str | None, sparse_storage: str | None) -> dict:
    """The options of one format; an option of another format is refused, not ignored."""
    for flag, value, owner in (("--peft-scale", peft_scale, "peft"), ("--sparse-storage", sparse_storage,
                                                                       "compressed")):
        if value is not None and fmt != owner:
            raise SupernetError(f"{flag} is an option of --format {owner}, not of --format {fmt}")
    if fmt == "peft" and peft_scale is not None:
        return {"scale": peft_scale}
    if fmt == "compressed" and sparse_storage is not None:
        return {"sparse_storage": sparse_storage}
    return {}


def export_command(run_dir: str | Path, subnet: str | None, fmt: str, out: str | Path | None,
                   search: str | None = None, constraint: str | None = None, pareto: bool = False,
                   overwrite: bool = False, peft_scale: str | None = None, sparse_storage: str | None = None) -> dict:
    """Export and verify; returns what was written."""
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise SupernetError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    options = format_options(fmt, peft_scale, sparse_storage)
    if pareto == (subnet is not None):
        raise SupernetError("give either --subnet (max, mid, min, best or a JSON file) or --pareto")
    if constraint is not None and subnet != "best":
        raise SupernetError("--constraint chooses among front members: use it with --subnet best")
    record = runfiles.read_run_config(run_dir)
    runfiles.weights_path(run_dir)
    space = SearchSpace.from_json({"choices": record.get("choices") or {}, "kinds": record.get("kinds") or {}})
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
    files.check_clear_of("--out", target, runfiles.paths_in_use(run_dir, record), f"run {str(run_dir)!r}")
    check_export_target(target, overwrite, pareto=pareto)
    validate.writable_dir("--out", target)

    setup, _ = load_run(run_dir)
    check_format(setup.net, fmt)  # a format this run cannot produce: refused before anything is written
    batches = verification_batches(setup)
    labels = {"labels": list(setup.label_names)}

    def one(name: str, config: dict | None, row: pd.Series | None, dest: Path) -> dict:
        config = setup.net.space.named_config(name) if config is None else setup.net.space.validate(config)
        manifest = export(setup.net, config, dest, fmt, batches=batches, tokenizer=setup.tokenizer,
                          macs=setup.net.macs(config, setup.cfg.max_length, merged=fmt != "peft"),
                          metadata={**_metadata(row, source), **labels}, overwrite=overwrite, **options)
        return {"name": name, "path": str(target / name if pareto else target),
                "config": json.dumps(config, sort_keys=True), "shipped_params": manifest["shipped_params"],
                "macs": manifest.get("macs"), "bytes_on_disk": sum(manifest.get("size_on_disk", {}).values()) or None,
                **_metadata(row, source), "max_abs_diff": manifest["verification"]["max_abs_diff"],
                **(_speed(setup, config) if fmt == "merged" and _shrinks(setup) else {})}

    if not pareto:
        written = [one(*jobs[0], target)]
    else:  # the whole front is staged in one folder and swapped in at the end: all members or none
        with staging_dir(target, pareto=True) as staging:
            written = [one(name, config, row, staging / name) for name, config, row in jobs]
            write_atomic(staging / "index.csv", pd.DataFrame(written).to_csv(index=False))
            write_json(staging / MANIFEST, {MARKER: FORMAT_VERSION, "pareto": True, "format": fmt, "source": source,
                                            "members": [w["name"] for w in written],
                                            "files": files.fingerprints(staging, ["index.csv"])})
    return {"format": fmt, "out": str(target), "exports": written}
