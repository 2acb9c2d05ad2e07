"""Errors that reach the user as one line on stderr and a non-zero exit code."""

from __future__ import annotations


class MeterError(Exception):
    """A user-facing error: ``str(err)`` is the whole message, ``exit_code`` the status."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(MeterError):
    """The command line or the environment asks for something impossible."""

    exit_code = 2


class StoreError(MeterError):
    """The store cannot be opened, migrated or read."""
