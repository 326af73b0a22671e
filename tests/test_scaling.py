"""Scaling tools: spec validation, grid expansion, commands, collection, power-law fits, and a tiny real sweep."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from dnascale.errors import ConfigError
from dnascale.scaling import sweep
from dnascale.scaling.collect import collect, read_tsv, write_tsv
from dnascale.scaling.fit import bootstrap, fit_power_law, fit_rows, frontier
from dnascale.scaling.runner import check_run_dir, run_local
from dnascale.scaling.spec import load_spec
from dnascale.scaling.units import bits_per_base, tokenisation_of

REPO = Path(__file__).resolve().parents[1]
FASTA = REPO / "tests" / "data" / "athaliana_chr1_slice.fa.gz"
# A very small encoder: 64-token sequences (63 bases + [SEP]), so a step takes milliseconds.
SMALL = {"hidden": 16, "heads": 2, "ffn_hidden": 32, "layers": 1, "max_seq_len": 64}


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Char shards of the bundled A. thaliana slice in 63-base windows (the SMALL encoder's data_window)."""
    from dnascale.data.shards import ShardConfig, build_shards

    out = tmp_path_factory.mktemp("shards") / "char-w63"
    build_shards([FASTA], out, ShardConfig(window=63, tokenizer="nucleotide-char", val_fraction=0.05),
                 progress=False)
    return out


def small_spec(tmp_path: Path, data: Path, budgets=(2016, 4032), layouts="[{dp: 1, tp: 1, pp: 1}]") -> Path:
    overrides = ", ".join(f"{k}: {v}" for k, v in SMALL.items())
    return write_spec(tmp_path / "small.yaml", f"""
name: small
token_budgets: {list(budgets)}
layouts: {layouts}
train: {{ds_config: ds_configs/stage0.json, micro_batch_size: 4, warmup_fraction: 0.1, eval_batches: 1,
         data: {data}, lr: 0.003}}
families:
  - model: encoder
    sizes:
      - {{name: s16, overrides: {{{overrides}}}}}
""")


# ---- spec validation ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, names", [
    ("token_budgets: [1000]\nfamilies: [{model: encoder, sizes: [{name: a, overides: {hidden: 32}}]}]",
     "'overides'"),
    ("token_budgets: [-5]\nfamilies: [{model: encoder, sizes: [{name: a}]}]", "token_budgets"),
    ("token_budgets: [1000]\nlayouts: [{dp: 0}]\nfamilies: [{model: encoder, sizes: [{name: a}]}]", "dp=0"),
    ("token_budgets: [1000]\ntrain: {micro_batch_size: two}\nfamilies: [{model: encoder, sizes: [{name: a}]}]",
     "micro_batch_size"),
    ("token_budgets: [1000]\nfamilies: [{model: encoder, sizes: [{name: 'a b'}]}]", "name='a b'"),
    ("token_budgets: [1000]\nfamilies: [{model: encoder, sizes: [{name: a}, {name: a}]}]", "'a' appears twice"),
])
def test_a_bad_field_is_one_line_naming_it(tmp_path, body, names):
    path = write_spec(tmp_path / "bad.yaml", "name: bad\n" + body + "\n")
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    message = str(err.value)
    assert names in message and message.startswith("bad.yaml") and "\n" not in message, message


@pytest.mark.parametrize("family, names", [
    ("{model: encodr, sizes: [{name: a}]}", "unknown model 'encodr'"),
    ("{model: encoder, sizes: [{name: a, preset: huge}]}", "unknown preset 'huge'"),
    ("{model: encoder, sizes: [{name: a, overrides: {hiden: 32}}]}", "unknown field 'hiden'"),
    ("{model: encoder, sizes: [{name: a, overrides: {hidden: 30, heads: 4}}]}", "hidden"),  # 30 % 4 != 0
])
def test_expansion_names_the_family_size_and_bad_model_field(tmp_path, family, names):
    spec = load_spec(write_spec(tmp_path / "s.yaml", f"name: s\ntoken_budgets: [1000]\nfamilies: [{family}]\n"))
    with pytest.raises(ConfigError) as err:
        sweep.expand(spec)
    message = str(err.value)
    assert names in message and "families[0] (encod" in message and "sizes[0] (a)" in message, message
    assert "\n" not in message


def test_the_sweep_cli_reports_a_bad_spec_as_one_line(tmp_path, capsys):
    import importlib.util

    path = write_spec(tmp_path / "bad.yaml", "name: bad\ntoken_budgets: [1000]\nfamilies: []\n")
    spec = importlib.util.spec_from_file_location("scaling_sweep_cli", REPO / "tools" / "scaling" / "sweep.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    with pytest.raises(SystemExit) as exit_:
        from dnascale.errors import run_cli

        run_cli(lambda: cli.main([str(path), "--out", str(tmp_path / "out")]))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: bad.yaml") and "families" in err and "\n" not in err, err


def test_the_mini_sweep_spec_expands():
    runs = sweep.expand(load_spec(REPO / "tools" / "scaling" / "specs" / "cpu_mini.yaml"))
    families = {r.family for r in runs}
    assert families == {"encoder", "enbed", "dnazen", "dnachunker"}
    for family in families:
        sizes = {r.size for r in runs if r.family == family}
        assert 2 <= len(sizes) <= 3
    assert len({r.token_budget for r in runs}) == 2
    assert all(r.layout.world == 1 for r in runs)


# ---- grid expansion, run ids, commands ---------------------------------------------------------------------------

def test_budget_labels_are_exact_and_short():
    assert [sweep.budget_label(n) for n in (999, 40000, 1_500_000, 2 * 10**10, 123_457)] == \
        ["999", "40k", "1.5M", "20B", "123457"]


def test_grid_expansion_ids_steps_and_stability(tmp_path):
    path = write_spec(tmp_path / "g.yaml", """
name: g
token_budgets: [40000, 1500000]
layouts: [{dp: 1}, {dp: 2, tp: 2}]
train: {micro_batch_size: 4, grad_accum: 2, warmup_fraction: 0.1}
families:
  - model: encoder
    sizes: [{name: h32, overrides: {hidden: 32, heads: 2, ffn_hidden: 128}}, {name: tiny}]
  - {model: encoder, label: enc_alibi, sizes: [{name: tiny, overrides: {position: alibi}}]}
""")
    runs = sweep.expand(load_spec(path))
    assert len(runs) == 3 * 2 * 2  # (2 + 1 sizes) x 2 layouts x 2 budgets
    ids = [r.run_id for r in runs]
    assert len(set(ids)) == len(ids)
    assert ids[:4] == ["encoder-h32-b40k-dp1tp1pp1", "encoder-h32-b1.5M-dp1tp1pp1",
                       "encoder-h32-b40k-dp2tp2pp1", "encoder-h32-b1.5M-dp2tp2pp1"]
    assert [r.run_id for r in sweep.expand(load_spec(path))] == ids  # stable
    by_id = {r.run_id: r for r in runs}
    one, two = by_id["encoder-h32-b1.5M-dp1tp1pp1"], by_id["encoder-h32-b1.5M-dp2tp2pp1"]
    assert one.window == 511 and one.global_batch == 8 and two.global_batch == 16
    assert one.steps == math.ceil(1_500_000 / (8 * 511)) and two.steps == math.ceil(1_500_000 / (16 * 511))
    assert one.planned_bases >= 1_500_000 > (one.steps - 1) * 8 * 511
    assert one.warmup_steps == round(0.1 * one.steps)
    assert "--override" in sweep.pretrain_args(by_id["enc_alibi-tiny-b40k-dp1tp1pp1"], "out")
    assert "position=alibi" in sweep.pretrain_args(by_id["enc_alibi-tiny-b40k-dp1tp1pp1"], "out")


def test_commands_local_deepspeed_sbatch_and_pp(tmp_path):
    path = write_spec(tmp_path / "c.yaml", """
name: c
token_budgets: [100000]
layouts: [{dp: 1}, {dp: 8, tp: 2}, {dp: 2, pp: 2}]
slurm: {gpus_per_node: 8, sbatch_args: ["--time=01:00:00"]}
families: [{model: encoder, sizes: [{name: tiny}]}]
""")
    spec = load_spec(path)
    single, wide, piped = sweep.expand(spec)
    local = sweep.local_command(single, "out")
    assert local[0] == sys.executable and local[1] == "launchers/pretrain.py" and "--pp" not in local
    assert sweep.local_command(wide, "out", master_port=29555)[:5] == \
        ["deepspeed", "--num_gpus", "16", "--master_port", "29555"]
    args = sweep.pretrain_args(piped, "out")
    assert args[args.index("--pp") + 1] == "2" and args[args.index("--tp") + 1] == "1"
    assert args[args.index("--out") + 1] == str(Path("out") / "runs" / piped.run_id)
    line = sweep.sbatch_command(wide, "out", spec.slurm)
    assert line[:5] == ["sbatch", "--nodes", "2", "--gpus-per-node", "8"]
    script = line.index(sweep.SBATCH_SCRIPT)
    assert "--time=01:00:00" in line[:script] and line[script + 1:] == sweep.pretrain_args(wide, "out")
    assert sweep.sbatch_command(single, "out", spec.slurm)[:5] == ["sbatch", "--nodes", "1", "--gpus-per-node", "1"]

    # A finished run gets no script; the others one each, and submit_all.sh lists them.
    done = sweep.run_dir(tmp_path / "out", single)
    done.mkdir(parents=True)
    (done / "metrics.jsonl").write_text(json.dumps({"step": single.steps, "loss": 1.0}) + "\n")
    scripts = sweep.write_sbatch_scripts([single, wide, piped], tmp_path / "out", spec, tmp_path / "sbatch")
    assert [p.name for p in scripts] == [f"{wide.run_id}.sh", f"{piped.run_id}.sh"]
    text = scripts[0].read_text()
    assert text.startswith("#!/usr/bin/env bash") and "sbatch --nodes 2" in text and os.access(scripts[0], os.X_OK)
    assert (tmp_path / "sbatch" / "submit_all.sh").read_text().count("bash ") == 2

    printed: list[str] = []
    outcomes = run_local([single, wide], tmp_path / "out", dry_run=True, echo=printed.append)
    assert {o.status for o in outcomes} == {"finished", "planned"} and len(printed) == 1
    assert printed[0].startswith("deepspeed --num_gpus 16")
    assert not sweep.run_dir(tmp_path / "out", wide).exists()  # a dry run creates nothing


def test_a_run_directory_of_other_settings_is_refused(tmp_path, shards):
    run = sweep.expand(load_spec(small_spec(tmp_path, shards)))[0]
    directory = sweep.run_dir(tmp_path / "out", run)
    directory.mkdir(parents=True)
    info = run.to_dict() | {"steps": run.steps + 1}
    (directory / sweep.RUN_INFO).write_text(json.dumps(info))
    with pytest.raises(ConfigError, match="other settings \\(steps\\)"):
        check_run_dir(run, tmp_path / "out")


# ---- collection --------------------------------------------------------------------------------------------------

def test_collector_on_a_synthetic_metrics_file(tmp_path, shards):
    from dnascale.models.encoder import count_parameters, flops_per_token
    from dnascale.scaling.sweep import resolve_config

    run = sweep.expand(load_spec(small_spec(tmp_path, shards)))[1]
    directory = sweep.run_dir(tmp_path / "sweep", run)
    directory.mkdir(parents=True)
    (directory / sweep.RUN_INFO).write_text(json.dumps(run.to_dict()))
    steps = run.steps
    records = []
    for step in range(1, steps + 1):
        record = {"step": step, "loss": 3.0 - 0.1 * step, "tokens_per_s": 1000.0 * step, "step_time_s": 0.5,
                  "peak_mem_gib": 0.1 * step}
        if step == steps:
            record["val_loss"] = 1.5
        records.append(record)
    # A resumed run rewrites steps after its checkpoint (the later line wins); a kill can leave a cut last line.
    stale = {"step": 2, "loss": 99.0, "tokens_per_s": 1.0, "step_time_s": 1.0}
    lines = [json.dumps(records[0]), json.dumps(stale)] + [json.dumps(r) for r in records[1:]] + ['{"step": 99, "lo']
    (directory / "metrics.jsonl").write_text("\n".join(lines))
    collected = collect(tmp_path / "sweep", last_k=10)
    assert collected.unfinished == [] and len(collected.rows) == 1
    row = collected.rows[0]
    config = resolve_config("encoder", "tiny", run.overrides, 1, "test")
    k = max(1, steps // 4)
    assert row.last_k == k
    assert row.train_loss == pytest.approx(np.mean([3.0 - 0.1 * s for s in range(steps - k + 1, steps + 1)]))
    assert row.mlm_loss == row.train_loss  # the encoder's loss is its MLM loss
    assert row.val_loss == 1.5
    tokens = sum(1000.0 * s * 0.5 for s in range(1, steps + 1))
    assert row.tokens == pytest.approx(tokens)
    assert row.flops == pytest.approx(flops_per_token(config, 63) * tokens)
    assert row.params == count_parameters(config)["non_embedding"] and row.params_total > row.params
    assert row.bases_per_token == row.bases_per_target == 1.0 and row.bits_per_base == pytest.approx(row.mlm_loss / math.log(2))
    assert row.mask_rate == 0.15
    assert row.tokens_per_s == np.median([1000.0 * s for s in range(1, steps + 1) if s > steps // 10])
    assert row.peak_mem_gib == pytest.approx(0.1 * steps)
    write_tsv(collected.rows, tmp_path / "results.tsv")
    assert read_tsv(tmp_path / "results.tsv") == collected.rows


def test_bits_per_base_of_char_and_bpe_shards(shards, tmp_path):
    assert tokenisation_of(shards).bases_per_token == 1.0
    assert bits_per_base(2 * math.log(2), 4.0) == pytest.approx(0.5)
    manifest = json.loads((shards / "manifest.json").read_text())
    fake = tmp_path / "bpe"
    fake.mkdir()
    bpe = REPO / "dnascale" / "assets" / "dnazen" / "tokenizer"
    manifest["tokenizer"] = {"name": "bpe", "spec": str(bpe), "vocab_size": 4096}
    manifest["splits"]["train"]["tokens"] = manifest["splits"]["train"]["samples"] * 63 // 5
    (fake / "manifest.json").write_text(json.dumps(manifest))
    assert tokenisation_of(fake).bases_per_token == pytest.approx(5.0, rel=1e-3)


# ---- fits --------------------------------------------------------------------------------------------------------

FLOPS = np.geomspace(1e14, 1e19, 12)


def noisy(law, seed: int, sigma: float = 0.01) -> np.ndarray:
    return law(FLOPS) * np.exp(np.random.default_rng(seed).normal(0.0, sigma, len(FLOPS)))


def test_power_law_exponent_recovered_within_5_percent_and_covered_by_the_ci():
    from dnascale.scaling.fit import PowerLaw, _interval

    truth = PowerLaw(a=40.0, b=0.08)
    loss = noisy(truth, seed=1)
    fit = fit_power_law(FLOPS, loss, "power")
    assert abs(fit.b - truth.b) / truth.b < 0.05
    refits, skipped = bootstrap(FLOPS, loss, "power", n=1000, seed=0)
    assert skipped == 0 and len(refits) == 1000
    lo, hi = _interval([f.b for f in refits], 0.95)
    assert lo <= truth.b <= hi and lo < fit.b < hi
    a_lo, a_hi = _interval([f.a for f in refits], 0.95)
    assert a_lo <= truth.a <= a_hi


def test_the_bootstrap_interval_covers_the_exponent_most_of_the_time():
    from dnascale.scaling.fit import PowerLaw, _interval

    truth, covered = PowerLaw(a=40.0, b=0.08), 0
    for seed in range(20):
        refits, _ = bootstrap(FLOPS, noisy(truth, seed), "power", n=200, seed=seed)
        lo, hi = _interval([f.b for f in refits], 0.95)
        covered += lo <= truth.b <= hi
    assert covered >= 16  # nominal 95%; the percentile bootstrap under-covers a little with 12 points


def test_offset_form_recovers_exponent_and_irreducible_loss():
    from dnascale.scaling.fit import PowerLaw, _interval

    truth = PowerLaw(a=3000.0, b=0.2, E=1.8)
    loss = noisy(truth, seed=2, sigma=0.005)
    fit = fit_power_law(FLOPS, loss, "offset")
    assert abs(fit.b - truth.b) / truth.b < 0.05 and abs(fit.E - truth.E) / truth.E < 0.05
    refits, _ = bootstrap(FLOPS, loss, "offset", n=200, seed=0)
    lo, hi = _interval([f.b for f in refits], 0.95)
    assert lo <= truth.b <= hi


def test_frontier_and_matched_flops_from_rows():
    from dnascale.scaling.collect import RunRow

    points = [{"run_id": "a", "size": "s", "params": 1, "flops": 1.0, "loss": 3.0},
              {"run_id": "b", "size": "m", "params": 2, "flops": 2.0, "loss": 3.5},   # dominated by a
              {"run_id": "c", "size": "m", "params": 2, "flops": 4.0, "loss": 2.0}]
    assert [p["run_id"] for p in frontier(points)] == ["a", "c"]

    def row(family, flops, bpb):
        fields = {f: 0 for f in RunRow.__dataclass_fields__}
        return RunRow(**(fields | {"run_id": f"{family}-{flops:g}", "family": family, "size": f"{flops:g}",
                                    "flops": flops, "bits_per_base": bpb, "val_loss": None, "mfu": None,
                                    "mask_rate": None}))

    rows = [row("x", c, 2.0 * c ** -0.1) for c in (1e10, 1e11, 1e12)]
    rows += [row("y", c, 3.0 * c ** -0.1) for c in (1e11, 1e12, 1e13)]
    fits = fit_rows(rows, "power", n_boot=100, seed=0)
    matched = fits["matched_flops"]
    assert matched["flops"] == pytest.approx(math.sqrt(1e11 * 1e12))
    assert matched["families"]["x"]["loss"] == pytest.approx(2.0 * matched["flops"] ** -0.1)
    assert matched["families"]["y"]["loss"] == pytest.approx(3.0 * matched["flops"] ** -0.1)
    assert all(e["interpolated"] for e in matched["families"].values())
    assert fits["families"]["x"]["b"] == pytest.approx(0.1)


# ---- a real sweep, end to end ------------------------------------------------------------------------------------

def test_tiny_encoder_sweep_runs_collects_fits_plots_and_resumes(tmp_path, shards):
    from dnascale.scaling import plots

    runs = sweep.expand(load_spec(small_spec(tmp_path, shards)))
    assert [r.steps for r in runs] == [8, 16]  # 2016 and 4032 bases at 4 x 63 bases per step
    out = tmp_path / "sweep"
    outcomes = run_local(runs, out, jobs=2, progress=False)
    assert sorted(o.status for o in outcomes) == ["done", "done"], [o.message for o in outcomes]
    collected = collect(out)
    assert [r.steps for r in collected.rows] == [8, 16] and not collected.unfinished
    for row in collected.rows:
        assert 0 < row.bits_per_base < 5 and row.flops > 0 and row.val_loss is not None
    write_tsv(collected.rows, tmp_path / "results.tsv")
    fits = fit_rows(read_tsv(tmp_path / "results.tsv"), "power", n_boot=50, seed=0)
    assert set(fits["families"]) == {"encoder"} and math.isfinite(fits["families"]["encoder"]["b"])
    plots.loss_vs_flops(collected.rows, fits, tmp_path / "loss.png")
    plots.matched_flops(fits, tmp_path / "matched.png")
    plots.throughput(collected.rows, tmp_path / "throughput.png")
    for name in ("loss.png", "matched.png", "throughput.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"

    logs = {r.run_id: (sweep.run_dir(out, r) / "launch.log").read_text() for r in runs}
    again = run_local(runs, out, jobs=2, progress=False)
    assert [o.status for o in again] == ["finished", "finished"]
    assert {r.run_id: (sweep.run_dir(out, r) / "launch.log").read_text() for r in runs} == logs
