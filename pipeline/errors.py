"""Errors a user can fix, and the one place that turns them into a single readable line.

A `UserError` message names the file or key at fault and what to do; a stage that meets one prints
just that line (no traceback unless SLIMSTEP_DEBUG=1) and exits 1, so DVC and the flow show the cause.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

DEBUG_ENV = "SLIMSTEP_DEBUG"


class UserError(Exception):
    """A failure caused by an input, a parameter or a damaged file: its message is meant for a person."""


class DataError(UserError, ValueError):
    """A data file that no stage can train on (non-finite values, bad labels, impossible shapes)."""


class NonFiniteError(UserError, ArithmeticError):
    """A loss or weights that are NaN or infinite: nothing non-finite is ever saved."""


class IntegrityError(UserError, ValueError):
    """A file whose bytes do not match the sha256 recorded when it was written (damaged or edited)."""


class DeviceError(UserError, RuntimeError):
    """The device params.yaml asks for does not exist here."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's first message line, for a one-line report (library messages can run to pages)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() not in {"", "0", "false", "off"}


@contextmanager
def readable_errors(where: str, code: int = 1) -> Iterator[None]:
    """Let a UserError (or a missing file) end the process with one line `error: <where>: <message>`."""
    try:
        yield
    except (UserError, FileNotFoundError) as exc:
        if debug():
            raise
        print(f"error: {where}: {exc} (SLIMSTEP_DEBUG=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(code) from None
