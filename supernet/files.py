"""One rule for writing: supernet never overwrites or deletes a file that it did not write.

Every command that writes (``eval --predictions``, ``export``, ``plot``, ``search``) goes
through this module, so the rule has one implementation:

- **Atomic writes.** A file is written to a fresh temporary sibling and renamed into place
  (:func:`write_atomic`), so a kill leaves the old file or the new one, never half of one.
- **Ownership.** A file may be replaced only when supernet wrote it and it is unchanged since:
  its name, size and SHA-256 are in the ledger of its folder (:data:`LEDGER`, or an export's
  ``manifest.json``, which holds the same ``files`` record). A user's file of the same name,
  or our file edited by the user, is *foreign*, and the write is refused, naming it.
- **Files in use.** Nothing is written over, into or around the files of a run, model or
  dataset that the command reads (:func:`check_clear_of`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from supernet.errors import SupernetError

LEDGER = ".supernet-files.json"  # {name: {"bytes": n, "sha256": hex}} of the files supernet wrote in a folder
_CHUNK = 1 << 20


def write_atomic(path: str | os.PathLike, data: str | bytes | Callable[[Path], None]) -> Path:
    """Write ``data`` to ``path`` through a new, uniquely named temporary sibling and a rename.

    ``data`` is the content, or a callable that writes the file it is given (a library's own
    saver: safetensors, say). The temporary name is fresh, so a user's own ``NAME.tmp`` is never
    touched, and the temporary file never outlives a failure. The one place a file is replaced.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "xb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()
    return path


def swap_dir(new: Path, final: Path, check_old: Callable[[Path], None] | None = None,
             old: Path | None = None) -> None:
    """Put the complete folder ``new`` in place of ``final``: the old one is renamed aside, the new
    one renamed in, then the old one deleted; the one place a folder is replaced. A kill at any
    point leaves a complete folder under ``final``, ``new`` or the aside name ``old`` (default: a
    fresh hidden sibling name, so no folder of the user's is ever taken for it; a caller that
    recovers from a kill by that name passes its own, which must be one of its own files).
    ``check_old(old)`` runs on the old folder once it is aside; if it raises, the old folder is
    put back and nothing is replaced."""
    if not final.exists():
        os.replace(new, final)
        return
    if old is None:
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:12]}")
    elif old.exists():
        shutil.rmtree(old)
    os.replace(final, old)
    try:
        if check_old is not None:
            check_old(old)
        os.replace(new, final)
    except (OSError, SupernetError):  # refused, or the rename failed: the old folder goes back
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _digest(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def fingerprint(path: str | os.PathLike) -> dict:
    """``{"bytes": size, "sha256": hex digest}`` of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def fingerprints(folder: Path, names: Iterable[str]) -> dict[str, dict]:
    """The fingerprints of ``folder/name`` for each name (relative paths with ``/`` allowed)."""
    return {name: fingerprint(folder / name) for name in sorted(names)}


def tree(folder: Path) -> list[str]:
    """Every file under ``folder`` as a relative ``/`` path, and every non-file (link, device) as itself."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        base = Path(root).relative_to(folder)
        for name in files:
            out.append((base / name).as_posix())
        for name in dirs:
            if (Path(root) / name).is_symlink():
                out.append((base / name).as_posix())
    return sorted(out)


def _versions(entry) -> list[dict]:
    """The fingerprints a ledger entry accepts (a dict, or a list while a write is under way)."""
    entries = entry if isinstance(entry, list) else [entry]
    return [e for e in entries if isinstance(e, dict)]


def unchanged(folder: Path, name: str, recorded: Mapping[str, dict | list]) -> bool:
    """Whether ``folder/name`` is a regular file that ``recorded`` lists with its present size and hash."""
    path = folder / name
    wanted = _versions(recorded.get(name))
    if not wanted or path.is_symlink() or not path.is_file():
        return False
    size = path.stat().st_size
    if all(w.get("bytes") != size for w in wanted):
        return False
    now = fingerprint(path)
    return any(now == {"bytes": w.get("bytes"), "sha256": w.get("sha256")} for w in wanted)


def describe(folder: Path, names: list[str]) -> str:
    """``'a.txt', 'notes/' and 2 more`` for an error message."""
    shown = [f"{n!r}" for n in names[:3]]
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(shown) + more


# ----------------------------------------------------------------------------- a folder's ledger
def read_ledger(folder: Path) -> dict[str, dict]:
    """The files supernet recorded as written into ``folder`` (empty if none, or if the ledger is unreadable)."""
    try:
        data = json.loads((folder / LEDGER).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    return {k: v for k, v in files.items() if isinstance(k, str)} if isinstance(files, dict) else {}


def foreign(folder: Path, names: Iterable[str], recorded: Mapping[str, dict] | None = None) -> list[str]:
    """Those of ``names`` that exist in ``folder`` but that supernet did not write (or that changed since)."""
    recorded = read_ledger(folder) if recorded is None else recorded
    return [n for n in names if os.path.lexists(folder / n) and not unchanged(folder, n, recorded)]


def refuse_foreign(flag: str, folder: Path, names: Iterable[str], recorded: Mapping[str, dict] | None = None) -> None:
    """Refuse, before anything is written, to replace any of ``names`` in ``folder`` that supernet did not write."""
    found = foreign(folder, list(names), recorded)
    if found:
        raise SupernetError(f"{flag} {str(folder)!r} holds {describe(folder, found)}, which supernet did not write "
                            "(or which changed since); it never overwrites such files: move them or choose another "
                            "folder")


def _write_ledger(folder: Path, files: Mapping[str, dict | list]) -> None:
    write_atomic(folder / LEDGER, json.dumps({"written_by": "supernet", "files": dict(files)}, indent=2,
                                             sort_keys=True) + "\n")


def write_owned(folder: Path, name: str, data: str | bytes) -> Path:
    """Write ``folder/name`` atomically and record it in the folder's ledger, crash-safe.

    The new fingerprint joins the old one in the ledger before the file is renamed into place,
    and replaces it after; a kill at any point leaves a file the ledger accepts (old or new), so
    a later run never takes supernet's own file for a user's. Call :func:`refuse_foreign` first.
    """
    raw = data.encode() if isinstance(data, str) else data
    recorded = read_ledger(folder)
    new = _digest(raw)
    _write_ledger(folder, {**recorded, name: [*_versions(recorded.get(name))[-1:], new]})
    path = write_atomic(folder / name, raw)
    _write_ledger(folder, {**read_ledger(folder), name: new})
    return path


# ----------------------------------------------------------------------------- files in use
def _overlap(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def check_clear_of(flag: str, path: str | os.PathLike, in_use: Iterable[Path], what: str = "") -> None:
    """Refuse ``path`` when it is, lies inside or contains any of ``in_use`` (files a command reads)."""
    p = Path(path)
    for used in in_use:
        if os.path.lexists(used) and _overlap(p, Path(used)):
            raise SupernetError(f"{flag} {str(p)!r} would write over {str(used)!r}, which {what or 'this run'} "
                                "reads; choose another path")


# ----------------------------------------------------------------------------- one writer at a time
_HELD: set[str] = set()


@contextmanager
def exclusive(lock: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock`` (created if needed) while the block runs.

    A second process asking for the same lock is refused at once with one line; the operating
    system releases the lock when its holder exits, so a killed process never leaves it stuck.
    Re-entrant within one process.
    """
    key = str(Path(lock).absolute())
    if key in _HELD:
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover (not POSIX): no advisory locks
        yield
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SupernetError(f"{what} is already running in another process; wait for it to end") from None
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
    finally:
        os.close(fd)
