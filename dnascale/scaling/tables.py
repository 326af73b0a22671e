"""Markdown tables of collected rows: one line per run, and throughput per device against the number of devices."""

from __future__ import annotations

from dnascale.scaling.collect import RunRow


def _opt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def results_table(rows: list[RunRow]) -> str:
    lines = ["| run | family | size | layout | params (non-emb / total) | steps | bases | tokens | FLOPs | "
             "train loss | MLM loss (nats/target) | val loss | bases/token | bases/target | bits/base | mask rate | "
             "tokens/s | MFU | peak mem (GiB) |",
             "|" + "---|" * 19]
    for r in rows:
        lines.append(
            f"| {r.run_id} | {r.family} | {r.size} | {r.layout} | {r.params:,} / {r.params_total:,} | {r.steps} | "
            f"{r.bases:,} | {r.tokens:,.0f} | {r.flops:.3g} | {r.train_loss:.4f} | {r.mlm_loss:.4f} | "
            f"{_opt(r.val_loss, '.4f')} | {r.bases_per_token:.3f} | {r.bases_per_target:.3f} | {r.bits_per_base:.4f} | "
            f"{_opt(r.mask_rate, '.2f')} | {r.tokens_per_s:,.0f} | {_opt(r.mfu, '.1%')} | {r.peak_mem_gib:.2f} |")
    return "\n".join(lines) + "\n"


def throughput_rows(rows: list[RunRow]) -> list[dict]:
    """Per family and size, per layout: tokens/s per device and the efficiency against its fewest-device layout.

    Runs of one layout with several budgets are medianed (their throughput should not depend on the budget).
    """
    import statistics

    groups: dict[tuple[str, str], dict[str, list[RunRow]]] = {}
    for r in rows:
        groups.setdefault((r.family, r.size), {}).setdefault(r.layout, []).append(r)
    table = []
    def smallest_first(item):  # sizes in parameter order, not name order (h128 after h64)
        (family, _), layouts = item
        return family, min(m.params for members in layouts.values() for m in members)

    for (family, size), layouts in sorted(groups.items(), key=smallest_first):
        entries = []
        for layout, members in layouts.items():
            per_device = statistics.median(m.tokens_per_s_per_device for m in members)
            entries.append((members[0].world, layout, per_device, members))
        entries.sort()
        base = entries[0][2]
        for world, layout, per_device, members in entries:
            mfus = [m.mfu for m in members if m.mfu is not None]
            table.append({"family": family, "size": size, "layout": layout, "devices": world,
                          "tokens_per_s": per_device * world, "tokens_per_s_per_device": per_device,
                          "efficiency": per_device / base if base else None,
                          "mfu": statistics.median(mfus) if mfus else None, "runs": len(members)})
    return table


def throughput_table(rows: list[RunRow]) -> str:
    lines = ["| family | size | layout | devices | tokens/s | tokens/s per device | per-device efficiency | MFU | runs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in throughput_rows(rows):
        lines.append(f"| {t['family']} | {t['size']} | {t['layout']} | {t['devices']} | {t['tokens_per_s']:,.0f} | "
                     f"{t['tokens_per_s_per_device']:,.0f} | {_opt(t['efficiency'], '.2f')} | "
                     f"{_opt(t['mfu'], '.1%')} | {t['runs']} |")
    return "\n".join(lines) + "\n"
