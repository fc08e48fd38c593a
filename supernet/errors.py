"""Errors a user can cause. The CLI turns these into one line on stderr and exit code 2."""

from __future__ import annotations


class SupernetError(Exception):
    """Bad input: an unknown model or dataset, an impossible configuration, a broken run dir."""
