"""The ``supernet`` subcommands, one module each; :mod:`supernet.cli` parses and dispatches here.

- :mod:`.train`: ``supernet train`` (options file and flags -> :func:`supernet.train.train`);
- :mod:`.eval`: ``supernet eval`` (one sub-network on a split, optional predictions file);
- :mod:`.search`: ``supernet search`` (load a run once, score configurations, shard them across
  processes, re-evaluate the Pareto set on whole splits);
- :mod:`.export`: ``supernet export`` (pick ``best`` or the front, write verified export folders);
- :mod:`.fidelity`: ``supernet fidelity`` (configurations trained stand-alone against the
  super-network's ranking of them);
- :mod:`.plot`: ``supernet plot`` (the figures of a run folder).

Each module has ``run(args) -> exit code`` and imports its heavy libraries when it runs, not
when the parser is built. The library they call (super-network, search, export formats) never
imports from here.
"""

from __future__ import annotations

import argparse
import importlib

#: subcommand -> module of this package (the names ``supernet --help`` lists, in that order)
COMMANDS = ("train", "eval", "search", "export", "fidelity", "plot")


def run(args: argparse.Namespace) -> int:
    """Run ``args.command`` (one of ``COMMANDS``) with its parsed arguments; returns the exit code."""
    if args.command not in COMMANDS:
        raise ValueError(f"unknown command {args.command!r}")
    return importlib.import_module(f"{__name__}.{args.command}").run(args)
