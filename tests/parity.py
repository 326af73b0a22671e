"""Parity comparisons for the parallel tests: tolerances that follow from the arithmetic, and a log of the errors.

Why float64. TP=2 and TP=1 run the same operations on the same full weights; the only difference is the order
in which partial sums are added (a row-parallel matmul adds two half-sums and then all-reduces them, the
TP=1 matmul adds the whole row in its own blocking order). Reordering a sum of n terms changes it by at most
about n * u * sum_i |x_i| (u the unit roundoff), and that error is carried through every layer of the forward
and then the backward pass. In float32 (u = 6e-8) a 2-layer model with width 64 already reaches 1e-5 at an
unlucky element: CI once saw 1.15e-5 against an atol of 1e-5, so a fixed float32 tolerance passes or fails by
the machine's blocking order, not by the code. In float64 (u = 1.1e-16) the same bound is about 1e-13 for
these sizes (sums of <= 128 terms, values O(1), <= 6 layers deep, x10 for the backward pass), so
`F64_TOL` (1e-9, 4 orders of magnitude above it) cannot be reached by rounding, while a real sharding mistake
(a wrong slice, a missing or doubled all-reduce) gives errors of O(1e-2) or more.

Tests whose arithmetic cannot run in float64 (DeepSpeed's ZeRO engines and the launched training runs keep fp32
flat buffers) state their own float32 tolerance next to the worst error observed over 20 seeds.

The seed sweep. `parity_seeds()` is `range(1)` in a normal test run. `DNASCALE_PARITY_SEEDS=20` makes each
parity worker repeat its comparisons for seeds 0..19 (other weights and inputs each time) inside one process
group, and `DNASCALE_PARITY_LOG=FILE` appends one JSON line per comparison (test, what, seed, max abs error,
max error relative to the tolerance). `tools/parity_sweep.py` runs the sweep and prints the worst per test; the
worst observed values are written beside each tolerance in the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator

import torch

# rtol/atol for float64 parity (see the module docstring for the bound).
F64_TOL = dict(rtol=1e-9, atol=1e-9)


def parity_seeds() -> range:
    return range(int(os.environ.get("DNASCALE_PARITY_SEEDS", "1")))


@contextlib.contextmanager
def float64() -> Iterator[None]:
    """Build and run models in float64: every parameter (megatron's too, see nn.tp.megatron_config) and input.

    megatron's vocab-parallel cross-entropy casts the logits to float32 first (right for bf16 training); left
    alone, that cast rounds the TP=1 and TP=2 logits, which differ in their last float64 bits, to float32
    neighbours, and the float32 error (1e-8) comes back through every gradient. Inside this context the cast
    keeps float64; the rest of megatron's cross-entropy (max, all-reduces, masking, gradient) runs as shipped.
    """
    from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy

    def logits_max_keeping_float64(vocab_parallel_logits: torch.Tensor):
        logits = vocab_parallel_logits.to(torch.promote_types(vocab_parallel_logits.dtype, torch.float32))
        return logits, torch.max(logits, dim=-1)[0]

    previous_dtype = torch.get_default_dtype()
    previous_max = VocabParallelCrossEntropy.calculate_logits_max
    torch.set_default_dtype(torch.float64)
    VocabParallelCrossEntropy.calculate_logits_max = staticmethod(logits_max_keeping_float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous_dtype)
        VocabParallelCrossEntropy.calculate_logits_max = staticmethod(previous_max)


def assert_parity(got: torch.Tensor, want: torch.Tensor, *, test: str, what: str, seed: int = 0,
                  rtol: float, atol: float) -> None:
    """torch.testing.assert_close, recording the worst error (and its share of the allowed error) when asked."""
    got, want = got.detach(), want.detach()
    log = os.environ.get("DNASCALE_PARITY_LOG")
    if log and got.shape == want.shape and got.dtype == want.dtype and got.numel():
        difference = (got.double() - want.double()).abs()
        allowed = atol + rtol * want.double().abs()
        record = {"test": test, "what": what, "seed": seed, "dtype": str(got.dtype).removeprefix("torch."),
                  "max_abs": difference.max().item(), "worst_share_of_tolerance": (difference / allowed).max().item(),
                  "rtol": rtol, "atol": atol}
        rank = os.environ.get("RANK", "0")
        with open(f"{log}.rank{rank}", "a") as fh:  # one file per rank: no interleaved writes
            fh.write(json.dumps(record) + "\n")
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{test}: {what} (seed {seed}): {m}")


def compare_tp2_with_tp1(cases: dict, rank: int, seed: int, test: str, check_tp2_model=None) -> None:
    """Each case `name -> (build, run)` at TP=1, then at TP=2 on the same full weights: outputs and gradients.

    `run(model)` returns the tensors to compare (it calls backward itself); both ranks build the TP=1 model from
    `torch.manual_seed(seed)`, so they hold the same full weights, which `load_full_state_dict` then shards.
    """
    from dnascale.nn.tp import load_full_state_dict, shard_for_rank
    from dnascale.parallel import init_distributed

    init_distributed(tp=1, seed=0)
    reference = {}
    for name, (build, run) in cases.items():
        torch.manual_seed(seed)
        model = build()
        outputs = [t.detach().clone() for t in run(model)]
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        reference[name] = (params, outputs, grads)

    init_distributed(tp=2, seed=0)
    for name, (build, run) in cases.items():
        params, expected_outputs, expected_grads = reference[name]
        model = build()
        if check_tp2_model is not None:
            check_tp2_model(name, model)
        load_full_state_dict(model, params)
        for i, (got, want) in enumerate(zip(run(model), expected_outputs)):
            assert_parity(got, want, test=test, what=f"{name} output {i}", seed=seed, **F64_TOL)
        for pname, param in model.named_parameters():
            want = shard_for_rank(expected_grads[pname], param, rank, 2)
            assert_parity(param.grad, want, test=test, what=f"{name} grad of {pname}", seed=seed, **F64_TOL)


def sgd_losses_under_zero_stages(build, step, seed: int, micro_batch: int, stages=(0, 3), steps: int = 3):
    """{stage: losses of `steps` SGD steps (lr 0.5)} for a model built by `build()` at each ZeRO stage.

    The model is built from `seed_everything(seed)` each time (inside zero3_init for stage 3, so its parameters
    are created partitioned), and `step(engine)` returns the loss of one forward pass.
    """
    import deepspeed

    from dnascale.parallel import DeepSpeedMPU, seed_everything, zero3_init

    losses = {}
    for stage in stages:
        ds_config = {"train_micro_batch_size_per_gpu": micro_batch, "zero_optimization": {"stage": stage},
                     "zero_allow_untested_optimizer": True}
        seed_everything(seed)
        if stage == 3:
            with zero3_init(ds_config):
                model = build()
        else:
            model = build()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=DeepSpeedMPU())
        losses[stage] = []
        for _ in range(steps):
            loss = step(engine)
            engine.backward(loss)
            engine.step()
            losses[stage].append(loss.item())
    return losses
