#!/usr/bin/env python
"""Compare the installed packages with the pins in tools/constraints.txt.

    python tools/version_drift.py                 # table of the packages whose installed version differs
    python tools/version_drift.py --check         # exit 1 if any pinned package is installed at another version

`tools/setup.sh` installs with the constraints (so `--check` passes after it); `tools/setup.sh --latest` ignores
them and prints this table, so a user sees which upgrades a failing latest-check run brought in.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dnascale.errors import DataError, run_cli  # noqa: E402

CONSTRAINTS = Path(__file__).resolve().parent / "constraints.txt"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)\s*(?:#.*)?$")


def canonical(name: str) -> str:
    """PEP 503 normalised name: pydantic_core, Pydantic-Core and pydantic.core are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path = CONSTRAINTS) -> dict[str, str]:
    """{canonical name: version} of every `name==version` line; any other non-comment line is an error."""
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise DataError(f"{path}: cannot read constraints ({err.strerror or err})") from None
    pins: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _PIN.match(line)
        if match is None:
            raise DataError(f"{path}: line {number}: expected 'name==version', got {line!r}")
        pins[canonical(match.group(1))] = match.group(2)
    return pins


@dataclass(frozen=True)
class Drift:
    package: str
    pinned: str
    installed: str | None  # None: not installed


def installed_versions() -> dict[str, str]:
    """{canonical name: version} as `import` would find them: the first on sys.path wins, and the copies that
    setuptools vendors (setuptools/_vendor/*.dist-info, put on sys.path once pkg_resources is imported) are not
    installed packages."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        location = str(getattr(dist, "_path", ""))
        if name and "_vendor" not in Path(location).parts:
            found.setdefault(canonical(name), dist.version)
    return found


def drift(pins: dict[str, str]) -> list[Drift]:
    installed = installed_versions()
    return [Drift(name, version, installed.get(name)) for name, version in sorted(pins.items())
            if installed.get(name) != version]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--constraints", type=Path, default=CONSTRAINTS)
    p.add_argument("--check", action="store_true", help="exit 1 when any pinned package differs")
    args = p.parse_args(argv)
    changed = drift(read_pins(args.constraints))
    if not changed:
        print(f"all {len(read_pins(args.constraints))} pinned packages are installed at their pinned versions")
        return 0
    width = max(len(d.package) for d in changed)
    print(f"{len(changed)} packages differ from {args.constraints.name}:")
    for d in changed:
        print(f"  {d.package:<{width}}  pinned {d.pinned:<14} installed {d.installed or '(not installed)'}")
    return 1 if args.check else 0


if __name__ == "__main__":
    run_cli(main)
