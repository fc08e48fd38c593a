"""Export folders: what one holds, and replacing one without losing a file supernet did not write.

An export is staged in a fresh sibling folder and renamed into place at the end
(:func:`staging_dir`), so a failed export leaves nothing behind. ``manifest.json`` marks a
folder as one of our exports and lists every file it wrote with its size and SHA-256
(:mod:`supernet.files`); only what it lists, unchanged, is ever replaced.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from supernet import files
from supernet.errors import SupernetError

MANIFEST = "manifest.json"
MARKER = "supernet_export"  # key of manifest.json that marks a directory as one of our exports


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The manifest of one of our exports, or ``None`` if ``directory`` is not one."""
    path = Path(directory) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and MARKER in data else None


# The files save_pretrained (transformers, PEFT, compressed-tensors) and supernet wrote into an export made
# before manifests listed their files: only these are taken for ours in such an old export.
_LEGACY_FILES = re.compile(
    r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens|vocab|adapter_config"
    r"|model\.safetensors\.index|subnet)\.json|model(-\d+-of-\d+)?\.safetensors|adapter_model\.safetensors"
    r"|vocab\.txt|merges\.txt|tokenizer\.model|spiece\.model|chat_template\.jinja|README\.md|recipe\.yaml")


def foreign_entries(directory: Path, pareto: bool = False) -> list[str] | None:
    """What in ``directory`` supernet did not write, or ``None`` when it is not one of our exports.

    An export's ``manifest.json`` lists every file it wrote with its size and SHA-256; a file not
    listed, or changed since, is foreign (:mod:`supernet.files`). A ``--pareto`` folder's manifest
    says so, and each member is checked as an export of its own. An old ``--pareto`` folder (before
    it had a manifest) is recognised only where a ``--pareto`` export is asked for (``pareto``): an
    ``index.csv`` beside members that each carry their own manifest.
    """
    manifest = read_manifest(directory)
    if manifest is None:
        if not (pareto and (directory / "index.csv").is_file()):
            return None
        members = [e for e in directory.iterdir() if e.name != "index.csv"]
        if not all(e.is_dir() and not e.is_symlink() and read_manifest(e) is not None for e in members):
            return None
    is_pareto = bool(manifest.get("pareto")) if manifest is not None else True
    recorded = manifest.get("files") if manifest is not None else {"index.csv": files.fingerprint(
        directory / "index.csv")}
    out = []
    for entry in sorted(directory.iterdir()):
        name = entry.name
        if name == MANIFEST and manifest is not None:
            continue
        if is_pareto and entry.is_dir() and not entry.is_symlink():
            inner = foreign_entries(entry)
            out += [f"{name}/"] if inner is None else [f"{name}/{n}" for n in inner]
        elif isinstance(recorded, dict):
            if entry.is_dir() and not entry.is_symlink():
                listed = {n for n in recorded if n.startswith(name + "/")}
                found = {f"{name}/{n}" for n in files.tree(entry)}
                out += sorted(found - listed) or ([] if listed else [f"{name}/"])
                out += [n for n in sorted(found & listed) if not files.unchanged(directory, n, recorded)]
            elif not files.unchanged(directory, name, recorded):
                out.append(name)
        elif entry.is_symlink() or not entry.is_file() or not _LEGACY_FILES.fullmatch(name):
            out.append(name + ("/" if entry.is_dir() else ""))
    return out


def check_export_target(out_dir: str | os.PathLike, overwrite: bool, flag: str = "--out",
                        pareto: bool = False) -> Path:
    """Refuse a target that exists and is not an empty folder, unless it is one of our exports that
    holds nothing supernet did not write and ``overwrite`` is given. Checked before any work, and
    again when the old export is moved aside (:func:`staging_dir`)."""
    target = Path(out_dir)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise SupernetError(f"{flag} {str(target)!r} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()):
        _refuse_foreign(flag, target, foreign_entries(target, pareto))
        if not overwrite:
            raise SupernetError(f"{flag} {str(target)!r} holds an export; pass --overwrite to replace it")
    return target


def _refuse_foreign(flag: str, target: Path, found: list[str] | None) -> None:
    if found is None:
        raise SupernetError(f"{flag} {str(target)!r} exists and is not a supernet export; choose another folder")
    if found:
        raise SupernetError(f"{flag} {str(target)!r} holds {files.describe(target, found)}, which supernet did not "
                            "write (or which changed since); an export never replaces such files: move them "
                            "or choose another folder")


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and missing ancestors; return the ones created, outermost first."""
    missing = []
    d = directory.absolute()
    while not d.exists():
        missing.append(d)
        d = d.parent
    for m in reversed(missing):
        m.mkdir()
    return list(reversed(missing))


def _swap_in(staging: Path, target: Path, pareto: bool = False) -> None:
    """Rename ``staging`` to ``target``; an old export there is moved aside, checked once more for
    files supernet did not write (they may have appeared while the export ran: then it is moved
    back and the export refused), and deleted last."""
    def check(old: Path) -> None:
        found = foreign_entries(old, pareto)
        if found is None or found:
            _refuse_foreign("export folder", target, found)

    if target.is_dir() and any(target.iterdir()):
        files.swap_dir(staging, target, check)
    else:
        os.replace(staging, target)


@contextmanager
def staging_dir(target: Path, pareto: bool = False) -> Iterator[Path]:
    """A fresh sibling directory of ``target``, renamed into place on success and removed on failure."""
    try:
        created = _make_parents(target.parent)
        staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    except OSError as e:
        raise SupernetError(f"cannot create the export directory next to {str(target)!r}: {e.strerror}") from None
    try:
        yield staging
        _swap_in(staging, target, pareto)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                break
        raise
