"""Tiling a record with overlapping windows, and the stitching rule that gives every base one window's value.

Windows (record of L bases, window w, stride s with 1 <= s <= w):
    L <= w:  one window [0, L).
    L >  w:  starts 0, s, 2s, ... while start + w < L, then a last window [L - w, L) flush with the record's end,
             so every window has exactly w bases of real sequence (no padding, the context the model trained on).

Stitching ("most central"): base i takes its value from the window whose centre c_k = start_k + (w_k - 1) / 2 is
nearest to i, i.e. argmin_k |i - c_k|; a tie (i exactly half-way between two centres) goes to the window on the
left. Centres increase with k, so each window owns one contiguous span and the spans partition [0, L):
    window k owns [cut_{k-1}, cut_k),  cut_k = floor((c_k + c_{k+1}) / 2) + 1
                                            = floor((start_k + start_{k+1} + w - 1) / 2) + 1,
with cut_{-1} = 0 and cut_last = L. With s <= w the half-way point lies inside both windows, so an owned base is
always inside its window, and away from the record ends it has at least floor((w - s) / 2) bases of context on
either side (w = 2s: a quarter window). The default stride is half the window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dnascale.errors import ConfigError


@dataclass(frozen=True)
class Tiling:
    """The windows of one record and the span of bases each one owns (all 0-based, end-exclusive)."""

    length: int
    window: int
    stride: int
    starts: np.ndarray  # [K] int64 window starts
    ends: np.ndarray  # [K] int64 window ends
    own_lo: np.ndarray  # [K] int64 first owned base
    own_hi: np.ndarray  # [K] int64 one past the last owned base

    def __len__(self) -> int:
        return len(self.starts)

    def owner(self, base: int) -> int:
        """Index of the window that owns `base`."""
        return int(np.searchsorted(self.own_hi, base, side="right"))


def tile(length: int, window: int, stride: int) -> Tiling:
    if length < 1:
        raise ConfigError(f"cannot tile an empty record (length {length})")
    if window < 1 or not 1 <= stride <= window:
        raise ConfigError(f"window {window}, stride {stride}: need window >= 1 and 1 <= stride <= window")
    if length <= window:
        starts = np.zeros(1, dtype=np.int64)
        width = length
    else:
        starts = np.arange(0, length - window, stride, dtype=np.int64)
        starts = np.append(starts, length - window)  # flush with the end; never equal to the last one above
        width = window
    ends = starts + width
    cuts = (starts[:-1] + starts[1:] + width - 1) // 2 + 1
    own_lo = np.concatenate([[0], cuts]).astype(np.int64)
    own_hi = np.concatenate([cuts, [length]]).astype(np.int64)
    return Tiling(length, window, stride, starts, ends, own_lo, own_hi)


def owners_by_definition(length: int, tiling: Tiling) -> np.ndarray:
    """[L] owner of every base straight from the definition (argmin distance to centre, ties left): the slow twin
    of `tile`'s cut points, used by the tests."""
    centres = (tiling.starts + tiling.ends - 1) / 2.0
    bases = np.arange(length)[:, None]
    distance = np.abs(bases - centres[None, :])
    return distance.argmin(axis=1)  # argmin returns the first (leftmost) of equal minima
