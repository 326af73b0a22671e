"""From each finished run (run.json + metrics.jsonl) to one typed row: what it was, what it cost, what it reached.

    tokens   the loop's own count (sum over steps of tokens_per_s x step_time_s: real tokens with the template)
    flops    the recipe's flops_per_token of the resolved config x tokens (the MFU convention: 6N + attention)
    loss     train_loss: mean of the last k steps' `loss`, the family's whole objective;
             mlm_loss: the same mean of the MLM term (`mlm_loss` where the family logs one: DNACHUNKER adds its
             ratio loss to `loss`, ENBED may add a copy loss), else of `loss`;
             val_loss: the final evaluation (the family's whole objective on held-out windows)
    bits_per_base  mlm_loss / ln 2 / bases per target token (units.py): the scale fits and comparisons use

The training loss stands in for held-out loss because sweep runs read far less than one epoch: every batch is new
to the model when its loss is taken. The last k steps are averaged (k = min(last_k, steps // 4)) against batch
noise. Throughput is the median over steps after the first 10% (the first steps pay for start-up and compilation).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from dnascale.errors import DataError
from dnascale.scaling.sweep import RUN_INFO, last_step

METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class RunRow:
    run_id: str
    family: str
    model: str
    size: str
    layout: str
    dp: int
    tp: int
    pp: int
    world: int
    params: int  # non-embedding
    params_total: int
    steps: int
    global_batch: int
    window: int  # bases per sequence
    bases: int  # steps x global batch x window
    tokens: float
    flops_per_token: float
    flops: float
    train_loss: float
    mlm_loss: float
    val_loss: float | None
    last_k: int
    tokenizer: str
    bases_per_token: float  # corpus average (shard manifest)
    bases_per_target: float  # what the loss is normalised by: mean bases of a masked target token (units.py)
    bits_per_base: float
    mask_rate: float | None
    tokens_per_s: float
    tokens_per_s_per_device: float
    mfu: float | None
    peak_mem_gib: float


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl records by step (a resumed run's rewritten steps: the last line wins; a cut line is skipped)."""
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def _mean_last(records: list[dict], key: str, k: int) -> float:
    values = [float(r[key]) for r in records if key in r and r[key] == r[key]]  # r[key] == r[key]: not NaN
    if not values:
        raise DataError(f"no finite {key!r} values")
    return statistics.fmean(values[-k:])


def _mask_rate(config, collator) -> float | None:
    rate = getattr(config, "mask_rate", None)
    if rate is not None:
        return float(rate)
    return getattr(getattr(collator, "policy", None), "rate", None)


class _DataCache:
    """Shard directories and their tokenisation, looked up once per (data, window, tokenizer)."""

    def __init__(self) -> None:
        self._seen: dict[tuple, tuple[Any, Any, Path]] = {}
        self._targets: dict[tuple, float] = {}

    def bases_per_target(self, directory: Path, recipe, config, tokenizer, collator) -> float:
        """Measured once per shard directory and model config (the masking can depend on the config)."""
        from dnascale.scaling.units import bases_per_target

        key = (str(directory), recipe.name, repr(config))
        if key not in self._targets:
            self._targets[key] = bases_per_target(directory, collator, tokenizer)
        return self._targets[key]

    def get(self, data: str | None, window: int, tokenizer_spec: str):
        key = (data, window, tokenizer_spec)
        if key not in self._seen:
            from dnascale.data.shards import load_manifest
            from dnascale.data.tokenizers import load_tokenizer
            from dnascale.scaling.units import tokenisation_of
            from dnascale.train.data import resolve_data

            directory = resolve_data(data, window, tokenizer_spec, rank=0)
            tokenizer = load_tokenizer(load_manifest(directory)["tokenizer"]["spec"])
            self._seen[key] = (tokenisation_of(directory), tokenizer, directory)
        return self._seen[key]


def collect_run(directory: Path, last_k: int = 10, cache: _DataCache | None = None) -> RunRow:
    from dnascale.models.registry import get_recipe
    from dnascale.scaling.model_size import model_size
    from dnascale.scaling.sweep import resolve_config
    from dnascale.scaling.units import bits_per_base

    info = json.loads((directory / RUN_INFO).read_text())
    records = read_metrics(directory / METRICS)
    layout, train = info["layout"], info["train"]
    config = resolve_config(info["model"], info["preset"], tuple(info["overrides"]), layout["tp"], str(directory))
    recipe = get_recipe(info["model"])
    window = recipe.data_window(config)
    cache = cache or _DataCache()
    tokenisation, tokenizer, data_dir = cache.get(train["data"], window, recipe.tokenizer)
    collator = recipe.make_collator(config, tokenizer, 0)
    per_target = cache.bases_per_target(data_dir, recipe, config, tokenizer, collator)
    size = model_size(info["model"], config)
    steps = int(records[-1]["step"])
    k = min(last_k, max(1, steps // 4))
    mlm_key = "mlm_loss" if any("mlm_loss" in r for r in records[-k:]) else "loss"
    mlm = _mean_last(records, mlm_key, k)
    tokens = sum(float(r["tokens_per_s"]) * float(r["step_time_s"]) for r in records)
    flops_per_token = float(recipe.flops_per_token(config, window))
    steady = [r for r in records if r["step"] > steps // 10] or records
    mfus = [float(r["mfu"]) for r in steady if "mfu" in r]
    tps = statistics.median(float(r["tokens_per_s"]) for r in steady)
    world = layout["dp"] * layout["tp"] * layout["pp"]
    global_batch = train["micro_batch_size"] * train["grad_accum"] * layout["dp"]
    return RunRow(
        run_id=info["run_id"], family=info["family"], model=info["model"], size=info["size"],
        layout=f"dp{layout['dp']}tp{layout['tp']}pp{layout['pp']}", dp=layout["dp"], tp=layout["tp"],
        pp=layout["pp"], world=world, params=size.non_embedding, params_total=size.total, steps=steps,
        global_batch=global_batch, window=window, bases=steps * global_batch * window, tokens=tokens,
        flops_per_token=flops_per_token, flops=flops_per_token * tokens,
        train_loss=_mean_last(records, "loss", k), mlm_loss=mlm,
        val_loss=next((float(r["val_loss"]) for r in reversed(records) if "val_loss" in r), None), last_k=k,
        tokenizer=tokenisation.tokenizer, bases_per_token=tokenisation.bases_per_token,
        bases_per_target=per_target, bits_per_base=bits_per_base(mlm, per_target),
        mask_rate=_mask_rate(config, collator), tokens_per_s=tps, tokens_per_s_per_device=tps / world,
        mfu=statistics.median(mfus) if mfus else None,
        peak_mem_gib=max(float(r.get("peak_mem_gib", 0.0)) for r in records),
    )


@dataclass(frozen=True)
class Collected:
    rows: list[RunRow]
    unfinished: list[str]  # run directories without metrics up to their planned step count


def collect(sweep_dir: str | Path, last_k: int = 10) -> Collected:
    """Rows of every finished run under SWEEP_DIR/runs (sorted by family, then compute)."""
    runs = Path(sweep_dir) / "runs"
    if not runs.is_dir():
        raise DataError(f"{sweep_dir}: no runs/ directory (run tools/scaling/sweep.py with --out {sweep_dir})")
    cache, rows, unfinished = _DataCache(), [], []
    for directory in sorted(p for p in runs.iterdir() if (p / RUN_INFO).is_file()):
        planned = json.loads((directory / RUN_INFO).read_text())["steps"]
        if last_step(directory / METRICS) < planned:
            unfinished.append(directory.name)
            continue
        rows.append(collect_run(directory, last_k, cache))
    return Collected(sorted(rows, key=lambda r: (r.family, r.flops)), unfinished)


# ---- TSV: the one file fits and plots read ----------------------------------------------------------------------

def _fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(RunRow))


def write_tsv(rows: Iterable[RunRow], path: str | Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow([f.name for f in _fields()])
        for row in rows:
            writer.writerow(["" if v is None else repr(v) if isinstance(v, float) else v
                             for v in dataclasses.astuple(row)])


def read_tsv(path: str | Path) -> list[RunRow]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (write it with tools/scaling/collect.py)")
    kinds = {f.name: f.type for f in _fields()}
    rows = []
    with open(path, newline="") as handle:
        for n, record in enumerate(csv.DictReader(handle, delimiter="\t"), start=2):
            missing = sorted(set(kinds) - set(record))
            if missing:
                raise DataError(f"{path}: line {n}: missing column {missing[0]!r}")
            values = {}
            for name, kind in kinds.items():
                raw = record[name]
                if raw == "" and "None" in str(kind):
                    values[name] = None
                elif kind.startswith("int"):
                    values[name] = int(raw)
                elif kind.startswith("float"):
                    values[name] = float(raw)
                else:
                    values[name] = raw
            rows.append(RunRow(**values))
    return rows
