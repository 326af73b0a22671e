"""The memory model (dnascale/scaling) against the real thing: parameter counts of built models (TP 1 and 2),
activation formulas against autograd's saved tensors, ZeRO arithmetic, and predicted vs measured peak memory
of real CPU training steps (tools/scaling/measure_memory.py: DeepSpeed ZeRO-0, fp32, one rank).

The two measurements run in subprocesses started when this module is set up, so they overlap the other tests.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

from dist_helpers import run_distributed

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("encoder", "enbed", "dnazen", "dnachunker")
# (seq_len, batch, checkpointing, grad_accum): two lengths, with and without activation checkpointing, with one
# and two micro-batches per step (gradients then live across the second micro-batch's forward and backward).
MEASURED = ((512, 4, False, 1), (1024, 4, True, 2))
TOLERANCE = 0.15
LAYERS = {  # layers (pipeline units) per family config; DNAZEN's G-gram layer l shares unit l
    "encoder": lambda c: c.layers,
    "enbed": lambda c: c.encoder_layers + c.decoder_layers,
    "dnazen": lambda c: c.layers,
    "dnachunker": lambda c: c.trunk_layers + 2 * c.stage_layers * c.stages,
}


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / "scaling" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def measurements():
    tool = _tool("measure_memory")
    started = [subprocess.Popen(tool.command_line(*config), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=tool.child_environment(), cwd=REPO) for config in MEASURED]
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()


@pytest.fixture(autouse=True, scope="module")
def _start_measurements_first(measurements):
    """Start the subprocesses before any test of this module runs."""
    yield


def _load_preset(family: str, preset: str):
    from dnascale.models.registry import load_preset

    return load_preset(family, preset)


def _census(family: str, config):
    from dnascale.scaling.families import model_shape
    from dnascale.scaling.layout import Layout
    from dnascale.scaling.memory import census_for

    layout = Layout(nodes=1, gpus_per_node=1, zero_stage=0)
    return census_for(family, config, model_shape(family, config, layout))


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_census_matches_the_built_model_at_tp1(family, parallel):
    from dnascale.models.registry import get_recipe

    config = _load_preset(family, "tiny")
    model = get_recipe(family).build(config, parallel)
    census = _census(family, config)
    assert census.per_rank(1) == sum(p.numel() for p in model.parameters())
    sharded = sum(p.numel() for p in model.parameters() if getattr(p, "tensor_model_parallel", False))
    assert (census.sharded, census.replicated) == (sharded, census.total - sharded)
    # Every layer is a pipeline unit, and the units hold the bulk of the parameters.
    assert len(census.units) == LAYERS[family](config)
    assert sum(p.numel for p in census.params if p.unit is not None) > census.total / 2


def _tp2_counts_worker(rank: int, out_dir: str) -> None:
    from dnascale.models.registry import get_recipe, load_preset
    from dnascale.parallel import init_distributed

    state = init_distributed(tp=2, seed=0)
    counts = {}
    for family in FAMILIES:
        config = dataclasses.replace(load_preset(family, "tiny"), tp=2)
        model = get_recipe(family).build(config, state)
        counts[family] = sum(p.numel() for p in model.parameters())
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(counts))


def test_tp2_per_rank_count_is_sharded_over_two_plus_replicated(tmp_path):
    run_distributed(_tp2_counts_worker, str(tmp_path))
    ranks = [json.loads(Path(tmp_path, f"rank{rank}.json").read_text()) for rank in range(2)]
    for family in FAMILIES:
        census = _census(family, _load_preset(family, "tiny"))
        expected = census.sharded // 2 + census.replicated
        assert census.per_rank(2) == expected
        assert ranks[0][family] == ranks[1][family] == expected, family


BLOCK_VARIANTS = [
    dict(activation="gelu", position="rope", norm_placement="pre", norm="layernorm", dropout=0.0),
    dict(activation="geglu", position="none", norm_placement="post", norm="layernorm", dropout=0.0),
    dict(activation="swiglu", position="rope", norm_placement="pre", norm="rmsnorm", dropout=0.1),
    dict(activation="gelu", position="alibi", norm_placement="post", norm="layernorm", dropout=0.1),
]


@pytest.mark.parametrize("variant", BLOCK_VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_transformer_block_formula_equals_autograds_saved_tensors(variant, parallel):
    from dnascale.models.encoder import EncoderConfig
    from dnascale.nn.block import TransformerBlock
    from dnascale.nn.tp import megatron_config, normal_init
    from dnascale.scaling.activations import transformer_block_footprint
    from dnascale.scaling.layout import Layout
    from dnascale.scaling.saved_census import saved_bytes

    torch.manual_seed(0)
    block_config = EncoderConfig(hidden=64, heads=4, ffn_hidden=192, **variant).block_config()
    block = TransformerBlock(block_config, megatron_config(1), normal_init(0.02), normal_init(0.02)).train()
    batch, length = 3, 96
    x = torch.randn(batch, length, 64, requires_grad=True)
    measured, _ = saved_bytes(lambda: block(x), exclude=list(block.parameters()))
    layout = Layout(nodes=1, gpus_per_node=1, zero_stage=0, dtype="fp32", device="cpu", micro_batch=batch)
    footprint = transformer_block_footprint(block_config, length, layout)
    assert footprint.saved * batch * length + footprint.fixed == measured


def _state(estimate) -> float:
    return estimate.params + estimate.grads + estimate.optimizer


def test_zero_stages_partition_model_state_over_data_parallel_ranks():
    from dnascale.scaling.layout import Layout, ZeroBuffers
    from dnascale.scaling.memory import estimate_memory

    config = _load_preset("encoder", "1b2")
    census = _census("encoder", config)
    # No persistence threshold: every parameter is partitioned under ZeRO-3.
    zero = ZeroBuffers(reduce_bucket_size=1, allgather_bucket_size=1, prefetch_bucket_size=1, max_live_parameters=1,
                       param_persistence_threshold=0, sub_group_size=1)
    estimates = {stage: estimate_memory("encoder", config, Layout(nodes=1, zero_stage=stage, zero=zero), census)
                 for stage in range(4)}
    psi = census.per_rank(1)
    assert estimates[0].params_per_rank == psi
    dp = Layout(nodes=1).dp
    assert dp == 8
    assert _state(estimates[3]) == pytest.approx(_state(estimates[0]) / dp, rel=1e-12)
    assert estimates[1].optimizer == pytest.approx(estimates[0].optimizer / dp, rel=1e-12)
    assert (estimates[1].params, estimates[1].grads) == (estimates[0].params, estimates[0].grads)
    assert estimates[2].grads == pytest.approx(estimates[0].grads / dp, rel=1e-12)
    # bf16 weights and grads, float32 master + Adam m and v: the ZeRO paper's 2 + 2 + 12 bytes per parameter.
    assert _state(estimates[0]) == 16 * psi
    # TP 2 halves the sharded parameters only.
    tp2 = estimate_memory("encoder", config, Layout(nodes=1, tp=2, zero_stage=0, zero=zero), census)
    assert tp2.params_per_rank == census.sharded // 2 + census.replicated


def test_activation_checkpointing_keeps_layer_inputs_only():
    from dnascale.scaling.layout import Layout
    from dnascale.scaling.memory import estimate_memory

    config = _load_preset("encoder", "1b2")
    census = _census("encoder", config)
    on, off = (estimate_memory("encoder", config, Layout(nodes=1, micro_batch=2, activation_checkpointing=flag),
                               census) for flag in (True, False))
    assert on.activations < off.activations / 4
    kept = on.breakdown["activations: layers (kept)"]
    assert kept == 2 * config.layers * config.max_seq_len * config.hidden * torch.bfloat16.itemsize
    # One layer's saved set is recomputed in backward, less its input, which the checkpoint already holds.
    assert on.breakdown["activations: recomputed layer"] == pytest.approx(
        off.breakdown["activations: layers (kept)"] / config.layers - kept / config.layers)


def test_pipeline_stage_zero_holds_pp_micro_batches():
    from dnascale.scaling.layout import Layout
    from dnascale.scaling.memory import estimate_memory

    config = _load_preset("encoder", "1b2")
    census = _census("encoder", config)
    common = dict(nodes=1, zero_stage=1, micro_batch=1, grad_accum=8, activation_checkpointing=False)
    flat = estimate_memory("encoder", config, Layout(pp=1, **common), census)
    piped = estimate_memory("encoder", config, Layout(pp=2, **common), census)
    assert piped.stage == 0
    # Half the layers, two micro-batches in flight: the same layer activations as one micro-batch of all layers.
    assert piped.breakdown["activations: layers (kept)"] == pytest.approx(flat.breakdown["activations: layers (kept)"])
    assert piped.params_per_rank < flat.params_per_rank


def test_cli_prints_a_breakdown_and_refuses_bad_layouts(capsys):
    from dnascale.errors import ConfigError

    tool = _tool("memory_model")
    tool.main(["--model", "dnazen", "--preset", "tiny", "--gpus-per-node", "2", "--tp", "2", "--json"])
    record = json.loads(capsys.readouterr().out)
    assert record["memory"]["total"] > record["memory"]["params"] > 0
    assert record["throughput"]["days_per_100b_tokens"] > 0
    with pytest.raises(ConfigError, match="not divisible"):
        tool.main(["--model", "encoder", "--preset", "tiny", "--tp", "3"])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets the peak RSS through /proc (Linux)")
def test_predicted_peak_memory_is_within_15_percent_of_measured(measurements):
    records = []
    for config, process in zip(MEASURED, measurements):
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, f"{config}: {stdout[-2000:]}\n{stderr[-4000:]}"
        records.append(json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1]))
    for record in records:
        print(f"seq {record['seq_len']} batch {record['batch']} ckpt {record['checkpointing']} "
              f"ga {record['grad_accum']}: measured {record['measured_bytes'] / 2**20:.0f} MiB, predicted "
              f"{record['predicted_bytes'] / 2**20:.0f} MiB, ratio {record['ratio']:.3f}")
        assert record["measured_bytes"] > 100 * 2**20  # model state + activations dominate the noise
        assert abs(record["ratio"] - 1) <= TOLERANCE
