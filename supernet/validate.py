"""Validators for everything a user hands us, one per kind of input.

Options (numbers, names, patterns), paths we write to, files we read, and data values are
checked here, where they enter, so that a case nobody listed still ends as one clear
:class:`SupernetError` line instead of a traceback or a half-written run. Every check runs
before anything is written.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
from pathlib import Path

from supernet.errors import SupernetError

SEED_MAX = 2**32 - 1  # numpy and torch seeds are unsigned 32-bit


# ----------------------------------------------------------------------------- options
def number(flag: str, value, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, integer: bool = False):
    """A finite number in ``[low, high]`` (``(low, high]`` with ``low_open``); NaN and inf refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SupernetError(f"{flag} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise SupernetError(f"{flag} must be a finite number, got {value}")
    if integer and int(value) != value:
        raise SupernetError(f"{flag} must be an integer, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        word = "positive" if low == 0 and low_open else bound
        raise SupernetError(f"{flag} must be {word}, got {value}")
    if high is not None and value > high:
        raise SupernetError(f"{flag} must be <= {high:g}, got {value}")
    return value


def seed(flag: str, value) -> int:
    """A seed, for every command alike: an integer in ``[0, 2**32 - 1]`` (numpy's and torch's range)."""
    return int(number(flag, value, low=0, high=SEED_MAX, integer=True))


def text_option(flag: str, value: str, *, allow_empty: bool = False) -> str:
    """A printable one-line string (no NUL or line breaks)."""
    if not isinstance(value, str):
        raise SupernetError(f"{flag} must be a string, got {value!r}")
    if not allow_empty and not value.strip():
        raise SupernetError(f"{flag} is empty")
    if "\x00" in value:
        raise SupernetError(f"{flag} contains a NUL character")
    return value


def patterns(flag: str, values) -> list[str]:
    """Module-name patterns: non-empty strings; ``re:`` ones must compile."""
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise SupernetError(f"{flag} must be a list of module-name patterns, got {values!r}")
    out = []
    for v in values:
        if not isinstance(v, str) or not v.strip():
            raise SupernetError(f"{flag}: every pattern must be a non-empty string, got {v!r}")
        v = v.strip()
        if v.startswith("re:"):
            try:
                re.compile(v[3:])
            except re.error as e:
                raise SupernetError(f"{flag}: {v!r} is not a valid regular expression ({e})") from None
        out.append(v)
    if not out:
        raise SupernetError(f"{flag} is empty")
    return out


def prompt_template(flag: str, prompt: str) -> str:
    """A ``str.format`` template whose only placeholder is ``{text}``."""
    text_option(flag, prompt)
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(prompt) if f is not None]
    except ValueError as e:
        raise SupernetError(f"{flag} is not a valid template ({e}); write literal braces as {{{{ }}}}") from None
    unknown = [f for f in fields if f != "text"]
    if unknown:
        raise SupernetError(f"{flag} has the placeholder {{{unknown[0]}}}; only {{text}} is filled in")
    if "text" not in fields:
        raise SupernetError(f"{flag} must contain {{text}}")
    return prompt


def run_name(name: str) -> str:
    """A run (or search, export) name is one plain path component: no separators, not ``.``/``..``."""
    text_option("--name", name)
    if name != name.strip() or name in (".", "..") or "/" in name or "\\" in name or os.sep in name:
        raise SupernetError(f"--name must be one plain folder name (no '/', '.' or '..'), got {name!r}")
    if len(name.encode()) > 200:
        raise SupernetError("--name is longer than 200 bytes")
    return name


# ----------------------------------------------------------------------------- paths we write
def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def writable_dir(flag: str, path: str | Path) -> Path:
    """A folder we may create files in: an existing directory, or one we can create.

    Refuses a path that is (or lies under) a file or device, and a read-only place.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise SupernetError(f"{flag} {str(p)!r} exists and is not a folder")
    anchor = _nearest_existing(p.absolute())
    if not anchor.is_dir():
        raise SupernetError(f"{flag} {str(p)!r} lies under {str(anchor)!r}, which is not a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise SupernetError(f"{flag} {str(p)!r}: {str(anchor)!r} is not writable")
    return p


def writable_file(flag: str, path: str | Path) -> Path:
    """A file we may (over)write: not a folder, its folder creatable and writable."""
    p = Path(path)
    if str(path).endswith(("/", os.sep)) or p.is_dir():
        raise SupernetError(f"{flag} {str(p)!r} is a folder; give a file name")
    if p.exists() and not p.is_file():
        raise SupernetError(f"{flag} {str(p)!r} is not a regular file")
    if p.exists() and not os.access(p, os.W_OK):
        raise SupernetError(f"{flag} {str(p)!r} is not writable")
    writable_dir(flag, p.parent if str(p.parent) else Path("."))
    return p


def inside(child: Path, parent: Path) -> bool:
    """Whether ``child`` is ``parent`` or lies under it (after resolving links)."""
    c, p = child.resolve(), parent.resolve()
    return c == p or p in c.parents


# ----------------------------------------------------------------------------- files we read
def read_text(what: str, path: str | Path, limit: int = 64 << 20) -> str:
    """A UTF-8 text file: exists, is a regular file, not binary, not huge."""
    p = Path(path)
    if not os.path.lexists(p):
        raise SupernetError(f"{what} {str(p)!r} does not exist")
    if p.is_dir():
        raise SupernetError(f"{what} {str(p)!r} is a folder, not a file")
    if not p.is_file():
        raise SupernetError(f"{what} {str(p)!r} is not a regular file (a device, socket or broken link)")
    try:
        if p.stat().st_size > limit:
            raise SupernetError(f"{what} {str(p)!r} is larger than {limit >> 20} MiB")
        data = p.read_bytes()
    except OSError as e:
        raise SupernetError(f"cannot read {what} {str(p)!r}: {e.strerror}") from None
    if b"\x00" in data:
        raise SupernetError(f"{what} {str(p)!r} is binary, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SupernetError(f"{what} {str(p)!r} is not UTF-8 text") from None


def read_json(what: str, path: str | Path):
    text = read_text(what, path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SupernetError(f"{what} {str(path)!r} is not valid JSON: {e}") from None
    except RecursionError:
        raise SupernetError(f"{what} {str(path)!r} nests its values too deeply to be read") from None


def read_yaml(what: str, path: str | Path):
    import yaml

    text = read_text(what, path)
    try:
        return yaml.safe_load(text)  # YAML is a superset of JSON
    except yaml.YAMLError as e:
        raise SupernetError(f"{what} {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None


def groups_mapping(what: str, data) -> dict[str, list[str]]:
    """``{group: [pattern, ...]}`` with non-empty string names and patterns."""
    if not isinstance(data, dict) or not data:
        raise SupernetError(f"{what} must be a non-empty object {{group: [patterns]}}")
    out = {}
    for g, pats in data.items():
        if not isinstance(g, str) or not g.strip():
            raise SupernetError(f"{what}: group names must be non-empty strings, got {g!r}")
        if not isinstance(pats, list) or not pats:
            raise SupernetError(f"{what}: group {g!r} must list at least one module pattern")
        out[g] = patterns(f"{what}: group {g!r}", pats)
    return out


def jsonable(value):
    """``value`` with every non-finite float replaced by ``None`` (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


# ----------------------------------------------------------------------------- option values from YAML or flags
def as_list(v) -> list:
    if not isinstance(v, (list, tuple)):
        raise TypeError
    return list(v)


def as_int(v) -> int:
    if isinstance(v, bool) or isinstance(v, float) and not v.is_integer():
        raise TypeError
    return int(v)


def as_float(v) -> float:
    if isinstance(v, bool):
        raise TypeError
    return float(v)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def as_str(v) -> str:
    if not isinstance(v, (str, int, float)) or isinstance(v, bool):
        raise TypeError
    return str(v)


def parse_number_list(text: str, what: str, kind: type = int) -> list:
    """A comma-separated list of ``kind`` (int or float) from a flag or YAML string, or one clear error."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise SupernetError(f"{what} is empty")
    try:
        return [kind(p) for p in parts]
    except ValueError:
        noun = "integers" if kind is int else "numbers"
        raise SupernetError(f"{what} must be comma-separated {noun}, got {text!r}") from None


def budget_share(budget: str | None) -> float | None:
    """``--budget params=F`` of a JACTUS run as the share ``F`` (None when not given)."""
    if budget is None:
        return None
    key, sep, value = str(budget).partition("=")
    try:
        share = float(value)
    except ValueError:
        share = None
    if key.strip() != "params" or not sep or share is None:
        raise SupernetError(f"--budget takes params=F (the share of the adapted layers' weights kept), got {budget!r}")
    return share
