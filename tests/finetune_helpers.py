"""Shared by the in-process fine-tuning tests (test_finetune_families.py, test_finetune_hf.py): the real GUE slice,
scripts loaded as modules, the environment for child launches. Their fixtures (`parallel`, a world of one per
module, and `launcher`) are in conftest.py.

The launcher runs in the test process (its `main(argv)`): a subprocess per run would spend most of the CI budget
importing torch, megatron-core and DeepSpeed again.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASK = str(REPO / "tests" / "data" / "gue_prom_core_tata_200")
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def load_script(path: str, name: str):
    """A repository script (launchers/, tools/) as a module, so its main(argv) runs in this process."""
    spec = importlib.util.spec_from_file_location(name, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child_env(cache: Path) -> dict[str, str]:
    """The environment for a launcher subprocess: this process's world of one is not the child's."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    return dict(env, DNASCALE_CACHE=str(cache), WANDB_MODE="disabled")


def finetune(launcher, *args) -> dict:
    """Run the launcher in this process and return the results.json it wrote."""
    assert launcher.main(list(args)) == 0
    return json.loads((Path(args[args.index("--out") + 1]) / "results.json").read_text())
