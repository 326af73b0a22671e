"""HF conversion of the `encoder` family: the shared tests in tests/hf_family_tests.py on its 2-rank checkpoints,
plus the trust_remote_code path in a fresh process (the same shim code for every family, so checked once)."""

import pytest

from hf_family_tests import *  # noqa: F401,F403  (the tests and fixtures, collected here for this family)


@pytest.fixture(scope="module")
def recipe():
    return "encoder"


OFFLINE_SCRIPT = """
import sys, torch
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer
assert "dnascale" not in sys.modules
d = sys.argv[1]
config = AutoConfig.from_pretrained(d, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(d)
model = AutoModel.from_pretrained(d, trust_remote_code=True).eval()
classifier = AutoModelForSequenceClassification.from_pretrained(d, trust_remote_code=True, num_labels=2)
batch = tokenizer(["ACGTTGCA", "ACG"], return_tensors="pt", padding=True)
with torch.no_grad():  # DNAZEN without G-gram inputs runs its plain token encoder
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
print("RESULT", type(config).__name__, hidden.shape[0], hidden.shape[-1] == config.hidden_size,
      type(classifier).__name__)
"""


def test_export_loads_offline_with_trust_remote_code_alone(recipe, exported):
    import os
    import subprocess
    import sys

    _, hf_dir = exported["tp2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(hf_dir)], env=env, capture_output=True,
                            text=True, timeout=300, cwd=hf_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    prefix = {"encoder": "Encoder", "enbed": "Enbed", "dnazen": "Dnazen", "dnachunker": "Dnachunker"}[recipe]
    line = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")][-1].split()
    assert line[1:] == [f"Dnascale{prefix}Config", "2", "True", f"Dnascale{prefix}ForSequenceClassification"]


HOOK_SCRIPT = """
import sys
import dnascale  # before transformers: the registration must wait for transformers' import, not force it
assert "transformers" not in sys.modules
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
assert "dnascale-encoder" in CONFIG_MAPPING, "import dnascale did not register the Auto classes"
model = transformers.AutoModelForMaskedLM.from_pretrained(sys.argv[1])  # no trust_remote_code
print("RESULT", type(model).__module__)
"""


def test_import_dnascale_registers_the_auto_classes_once_transformers_is_imported(exported):
    import os
    import subprocess
    import sys

    _, hf_dir = exported["dp2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", HOOK_SCRIPT, str(hf_dir)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [l for l in result.stdout.splitlines() if l.startswith("RESULT ")] == ["RESULT dnascale.hf.encoder"]
