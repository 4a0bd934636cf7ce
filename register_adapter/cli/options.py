"""What the image commands (``diagnose``, ``find-neurons``) share: value types of their options, the ``--out`` check,
and one ``error:`` line with exit status 2 for bad input."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..diagnostics.thresholds import check_threshold
from ..errors import InvalidConfigError, RegisterAdapterError


def check_out(out: Path) -> None:
    """``--out`` must be a folder or creatable as one; it is created only when the results are written.

    Raises:
        InvalidConfigError: ``out`` or a folder above it is a file, or the nearest existing folder is not writable.
    """
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InvalidConfigError(f"Cannot write to --out '{out}': '{existing}' is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidConfigError(
            f"Cannot write to --out '{out}': no permission to write in '{existing}'. Choose a folder you can write to."
        )


def threshold(value: str) -> float | str:
    try:
        rule: float | str = float(value)
    except ValueError:
        rule = value
    try:
        return check_threshold(rule)
    except InvalidConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def whole_number(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


def layer(value: str) -> int:
    layer = whole_number(value)
    if layer is None or layer == 0:
        raise argparse.ArgumentTypeError(
            f"must be a whole number other than 0 (1 = first block output, -1 = last); got {value!r}."
        )
    return layer


def positive(value: str) -> int:
    size = whole_number(value)
    if size is None or size < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number, 1 or more; got {value!r}.")
    return size


def non_negative(value: str) -> int:
    count = whole_number(value)
    if count is None or count < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number, 0 or more; got {value!r}.")
    return count


def report_errors(command: str, run: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Run ``register-adapter <command>`` with logging to stderr; bad input (a ``RegisterAdapterError``) ends it
    with one ``error:`` line on stderr and exit status 2."""
    logging.basicConfig(format="%(levelname)s - %(name)s - %(message)s", handlers=[logging.StreamHandler(sys.stderr)])
    try:
        run(args)
    except RegisterAdapterError as error:
        sys.stderr.write(f"register-adapter {command}: error: {error}\n")
        return 2
    return 0
