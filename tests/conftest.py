import os
import pathlib

import pytest
from hypothesis import settings

REPO = pathlib.Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"
BUNDLED_GENOMES = REPO / "dnascale" / "genomes"

# wandb must never try to reach the network from a test.
os.environ.setdefault("WANDB_MODE", "disabled")

# CI replays the same hypothesis examples on every run (a red CI is then reproducible, not a coin toss);
# locally the default profile explores new ones. .ci/run selects "ci".
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("DNASCALE_HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (gpu marker); this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def repo_root() -> pathlib.Path:
    return REPO


@pytest.fixture(scope="module")
def parallel():
    """A world of one (gloo, megatron groups at tp=1) for the module's in-process model builds and launcher runs."""
    from dnascale.parallel import destroy, init_distributed

    state = init_distributed(tp=1, seed=0)
    yield state
    destroy()


@pytest.fixture(scope="module")
def launcher():
    """launchers/finetune.py as a module: its main(argv) runs in this process (tests/finetune_helpers.py)."""
    from finetune_helpers import load_script

    return load_script("launchers/finetune.py", "finetune_launcher")
