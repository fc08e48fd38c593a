"""``supernet train``: the options of a YAML/JSON file and the flags, merged, then train or resume.

Flags win over the file. A run interrupted with Ctrl-C says whether ``--resume`` can continue it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from supernet import validate
from supernet.cli import TRAIN_FLAGS
from supernet.errors import SupernetError


def read_options_file(path: str) -> dict:
    """The training options of a YAML (or JSON) file, keys with ``_`` for ``-``.

    YAML 1.1 reads some unquoted text as other types: ``2:4`` is the base-60 number 124, ``yes``
    a boolean, ``0x1F`` the number 31. An option that must be a string is refused when YAML's
    reading would change the text the user wrote, with that text and how to quote it; text that
    survives (``2020``, ``2024-01-01``) or names one of the option's choices (``mixed-precision:
    no``) is kept as written.

    Raises:
        SupernetError: unreadable file, not a mapping, or a string option YAML read as another type.
    """
    import dataclasses

    import yaml

    from supernet.loader import TrainConfig

    data = validate.read_yaml("config file", path)
    if not isinstance(data, dict):
        raise SupernetError(f"config file {path!r} must hold a mapping of options")
    options = {str(k).replace("-", "_"): v for k, v in data.items()}
    try:  # the composed node tree keeps each scalar's text as written (read_yaml parsed it already)
        root = yaml.compose(validate.read_text("config file", path), Loader=yaml.SafeLoader)
    except yaml.YAMLError:  # pragma: no cover - the file changed since read_yaml parsed it
        return options
    if not isinstance(root, yaml.MappingNode):
        return options
    kinds = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    choices = {flag.replace("-", "_"): kw["choices"] for flag, kw in TRAIN_FLAGS if "choices" in kw}
    for key_node, value_node in root.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        key = key_node.value
        name = key.replace("-", "_")
        if not kinds.get(name, "").startswith(("str", "list[str]")):
            continue
        for node, top in _yaml_scalars(value_node):
            if node.tag not in _YAML_NON_STRINGS:  # strings, nulls (optional options) and explicit tags
                continue
            value = yaml.constructor.SafeConstructor().construct_object(node)
            if node.value == str(value) or node.value in choices.get(name, ()):
                if top:
                    options[name] = node.value  # kept as the user wrote it: a date would fail as a date
                continue
            where = f"{key}: " if top else ""
            raise SupernetError(f"config file {path!r}: {key}: YAML read {node.value} as {_yaml_kind(value)}; "
                                f"quote it: {where}{json.dumps(node.value)}")
    return options


_YAML_NON_STRINGS = {f"tag:yaml.org,2002:{t}" for t in ("int", "float", "bool", "timestamp")}


def _yaml_scalars(node, top: bool = True):
    """Every scalar node under ``node`` (keys and values), with whether it is ``node`` itself."""
    import yaml

    if isinstance(node, yaml.ScalarNode):
        yield node, top
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _yaml_scalars(item, False)
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            yield from _yaml_scalars(k, False)
            yield from _yaml_scalars(v, False)


def _yaml_kind(value) -> str:
    """What YAML made of a scalar, in words: ``the number 124``, ``the boolean True``."""
    import datetime

    if isinstance(value, bool):
        return f"the boolean {value}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, (datetime.date, datetime.datetime)):
        return f"the date {value.isoformat()}"
    return f"a {type(value).__name__} ({value!r})"


def run(args: argparse.Namespace) -> int:
    """``supernet train``: train (or ``--resume``) a run; prints its summary as one JSON line."""
    from supernet.train import TrainConfig, resume, train

    options = read_options_file(args.config) if args.config else {}
    flags = {f.replace("-", "_") for f, _ in TRAIN_FLAGS}
    options.update({k: v for k, v in vars(args).items() if k in flags})
    if args.resume:
        extra = set(options) - {"max_steps"}
        if extra:
            raise SupernetError("--resume continues a run with its saved options; only --max-steps may change")
        run_dir = args.resume
        job = lambda: resume(args.resume, options.get("max_steps"))  # noqa: E731
    else:
        cfg = TrainConfig.from_dict(options)
        run_dir = str(cfg.run_dir())
        job = lambda: train(cfg, overwrite=args.overwrite)  # noqa: E731
    try:
        summary = job()
    except KeyboardInterrupt:  # say whether there is a run to resume (config.json is written before step 1)
        if (Path(run_dir) / "config.json").is_file() and (Path(run_dir) / ".supernet-run").is_file():
            print(f"supernet: interrupted; continue with `supernet train --resume {run_dir}`", file=sys.stderr)
        else:
            print("supernet: interrupted before the run started; nothing was written", file=sys.stderr)
        return 130
    if summary:
        print(json.dumps({"run": run_dir, **summary}))
    return 0
