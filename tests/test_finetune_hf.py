"""Fine-tuning from a Hugging Face export (tools/convert_to_hf.py's output) through launchers/finetune.py.

One tiny encoder pretraining run (launchers/pretrain.py in a subprocess, as a user would) is exported in this
process with tools/convert_to_hf.py's main(), sharded small enough to exercise the safetensors index. The backbone
an HF export yields must be the native checkpoint's, weight for weight, and fine-tune the same way.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dnascale.errors import CheckpointError
from dnascale.finetune.run import FinetuneConfig, build_classifier, load_backbone
from finetune_helpers import REPO, TASK, child_env, finetune, load_script


@pytest.fixture(scope="module")
def runs(tmp_path_factory, parallel) -> dict[str, Path]:
    """{"native": a 2-step encoder pretraining run, "hf": its HF export (several safetensors files + index)}."""
    root = tmp_path_factory.mktemp("encoder-hf")
    env = child_env(root / "cache")
    result = subprocess.run(
        [sys.executable, "launchers/pretrain.py", "--model", "encoder", "--preset", "tiny", "--steps", "2",
         "--save-every", "2", "--micro-batch-size", "4", "--out", str(root / "pt"), "--wandb-mode", "disabled",
         "--no-progress", "--eval-batches", "0"],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    convert = load_script("tools/convert_to_hf.py", "convert_to_hf")
    assert convert.main([str(root / "pt"), str(root / "hf"), "--max-shard-size", "0.0005", "--no-progress"]) == 0
    return {"native": root / "pt", "hf": root / "hf"}


def test_hf_export_yields_the_native_backbone(runs, parallel):
    assert (runs["hf"] / "model.safetensors.index.json").is_file()  # the sharded layout is the one read
    native = load_backbone(FinetuneConfig(task=TASK, out="", checkpoint=str(runs["native"])))
    hf = load_backbone(FinetuneConfig(task=TASK, out="", checkpoint=str(runs["hf"]), model="encoder"))
    assert (hf.recipe, hf.preset, hf.config) == (native.recipe, native.preset, native.config)
    assert hf.tokenizer_spec == str(runs["hf"])  # the export's own tokenizer files, not the training machine's spec
    # The classifier fine-tuning starts from holds the native checkpoint's weights in every backbone parameter
    # (fp32 export: bit for bit). Compared with the checkpoint's tensors, not with a second build under the same
    # seed, so weights that failed to load would not pass as equal random inits.
    torch.manual_seed(1)
    params = dict(build_classifier(hf, 2, parallel).named_parameters())
    backbone = {name[len("backbone."):]: p for name, p in params.items() if name.startswith("backbone.")}
    assert backbone and set(backbone) <= set(native.state_dict)
    for name, param in backbone.items():
        torch.testing.assert_close(param.detach(), native.state_dict[name], rtol=0, atol=0, msg=name)


def test_finetunes_from_hf_export_and_names_it_in_the_table(runs, parallel, launcher, tmp_path):
    table = tmp_path / "table.tsv"
    report = finetune(launcher, "--task", TASK, "--checkpoint", str(runs["hf"]), "--max-steps", "2",
                      "--eval-every", "2", "--batch-size", "30", "--table", str(table), "--out", str(tmp_path / "ft"))
    assert report["family"] == "encoder" and report["preset"] == "tiny" and report["checkpoint"] == str(runs["hf"])
    assert report["seeds"][0]["steps"] == 2 and -1.0 <= report["mcc"] <= 1.0
    rows = [line.split("\t") for line in table.read_text().splitlines()[1:]]
    assert len(rows) == 3 and {row[3] for row in rows} == {str(runs["hf"])}
    assert (tmp_path / "ft" / "seed0" / "model.safetensors").is_file()


def test_wrong_model_and_foreign_model_type_are_one_line_errors(runs, launcher, tmp_path):
    with pytest.raises(CheckpointError, match="an HF export of a 'encoder' model, but --model 'dnazen'") as info:
        finetune(launcher, "--task", TASK, "--checkpoint", str(runs["hf"]), "--model", "dnazen",
                 "--out", str(tmp_path / "wrong"))
    assert "\n" not in str(info.value)
    foreign = tmp_path / "bert"
    shutil.copytree(runs["hf"], foreign)
    config = json.loads((foreign / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps(dict(config, model_type="bert")))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type 'bert' is not a dnascale family") as info:
        finetune(launcher, "--task", TASK, "--checkpoint", str(foreign), "--out", str(tmp_path / "foreign"))
    assert "\n" not in str(info.value) and str(foreign / "config.json") in str(info.value)
