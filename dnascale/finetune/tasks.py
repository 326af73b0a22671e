"""Benchmark tasks: a directory with train/dev/test csv files of `sequence,label` rows (the GUE layout).

Every file is checked as it is read, and the first problem stops loading with one line naming the file, the line
and what was expected: a missing column, a ragged row, a base outside ACGTN, an empty split, a label that is not
an integer in 0..K-1 (K taken from the train split; dev and test may only use train's labels).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dnascale.errors import DataError

SPLITS = ("train", "dev", "test")
REQUIRED_COLUMNS = ("sequence", "label")
_NOT_ACGTN = re.compile(r"[^ACGTNacgtn]")


@dataclass(frozen=True)
class TaskSplit:
    sequences: list[str]  # uppercase ACGTN
    labels: np.ndarray  # int64, 0..num_labels-1

    def __len__(self) -> int:
        return len(self.sequences)


@dataclass(frozen=True)
class Task:
    name: str
    directory: Path
    splits: dict[str, TaskSplit]
    num_labels: int

    def __getitem__(self, split: str) -> TaskSplit:
        return self.splits[split]


def _read_split(path: Path) -> tuple[list[str], list[int]]:
    if not path.is_file():
        raise DataError(f"{path}: missing split file (a task directory needs {', '.join(s + '.csv' for s in SPLITS)})")
    sequences, labels = [], []
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file (expected a header 'sequence,label' and rows)")
        header = [column.strip().lower() for column in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise DataError(f"{path}: missing column {missing[0]!r} (header is {','.join(header)}; expected sequence,label)")
        seq_col, label_col = header.index("sequence"), header.index("label")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue  # a trailing blank line is not a record
            if len(row) != len(header):
                raise DataError(f"{path}:{line}: {len(row)} fields, expected {len(header)} like the header")
            sequence = row[seq_col].strip()
            if not sequence:
                raise DataError(f"{path}:{line}: empty sequence")
            bad = _NOT_ACGTN.search(sequence)
            if bad:
                raise DataError(
                    f"{path}:{line}: character {bad.group()!r} at position {bad.start() + 1} of the sequence "
                    "(expected A C G T N)"
                )
            try:
                label = int(row[label_col])
            except ValueError:
                raise DataError(f"{path}:{line}: label {row[label_col]!r} is not an integer") from None
            sequences.append(sequence.upper())
            labels.append(label)
    if not sequences:
        raise DataError(f"{path}: no rows (an empty split)")
    return sequences, labels


def load_task(directory: str | Path) -> Task:
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"{directory}: not a task directory (expected train.csv, dev.csv, test.csv)")
    raw = {split: _read_split(root / f"{split}.csv") for split in SPLITS}
    train_labels = sorted(set(raw["train"][1]))
    num_labels = len(train_labels)
    if train_labels != list(range(num_labels)) or num_labels < 2:
        raise DataError(
            f"{root / 'train.csv'}: labels must be the integers 0..K-1 with K >= 2, found {train_labels[:10]}"
        )
    splits = {}
    for split, (sequences, labels) in raw.items():
        for line, label in enumerate(labels, start=2):
            if not 0 <= label < num_labels:
                raise DataError(f"{root / (split + '.csv')}: label {label} out of range 0..{num_labels - 1} "
                                f"(row {line - 1}; train.csv defines {num_labels} classes)")
        splits[split] = TaskSplit(sequences, np.asarray(labels, dtype=np.int64))
    return Task(root.name, root, splits, num_labels)
