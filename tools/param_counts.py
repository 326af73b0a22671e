#!/usr/bin/env python
"""Parameter counts of every preset of every registered model recipe.

    python tools/param_counts.py                 # all recipes
    python tools/param_counts.py --model enbed   # one recipe
    python tools/param_counts.py --json          # machine-readable

Each model is built through its recipe on PyTorch's `meta` device (shapes only: no memory, no initialisation
cost, so the 1.2B presets count in a second) at tensor-parallel size 1, and its parameters are summed; that is the
whole model, whatever TP size the preset names. Where the recipe's module offers an analytic
`count_parameters(config)` (embedding / non-embedding split), it is printed alongside and must agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def count_preset(recipe_name: str, preset: str) -> dict:
    import torch

    from dnascale.models.registry import get_recipe, load_preset

    recipe = get_recipe(recipe_name)
    config = load_preset(recipe_name, preset)
    if getattr(config, "tp", 1) != 1:
        config = dataclasses.replace(config, tp=1)
    row: dict = {"model": recipe_name, "preset": preset}
    with torch.device("meta"):
        model = recipe.build(config, None)
    row["total"] = sum(p.numel() for p in model.parameters())
    analytic = getattr(importlib.import_module(recipe.config_cls.__module__), "count_parameters", None)
    if analytic is not None:
        split = analytic(config)
        row["embedding"], row["non_embedding"] = split.get("embedding"), split.get("non_embedding")
        if split.get("total") != row["total"]:
            row["analytic_total_disagrees"] = split.get("total")
    return row


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    from dnascale.models.registry import list_presets, list_recipes

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="recipe name (repeatable); default: every recipe")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    args = parser.parse_args(argv)
    rows, failed = [], False
    for name in args.model or list_recipes():
        for preset in list_presets(name):
            try:
                rows.append(count_preset(name, preset))
            except Exception as err:  # one recipe that cannot build on meta must not hide the others
                failed = True
                rows.append({"model": name, "preset": preset, "error": f"{type(err).__name__}: {err}"})
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 1 if failed else 0

    def fmt(value):
        return "" if value is None else f"{value:,}"

    print(f"{'model-preset':<22} {'total':>16} {'non-embedding':>16} {'embedding':>12}  size")
    for row in rows:
        label = f"{row['model']}-{row['preset']}"
        if "error" in row:
            print(f"{label:<22} could not build: {row['error']}")
            continue
        total = row["total"]
        size = f"{total / 1e9:.4f}B" if total >= 1e9 else f"{total / 1e6:.2f}M"
        note = f"  (analytic count says {row['analytic_total_disagrees']:,})" if "analytic_total_disagrees" in row else ""
        print(f"{label:<22} {fmt(total):>16} {fmt(row.get('non_embedding')):>16} {fmt(row.get('embedding')):>12}"
              f"  {size}{note}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
