"""User-facing errors.

A `DnascaleError` is a mistake in what the user gave us (a file, a record, a config field). Command-line entry
points catch it via `run_cli` and print one line, never a traceback; bugs in dnascale itself stay ordinary
exceptions so their tracebacks survive.
"""

from __future__ import annotations

import sys
from typing import Callable


class DnascaleError(ValueError):
    """Bad input: the message names the file/record/field and what was expected."""


class DataError(DnascaleError):
    """Malformed or inconsistent input data (FASTA, shards, manifests, benchmark csv)."""


class ConfigError(DnascaleError):
    """An invalid configuration field, preset, CLI flag or ds_config."""


class CheckpointError(DnascaleError):
    """A missing, partial, corrupt or incompatible checkpoint."""


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a command-line `main`, turning a DnascaleError into `error: <message>` and exit status 2."""
    try:
        status = main()
    except DnascaleError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)
