"""Run-folder IO: what ``train`` writes into a run folder and every other command reads back.

``runs/<name>/``: ``config.json`` (everything needed to rebuild the super-network),
``adapter.safetensors`` (trainable weights at ``r_max``, written when training ends),
``train_log.csv`` (one row per optimizer step, with the sampled configuration),
``eval_log.csv`` (periodic validation of max / mid / min), ``summary.json`` and
``checkpoint/`` (weights, optimizer, scheduler and RNG state for ``--resume``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from supernet import files
from supernet.errors import SupernetError
from supernet.files import write_atomic
from supernet.validate import inside, jsonable

if TYPE_CHECKING:
    import torch

CONFIG = "config.json"
ADAPTER = "adapter.safetensors"
CHECKPOINT = "checkpoint"
SUMMARY = "summary.json"
MARKER = ".supernet-run"  # written first into every run folder: only such folders are ever replaced
# What supernet itself writes into a run folder; --overwrite removes these and nothing else.
OWN_ENTRIES = {MARKER, CONFIG, ADAPTER, SUMMARY, "train_log.csv", "eval_log.csv", CHECKPOINT, "compression.safetensors",
               "width_order.safetensors", "adapter_frozen.safetensors", CHECKPOINT + ".tmp", CHECKPOINT + ".old",
               "search", "exports", "plots", "fidelity"}


def write_json(path: Path, data) -> None:
    """Write strict JSON atomically (temp file + rename), sorted and indented; NaN/inf become null."""
    write_atomic(path, json.dumps(jsonable(data), indent=2, sort_keys=True, allow_nan=False) + "\n")


def _own(entry: Path) -> bool:
    name = entry.name
    return name in OWN_ENTRIES or (name.startswith("process") and name.endswith(".jsonl")) or name.endswith(".tmp")


def check_replaceable(run_dir: Path, keep: list[Path]) -> None:
    """Refuse ``--overwrite`` unless ``run_dir`` is a supernet run holding only what supernet wrote,
    and holds none of ``keep`` (the model and data being read)."""
    if not run_dir.is_dir() or not (run_dir / MARKER).is_file():
        raise SupernetError(f"--overwrite refuses to delete {str(run_dir)!r}: it is not a supernet run "
                            f"(no {MARKER} marker)")
    for k in keep:
        if k.exists() and inside(k, run_dir):
            raise SupernetError(f"--overwrite refuses to delete {str(run_dir)!r}: it holds {str(k)!r}, "
                                "which this run reads")
    foreign = sorted(e.name for e in run_dir.iterdir() if not _own(e))
    foreign += _foreign_outputs(run_dir)
    if foreign:
        raise SupernetError(f"--overwrite refuses to delete {str(run_dir)!r}: it holds {foreign[0]!r}, "
                            "which supernet did not write (or which changed since)")


SEARCH_FILES = re.compile(r"search\.json|history\.csv|pareto\.csv|selected\.json|\.lock|subnets/\d+\.json|.*\.tmp")
PLOT_FILES = re.compile(r"(search_progress_.+|hypervolume|training)\.(png|csv)|.*\.tmp")


def _foreign_outputs(run_dir: Path) -> list[str]:
    """What a user put among the run's searches, exports and plots (``--overwrite`` deletes those
    folders whole): anything a search does not write, an export's foreign entries, a plot file the
    plots ledger does not list (or, with no ledger, that is not named as a plot)."""
    from supernet import files
    from supernet.export import foreign_entries

    out = []
    search, exports, plots = run_dir / "search", run_dir / "exports", run_dir / "plots"
    for d in sorted(search.iterdir()) if search.is_dir() else []:
        names = files.tree(d) if d.is_dir() and not d.is_symlink() else [""]
        out += [f"search/{d.name}/{n}".rstrip("/") for n in names if not SEARCH_FILES.fullmatch(n)]
    for d in sorted(exports.iterdir()) if exports.is_dir() else []:
        found = foreign_entries(d, pareto=True) if d.is_dir() and not d.is_symlink() else None
        out += [f"exports/{d.name}"] if found is None else [f"exports/{d.name}/{n}" for n in found]
    if plots.is_dir():
        recorded = files.read_ledger(plots)
        for n in files.tree(plots):
            if n == files.LEDGER:
                continue
            ours = n.endswith(".tmp") or (files.unchanged(plots, n, recorded) if recorded
                                          else bool(PLOT_FILES.fullmatch(n)))
            out += [] if ours else [f"plots/{n}"]
    return out


def remove_run(run_dir: Path) -> None:
    """Delete what supernet wrote into ``run_dir`` (after :func:`check_replaceable`), marker last."""
    for e in sorted(run_dir.iterdir(), key=lambda e: e.name == MARKER):
        if _own(e):
            shutil.rmtree(e) if e.is_dir() and not e.is_symlink() else e.unlink()


def mark_run(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).write_text("a supernet run folder; `supernet train --overwrite` may replace it\n")


def swap_dir(new: Path, final: Path) -> None:
    """:func:`supernet.files.swap_dir`: a kill at any point leaves a complete checkpoint under one of
    the names ``final``, ``final.tmp`` (= ``new``) or ``final.old``; :func:`checkpoints` reads all three."""
    files.swap_dir(new, final, old=final.with_name(final.name + ".old"))


def checkpoints(run_dir: Path) -> tuple[list[tuple[int, Path]], bool]:
    """Complete checkpoints (their ``state.json`` is written last) as ``(step, folder)``, newest
    first, and whether any checkpoint folder exists at all."""
    found, any_dir = [], False
    for name in (CHECKPOINT, CHECKPOINT + ".tmp", CHECKPOINT + ".old"):
        d = run_dir / name
        any_dir |= d.is_dir()
        try:
            state = json.loads((d / "state.json").read_text())
            found.append((int(state["step"]), d))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(found, key=lambda t: -t[0]), any_dir


def settle_checkpoints(run_dir: Path) -> None:
    """After a kill inside :func:`swap_dir`: put the newest complete checkpoint under its own
    name and delete the other copies (all written by supernet)."""
    found, _ = checkpoints(run_dir)
    final = run_dir / CHECKPOINT
    if found and found[0][1] != final:
        newest = found[0][1]
        if final.exists():
            shutil.rmtree(final)
        os.replace(newest, final)
    for name in (CHECKPOINT + ".tmp", CHECKPOINT + ".old"):
        if found and (run_dir / name).is_dir():
            shutil.rmtree(run_dir / name)


def finished_at(run_dir: Path) -> int | None:
    """The step a finished run ended at (``adapter.safetensors`` and ``summary.json`` written), else None."""
    try:
        steps = json.loads((run_dir / SUMMARY).read_text())["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return int(steps) if (run_dir / ADAPTER).is_file() else None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    files.write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise SupernetError(f"cannot read weights {str(path)!r}: {e}") from None


def read_run_config(run_dir: str | Path) -> dict:
    d = Path(run_dir)
    if not d.exists():
        raise SupernetError(f"run directory {str(d)!r} does not exist")
    if not d.is_dir():
        raise SupernetError(f"--run {str(d)!r} is a file, not a run folder")
    f = d / CONFIG
    if not f.is_file():
        raise SupernetError(f"{str(d)!r} is not a supernet run (no {CONFIG})")
    try:
        data = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise SupernetError(f"run config {str(f)!r} is corrupt (not JSON)") from None
    if not isinstance(data, dict) or "train" not in data or "supernet" not in data:
        raise SupernetError(f"run config {str(f)!r} is corrupt (missing train/supernet sections)")
    return data


# What a run reads back later: overwriting any of these silently changes every later eval, search or export.
IN_USE = (MARKER, CONFIG, ADAPTER, SUMMARY, "train_log.csv", "eval_log.csv", CHECKPOINT, CHECKPOINT + ".tmp",
          CHECKPOINT + ".old", "compression.safetensors", "search")


def paths_in_use(run_dir: str | Path, record: dict | None = None) -> list[Path]:
    """The files a command on this run reads: the run's own records, and its model folder and data file
    when they are local paths (a built-in or Hub model lives in a cache supernet does not write to)."""
    d = Path(run_dir)
    out = [d / name for name in IN_USE]
    train = (record or {}).get("train") if isinstance(record, dict) else None
    for key in ("model", "dataset"):
        value = train.get(key) if isinstance(train, dict) else None
        if isinstance(value, str) and value and os.path.lexists(value):
            out.append(Path(value))
    return out


def weights_path(run_dir: str | Path) -> Path:
    """Final weights if training finished, else the latest checkpoint's."""
    d = Path(run_dir)
    for p in (d / ADAPTER, d / CHECKPOINT / "trainable.safetensors"):
        if p.is_file():
            return p
    raise SupernetError(f"run {str(d)!r} has no weights yet (no {ADAPTER} or checkpoint)")
