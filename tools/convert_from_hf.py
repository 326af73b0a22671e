#!/usr/bin/env python
"""Convert an HF directory written by tools/convert_to_hf.py into dnascale initial weights at any TP size.

    python tools/convert_from_hf.py HF_DIR OUT [--tp N]

OUT holds dnascale_model.json (recipe, config with tp=N, tokenizer) and tp_rank_XX.safetensors, one per TP rank.
Start a run from it with `launchers/pretrain.py --tp N --init-from OUT` (same preset), or call
`dnascale.convert.init_weights.load_init_weights(model, OUT, recipe)` on a model built at tp=N (see
docs/architecture.md, "Checkpoint conversion"); tools/convert_to_hf.py OUT HF_DIR2 converts it back.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dnascale.errors import run_cli  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("hf_dir")
    p.add_argument("out")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size the weights are split for")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from dnascale.errors import ConfigError
    from dnascale.hf.load import read_hf, write_init_dir

    if a.tp < 1:
        raise ConfigError(f"--tp {a.tp}: must be >= 1")
    checkpoint = read_hf(a.hf_dir)
    out = write_init_dir(checkpoint, a.out, a.tp, progress=not a.no_progress)
    print(f"wrote {checkpoint.recipe.name} weights for tp={a.tp} to {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
