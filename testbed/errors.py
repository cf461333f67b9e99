"""Errors the CLI turns into a one-line message and exit status 2, never a traceback."""

from __future__ import annotations

from pydantic import ValidationError


class InputError(Exception):
    """Bad user input (a file, a flag, an inventory): reported before any host is touched."""


def describe_validation_error(err: ValidationError, source: str) -> str:
    """One line naming the first offending field, e.g. `snap.json: vms.2.cpu: must be >= 0`."""
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    return f"{source}: {where}: {first['msg']}"
