"""Fine-tuning every model family (ENBED, DNAZEN, DNACHUNKER; the encoder is in test_finetune_e2e.py) through
launchers/finetune.py on the 200-example slice of the real GUE task prom_core_tata.

The launcher runs in this process, in a world of one started once for the module (tests/finetune_helpers.py). The
pretraining checkpoint is made by launchers/pretrain.py in a subprocess, as a user would.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dnascale.data.tokenizers import load_tokenizer
from dnascale.errors import CheckpointError
from dnascale.finetune.classifier import ENCODE_UNUSED
from dnascale.finetune.inputs import encode_task_splits
from dnascale.finetune.run import Backbone, FinetuneConfig, build_classifier, load_backbone
from dnascale.finetune.tasks import load_task
from dnascale.models.registry import get_recipe, load_preset
from finetune_helpers import REPO, TASK, child_env, finetune

FAMILIES = ("enbed", "dnazen", "dnachunker")


def random_backbone(family: str) -> Backbone:
    return Backbone(family, "tiny", load_preset(family, "tiny"), get_recipe(family).tokenizer, None)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_finetunes_from_random_init_and_reevaluates(family, parallel, launcher, tmp_path):
    # Batches of 30: dev and test (60 rows each) take two forward passes per evaluation.
    common = ["--task", TASK, "--batch-size", "30", "--table", ""]
    report = finetune(launcher, *common, "--checkpoint", "none", "--model", family, "--preset", "tiny",
                      "--max-steps", "4", "--eval-every", "2", "--out", str(tmp_path / "ft"))
    assert report["family"] == family and report["preset"] == "tiny" and report["checkpoint"] == "none"
    (seed,) = report["seeds"]
    assert seed["steps"] == 4 and seed["best_step"] in (2, 4)
    for key in ("mcc", "f1", "accuracy"):
        assert -1.0 <= report[key] <= 1.0 and report[key] == seed["test"][key]
    # The selected weights were saved without the parts encode() does not use, and rebuild to the same predictions
    # (for DNAZEN this also rebuilds the G-gram matching of the test split).
    saved = tmp_path / "ft" / "seed0"
    assert json.loads((saved / "classifier.json").read_text())["recipe"] == family
    again = finetune(launcher, "--task", TASK, "--checkpoint", str(saved), "--evaluate-only", "--batch-size", "30",
                     "--out", str(tmp_path / "eval"))
    assert again["test"] == pytest.approx(seed["test"])
    with pytest.raises(CheckpointError, match=f"a {family!r} classifier, but --model 'encoder'"):
        finetune(launcher, "--task", TASK, "--checkpoint", str(saved), "--evaluate-only", "--model", "encoder",
                 "--out", str(tmp_path / "eval2"))


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_does_not_change_the_predictions(family, parallel):
    """Mean pooling over real tokens only: extra padding columns leave every sequence's logits as they were."""
    torch.manual_seed(0)
    backbone = random_backbone(family)
    task = load_task(TASK)
    dev = encode_task_splits(task, family, backbone.config, load_tokenizer(backbone.tokenizer_spec))["dev"]
    model = build_classifier(backbone, task.num_labels, parallel).eval()
    assert not any(name.split(".")[1] in ENCODE_UNUSED[family] for name, _ in model.named_parameters())
    batch = next(dev.batches(4))
    ids = torch.nn.functional.pad(batch.input_ids, (0, 37), value=dev.pad_id)
    mask = torch.nn.functional.pad(batch.attention_mask, (0, 37), value=False)
    with torch.no_grad():
        plain = model(batch.input_ids, batch.attention_mask, **batch.extras).logits
        padded = model(ids, mask, **batch.extras).logits
    torch.testing.assert_close(padded, plain, rtol=1e-4, atol=1e-5)


def test_dnazen_inputs_carry_the_unmasked_ggram_matching(parallel):
    torch.manual_seed(0)
    backbone = random_backbone("dnazen")
    tokenizer = load_tokenizer(backbone.tokenizer_spec)
    splits = encode_task_splits(load_task(TASK), "dnazen", backbone.config, tokenizer)
    batch = next(splits["train"].batches(32))
    ggram_ids, triplets = batch.extras["ggram_ids"], batch.extras["ggram_triplets"]
    assert (ggram_ids > 0).any() and len(triplets) > 0  # real promoters hold vocabulary G-grams
    assert tokenizer.mask_id not in batch.input_ids  # no MLM corruption in fine-tuning
    assert (ggram_ids > 0).sum(1).max() <= backbone.config.max_ggrams
    # Every matched token is a real token of its row, and the G-grams change the backbone's states.
    assert batch.attention_mask[triplets[:, 0], triplets[:, 1]].all()
    model = build_classifier(backbone, 2, parallel).eval()
    with torch.no_grad():
        fused = model.backbone.encode(batch.input_ids, batch.attention_mask, **batch.extras)
        plain = model.backbone.encode(batch.input_ids, batch.attention_mask)
    assert not torch.allclose(fused, plain)


def test_dnazen_finetunes_from_its_pretraining_run(parallel, launcher, tmp_path):
    env = child_env(tmp_path / "cache")
    pretrain = tmp_path / "pt"
    result = subprocess.run(
        [sys.executable, "launchers/pretrain.py", "--model", "dnazen", "--preset", "tiny", "--steps", "2",
         "--save-every", "2", "--micro-batch-size", "4", "--out", str(pretrain), "--wandb-mode", "disabled",
         "--no-progress", "--eval-batches", "0"],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    # The checkpoint names its family, preset and BPE tokenizer; encode()'s weights load, the MLM head is dropped.
    backbone = load_backbone(FinetuneConfig(task=TASK, out="", checkpoint=str(pretrain)))
    assert (backbone.recipe, backbone.preset) == ("dnazen", "tiny")
    assert load_tokenizer(backbone.tokenizer_spec).name.startswith("bpe-")
    model = build_classifier(backbone, 2, parallel)
    loaded = {f"backbone.{k}": v for k, v in backbone.state_dict.items()}
    for name, param in model.named_parameters():
        if name.startswith("backbone."):
            torch.testing.assert_close(param.detach(), loaded[name])
    assert any(k.startswith("head.") for k in backbone.state_dict)
    assert not any(n.startswith("backbone.head.") for n, _ in model.named_parameters())

    report = finetune(launcher, "--task", TASK, "--checkpoint", str(pretrain), "--model", "dnazen", "--max-steps",
                      "4", "--eval-every", "2", "--batch-size", "30", "--table", "", "--out", str(tmp_path / "ft"))
    assert report["family"] == "dnazen" and report["checkpoint"] == str(pretrain)
    assert (tmp_path / "ft" / "seed0" / "model.safetensors").is_file()
    # A checkpoint of one family given with --model of another is a one-line error naming both.
    with pytest.raises(CheckpointError, match="a 'dnazen' checkpoint, but --model 'dnachunker' was given") as info:
        finetune(launcher, "--task", TASK, "--checkpoint", str(pretrain), "--model", "dnachunker", "--out",
                 str(tmp_path / "wrong"))
    assert "\n" not in str(info.value)


def test_multiclass_task_fine_tunes_end_to_end(parallel, launcher, tmp_path):
    """Three classes from real promoter sequences: each one's GC-content tertile (cut points from train)."""
    import csv

    from safetensors.torch import load_file

    rows = {split: list(csv.DictReader(open(Path(TASK) / f"{split}.csv"))) for split in ("train", "dev", "test")}

    def gc(sequence: str) -> float:
        return (sequence.count("G") + sequence.count("C")) / len(sequence)

    cuts = np.quantile([gc(r["sequence"]) for r in rows["train"]], [1 / 3, 2 / 3])
    task = tmp_path / "gc_tertiles"
    task.mkdir()
    for split, records in rows.items():
        with open(task / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sequence", "label"])
            for record in records:
                writer.writerow([record["sequence"], int(np.searchsorted(cuts, gc(record["sequence"])))])
    report = finetune(launcher, "--task", str(task), "--checkpoint", "none", "--model", "encoder", "--max-steps",
                      "4", "--eval-every", "2", "--batch-size", "30", "--table", "", "--out", str(tmp_path / "ft"))
    assert json.loads((tmp_path / "ft" / "seed0" / "classifier.json").read_text())["num_labels"] == 3
    weights = load_file(str(tmp_path / "ft" / "seed0" / "model.safetensors"))
    assert weights["classifier.weight"].shape[0] == 3
    for key in ("mcc", "f1", "accuracy"):
        assert -1.0 <= report[key] <= 1.0
