#!/usr/bin/env python
"""Convert a dnascale pretraining checkpoint (any ZeRO stage 1-3, DP and TP size) to an HF model directory.

    python tools/convert_to_hf.py runs/encoder-tiny OUT_DIR                 # the run's newest complete checkpoint
    python tools/convert_to_hf.py runs/x/checkpoints/step_0000100 OUT_DIR --dtype bf16

CKPT_DIR is a checkpoint tag directory, its `checkpoints/` parent or the run's --out directory (both use
`latest`), or a directory written by tools/convert_from_hf.py. OUT_DIR then loads with
`AutoModelForMaskedLM.from_pretrained(OUT_DIR, trust_remote_code=True)` (or without the flag after `import dnascale`).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dnascale.errors import run_cli  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--max-shard-size", type=float, default=2.0, help="GiB per safetensors file (default 2)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from dnascale.convert.consolidate import consolidate
    from dnascale.hf.export import ExportOptions, export_hf

    consolidated = consolidate(a.ckpt_dir, progress=not a.no_progress)
    options = ExportOptions(dtype=a.dtype, max_shard_bytes=int(a.max_shard_size * 1024**3), progress=not a.no_progress)
    out = export_hf(consolidated, a.out_dir, options)
    print(f"wrote {consolidated.recipe.name} step {consolidated.step} (from dp {consolidated.source_topology['dp']} x "
          f"tp {consolidated.source_topology['tp']}) to {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
