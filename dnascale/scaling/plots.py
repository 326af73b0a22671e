"""The sweep's figures (matplotlib, Agg backend: no display needed), drawn from results.tsv rows and fits.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dnascale.scaling.collect import RunRow
from dnascale.scaling.fit import PowerLaw
from dnascale.scaling.tables import throughput_rows

_MARKERS = "os^Dv<>p*h"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(names: list[str]) -> dict[str, str]:
    cycle = _pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    return {name: cycle[i % len(cycle)] for i, name in enumerate(names)}


def loss_vs_flops(rows: list[RunRow], fits: dict, path: str | Path) -> None:
    """Bits per base against training FLOPs (log-log): runs (marker = size; black edge = on the family's
    compute-optimal frontier), fitted law, bootstrap CI band."""
    plt = _pyplot()
    families = sorted({r.family for r in rows})
    colors = _colors(families)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for family in families:
        members = [r for r in rows if r.family == family]
        fit = fits.get("families", {}).get(family)
        on_frontier = {p["run_id"] for p in fit["frontier"]} if fit else set()
        sizes = sorted({r.size for r in members}, key=lambda s: min(r.params for r in members if r.size == s))
        for i, size in enumerate(sizes):
            points = [r for r in members if r.size == size]
            ax.scatter([r.flops for r in points], [r.bits_per_base for r in points], color=colors[family],
                       marker=_MARKERS[i % len(_MARKERS)], s=36, zorder=3, linewidths=1.2,
                       edgecolors=["black" if r.run_id in on_frontier else "none" for r in points],
                       label=f"{family} {size} ({points[0].params / 1e6:.2f}M)")
        if fit:
            band = fit["band"]
            low, high = min(r.flops for r in members), max(r.flops for r in members)
            grid = np.array(band["flops"]) if band else np.geomspace(low / 2, high * 2, 40)
            law = PowerLaw(fit["a"], fit["b"], fit["E"])
            ci = f" [{fit['b_ci'][0]:.3f}, {fit['b_ci'][1]:.3f}]" if fit["b_ci"] else " (no CI: too few runs)"
            ax.plot(grid, law(grid), color=colors[family], linewidth=1.4, label=f"{family} fit: b = {fit['b']:.3f}{ci}")
            if band:
                ax.fill_between(grid, band["lo"], band["hi"], color=colors[family], alpha=0.15, linewidth=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import ScalarFormatter

    for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis_formatter(ScalarFormatter())  # bits per base span < 10x: plain numbers read better than 2x10^0
    ax.set_xlabel("training FLOPs (recipe flops_per_token x tokens)")
    ax.set_ylabel("MLM loss, bits per base")
    ax.set_title(f"loss vs compute: {fits.get('formula', '')}, {int(100 * fits['bootstrap']['level'])}% bootstrap "
                 "band; black edge: frontier" if fits else "loss vs compute", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def matched_flops(fits: dict, path: str | Path) -> None:
    """Each family's fitted bits per base at the matched compute budget, with its bootstrap CI."""
    plt = _pyplot()
    matched = fits["matched_flops"]
    names = sorted(matched["families"])
    colors = _colors(sorted(fits["families"]))
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2.5, 4))
    for i, name in enumerate(names):
        entry = matched["families"][name]
        lo, hi = entry["ci"] or (entry["loss"], entry["loss"])
        ax.bar(i, entry["loss"], 0.6, color=colors.get(name), edgecolor="black", linewidth=0.5,
               hatch=None if entry["interpolated"] else "//")
        ax.errorbar(i, entry["loss"], yerr=[[entry["loss"] - lo], [hi - entry["loss"]]], color="black", capsize=4)
        ax.text(i, hi, f"{entry['loss']:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("fitted MLM loss, bits per base")
    spans = [e["ci"] or (e["loss"], e["loss"]) for e in matched["families"].values()]
    low, high = min(s[0] for s in spans), max(s[1] for s in spans)
    ax.set_ylim(max(0.0, low - 0.15 * (high - low + 1e-9)), high + 0.15 * (high - low + 1e-9))
    ax.set_title(f"matched compute: {matched['flops']:.3g} FLOPs (hatched: extrapolated)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def throughput(rows: list[RunRow], path: str | Path) -> None:
    """Tokens/s per device against the number of devices, one line per family and size."""
    plt = _pyplot()
    table = throughput_rows(rows)
    colors = _colors(sorted({t["family"] for t in table}))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key in sorted({(t["family"], t["size"]) for t in table}):
        line = sorted((t for t in table if (t["family"], t["size"]) == key), key=lambda t: t["devices"])
        ax.plot([t["devices"] for t in line], [t["tokens_per_s_per_device"] for t in line], marker="o",
                color=colors[key[0]], label=f"{key[0]} {key[1]}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("devices (dp x tp x pp)")
    ax.set_ylabel("tokens/s per device (median step)")
    ax.set_title("throughput scaling")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
