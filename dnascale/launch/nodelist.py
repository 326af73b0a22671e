"""Expand a SLURM host list (`gpu[01-04]`, `a[1-2],b3`, `rack[1-2]-n[1,3]`) into host names, in order.

`scontrol show hostnames` does this on a cluster; the front end needs it where scontrol is absent (a dry run
on a laptop or login node, the tests), so it is reimplemented here for the forms SLURM writes into
SLURM_JOB_NODELIST: comma-separated items, each a name with zero or more bracket groups of comma-separated
numbers and ranges. Zero padding follows the range's lower bound, as in SLURM (`[08-10]` -> 08, 09, 10).
"""

from __future__ import annotations

import itertools
import re

from dnascale.errors import ConfigError

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(nodelist: str) -> list[str]:
    """Split on commas outside brackets (`a[1,3],b2` -> `a[1,3]`, `b2`)."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ConfigError(f"SLURM nodelist {nodelist!r}: nested '[' at position {i}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"SLURM nodelist {nodelist!r}: ']' without '[' at position {i}")
        elif char == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    if depth:
        raise ConfigError(f"SLURM nodelist {nodelist!r}: '[' is never closed")
    items.append(nodelist[start:])
    return items


def _expand_group(group: str, nodelist: str) -> list[str]:
    """The numbers of one bracket group, `01-03,7` -> 01, 02, 03, 7."""
    numbers = []
    for part in group.split(","):
        match = _RANGE.match(part.strip())
        if not match:
            raise ConfigError(f"SLURM nodelist {nodelist!r}: {part!r} is not a number or a range like 01-04")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise ConfigError(f"SLURM nodelist {nodelist!r}: range {part!r} runs backwards")
        numbers += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
    return numbers


def _expand_item(item: str, nodelist: str) -> list[str]:
    # "rack[1-2]-n[1,3]" -> literal pieces ["rack", "-n", ""] around the groups ["1-2", "1,3"]
    pieces = re.split(r"\[([^\]]*)\]", item)
    literals, groups = pieces[0::2], pieces[1::2]
    if not item or any(not g for g in groups):
        raise ConfigError(f"SLURM nodelist {nodelist!r}: empty host name or empty '[]'")
    choices = [_expand_group(g, nodelist) for g in groups]
    hosts = []
    for combo in itertools.product(*choices):
        name = literals[0]
        for number, literal in zip(combo, literals[1:]):
            name += number + literal
        hosts.append(name)
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a SLURM nodelist, in the order written; a malformed list is a one-line ConfigError."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ConfigError("SLURM nodelist is empty")
    hosts = [h for item in _split_top_level(nodelist) for h in _expand_item(item.strip(), nodelist)]
    seen = set()
    for host in hosts:
        if host in seen:
            raise ConfigError(f"SLURM nodelist {nodelist!r} names host {host} twice")
        seen.add(host)
    return hosts
