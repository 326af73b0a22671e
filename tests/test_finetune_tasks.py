import re
import shutil

import numpy as np
import pytest

from dnascale.errors import DataError
from dnascale.finetune.metrics import classification_metrics
from dnascale.finetune.tasks import load_task


@pytest.fixture
def task_dir(tmp_path, repo_root):
    target = tmp_path / "task"
    shutil.copytree(repo_root / "tests/data/gue_prom_core_tata_200", target)
    return target


def test_real_gue_slice_loads(task_dir):
    task = load_task(task_dir)
    assert task.num_labels == 2 and [len(task[s]) for s in ("train", "dev", "test")] == [200, 60, 60]
    assert set(task["train"].labels.tolist()) == {0, 1}
    assert all(set(s) <= set("ACGTN") for s in task["train"].sequences)
    assert len(task["train"].sequences[0]) == 70  # prom_core: 70 bp


def write(task_dir, split, text):
    (task_dir / f"{split}.csv").write_text(text)


@pytest.mark.parametrize(
    "split, text, message",
    [
        ("train", "sequence,target\nACGT,0\nACGA,1\n", "train.csv: missing column 'label'"),
        ("train", "sequence,label\nACGT,0\nACGA,1,7\n", "train.csv:3: 3 fields, expected 2"),
        ("dev", "sequence,label\nACXT,0\n", "dev.csv:2: character 'X' at position 3"),
        ("test", "sequence,label\n", "test.csv: no rows (an empty split)"),
        ("test", "", "test.csv: empty file"),
        ("dev", "sequence,label\nACGT,2\n", "dev.csv: label 2 out of range 0..1"),
        ("train", "sequence,label\nACGT,0\nACGA,2\n", "labels must be the integers 0..K-1"),
        ("train", "sequence,label\nACGT,zero\n", "train.csv:2: label 'zero' is not an integer"),
        ("train", "sequence,label\n,0\n", "train.csv:2: empty sequence"),
    ],
)
def test_bad_task_data_gets_a_one_line_error(task_dir, split, text, message):
    write(task_dir, split, text)
    with pytest.raises(DataError, match=re.escape(message)) as info:
        load_task(task_dir)
    assert "\n" not in str(info.value)


def test_missing_split_or_directory(task_dir, tmp_path):
    (task_dir / "dev.csv").unlink()
    with pytest.raises(DataError, match="dev.csv: missing split file"):
        load_task(task_dir)
    with pytest.raises(DataError, match="not a task directory"):
        load_task(tmp_path / "nope")


def test_lowercase_is_uppercased_and_multiclass_is_accepted(task_dir):
    write(task_dir, "train", "sequence,label\nacgt,0\nACGA,1\nTTTT,2\n")
    write(task_dir, "dev", "sequence,label\nACGT,2\n")
    task = load_task(task_dir)
    assert task.num_labels == 3 and task["train"].sequences[0] == "ACGT"


def test_metrics_match_hand_computed_values():
    labels = np.array([0, 0, 1, 1, 1, 0])
    preds = np.array([0, 1, 1, 1, 0, 0])
    # TP=2 TN=2 FP=1 FN=1: MCC = (4 - 1) / sqrt(3*3*3*3) = 1/3
    got = classification_metrics(labels, preds)
    assert got["mcc"] == pytest.approx(1 / 3)
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["f1"] == pytest.approx(2 / 3)
    assert classification_metrics(labels, labels)["mcc"] == 1.0
