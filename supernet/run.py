"""A run directory: what ``train`` writes and ``eval`` reads.

``runs/<name>/``: ``config.json`` (everything needed to rebuild the super-network),
``adapter.safetensors`` (trainable weights at ``r_max``, written when training ends),
``train_log.csv`` (one row per optimizer step, with the sampled configuration),
``eval_log.csv`` (periodic validation of max / mid / min), ``summary.json`` and
``checkpoint/`` (weights, optimizer, scheduler and RNG state for ``--resume``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from supernet.errors import SupernetError

CONFIG = "config.json"
ADAPTER = "adapter.safetensors"
CHECKPOINT = "checkpoint"


def write_json(path: Path, data) -> None:
    """Write JSON atomically (temp file + rename), sorted and indented."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise SupernetError(f"cannot read weights {str(path)!r}: {e}") from None


def read_run_config(run_dir: str | Path) -> dict:
    d = Path(run_dir)
    if not d.is_dir():
        raise SupernetError(f"run directory {str(d)!r} does not exist")
    f = d / CONFIG
    if not f.is_file():
        raise SupernetError(f"{str(d)!r} is not a supernet run (no {CONFIG})")
    try:
        data = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SupernetError(f"run config {str(f)!r} is corrupt (not JSON)") from None
    if not isinstance(data, dict) or "train" not in data or "supernet" not in data:
        raise SupernetError(f"run config {str(f)!r} is corrupt (missing train/supernet sections)")
    return data


def weights_path(run_dir: str | Path) -> Path:
    """Final weights if training finished, else the latest checkpoint's."""
    d = Path(run_dir)
    for p in (d / ADAPTER, d / CHECKPOINT / "trainable.safetensors"):
        if p.is_file():
            return p
    raise SupernetError(f"run {str(d)!r} has no weights yet (no {ADAPTER} or checkpoint)")
