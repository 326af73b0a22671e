"""Predicted peak memory per GPU of a training layout: model state, activations and temporary buffers.

Model state per rank, for the Psi parameters a TP rank of the worst pipeline stage holds (exact, from
`param_census`), with p = 2 (bf16) or 4 (fp32) bytes per weight or gradient element:

    ZeRO stage     weights                      gradients     optimizer (fp32 master + Adam m + v)
    0              p Psi                        p Psi         (k + 8) Psi
    1              p Psi                        p Psi         (k + 8) Psi / dp
    2              p Psi                        p Psi / dp    (k + 8) Psi / dp
    3              p (Psi - Psi_keep) / dp      p Psi / dp    (k + 8) Psi / dp
                   + p Psi_keep + live gathered

k = 4 bytes for the fp32 master copy, which exists with bf16 and, in fp32, under ZeRO >= 1 too (DeepSpeed's ZeRO
optimizers step a float32 clone of the flat partition); plain fp32 training (stage 0) steps the weights
themselves (k = 0). Psi_keep: ZeRO-3 keeps parameters of at most `stage3_param_persistence_threshold` elements
unpartitioned. Live gathered (ZeRO-3): the parameters all-gathered at once, min(stage3_max_live_parameters,
largest unit + stage3_prefetch_bucket_size) elements. Offloading moves the optimizer state (and ZeRO's gradient
partitions) or the weight partitions to CPU memory.

Activations (families.py, activations.py): per unit either its saved tensors or, when checkpointed, its input;
the outer parts (embeddings, level glue; final norm, head and loss). Their peak is the larger of the end of
forward (all of that) and a layer's backward (the head's tensors already freed; one checkpointed unit's
recomputed saved set, less the input the checkpoint already holds; the gradients in flight). With PP the 1F1B
schedule keeps min(pp - stage, grad_accum) micro-batches in flight on a stage (pp on stage 0).

The peak is the largest of three phases:
- forward/backward: weights + optimizer state + activations + one unit's backward working set + ZeRO buffers
  (reduce bucket; ZeRO-3 gathered parameters; PP send/receive buffers) + gradients. Gradients are added in full
  when they outlive a micro-batch (grad_accum > 1, or ZeRO-3's preallocated partition buffer); with one
  micro-batch per step they appear as activations are freed, so only max(activations, gradients) is live.
- gradient all-reduce (ZeRO-0 and -1, after the last backward of a step): weights + optimizer state + gradients +
  the flattened copy DeepSpeed reduces them through (ZeRO-0: buckets of up to MEMORY_OPT_ALLREDUCE_SIZE
  elements, i.e. all gradients of a 1B model; ZeRO-1: its reduce bucket).
- optimizer step: weights + optimizer state + gradients + the step's float32 temporaries (the gradient partition
  cast to float32 under bf16 ZeRO, and Adam's denominator: one per stepped tensor with torch's foreach
  implementation on CUDA, two at a time for the largest tensor with the per-tensor loop on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dnascale.scaling.activations import STAT_BYTES
from dnascale.scaling.families import Activations, ModelShape, model_shape
from dnascale.scaling.layout import Layout
from dnascale.scaling.param_census import ParamCensus, take_census

ADAM_MOMENTS = 2  # m and v, float32


def census_for(recipe_name: str, config: Any, shape: ModelShape) -> ParamCensus:
    return take_census(recipe_name, config, shape.patterns, shape.group_order, shape.last_stage_prefixes,
                       shape.tied_prefixes)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU on the worst rank (`stage`), by component; `total` is the predicted peak."""

    params: float
    grads: float
    optimizer: float
    activations: float
    temporaries: float
    total: float
    peak_phase: str  # "forward/backward", "gradient all-reduce" or "optimizer step"
    stage: int  # the pipeline stage this is for (the one with the largest total)
    params_per_rank: int  # parameters this rank's TP shard of its stage holds (before ZeRO partitioning)
    breakdown: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _StageActivations:
    items: dict[str, float]  # every activation item of the stage, bytes
    live: float  # activations live at the stage's activation peak
    working_set: float  # backward working set at that peak
    moment: str  # when that peak is: the end of forward (head) or a layer's backward


def _stage_activations(shape: ModelShape, units_on_stage: set, stage: int, layout: Layout) -> _StageActivations:
    """Activations of one stage at their peak: the end of forward (everything saved, the head's included) or the
    backward of a layer (the head's tensors are freed by then; a checkpointed layer's recomputed set and the
    gradients in flight are live), whichever is larger."""
    mb = layout.micro_batch
    kept = fixed = recompute = transient = 0.0
    for key, unit in shape.units:
        if key not in units_on_stage:
            continue
        if unit.checkpointed:
            kept += unit.checkpoint_input * mb
            # The recomputation saves the layer's input again only as the same tensor the checkpoint holds.
            recompute = max(recompute, (unit.saved - unit.checkpoint_input) * mb + unit.fixed)
        else:
            kept += unit.saved * mb
            fixed += unit.fixed
        transient = max(transient, unit.transient * mb)
    first = shape.first if stage == 0 else Activations()
    last = shape.last if stage == layout.pp - 1 else Activations()
    in_flight = min(layout.pp - stage, layout.grad_accum)
    layers = in_flight * (kept + fixed)
    outer_first = in_flight * (first.saved * mb + first.fixed)
    head = last.saved * mb + last.fixed
    items = {
        "activations: layers (kept)": layers,
        "activations: embeddings, level glue": outer_first,
        "activations: final norm, head, loss": head,
        "activations: recomputed layer": recompute,
    }
    end_of_forward = layers + outer_first + head + last.transient * mb
    layer_backward = layers + outer_first + recompute + transient
    if end_of_forward >= layer_backward:
        return _StageActivations(items, layers + outer_first + head, last.transient * mb, "end of forward")
    return _StageActivations(items, layers + outer_first + recompute, transient, "a layer's backward")


def _estimate_stage(shape: ModelShape, census: ParamCensus, layout: Layout, stage: int) -> MemoryEstimate:
    tp, dp, p = layout.tp, layout.dp, layout.value_bytes
    stage_params = census.on_stage(stage, layout.pp)
    psi = sum(param.per_rank(tp) for param in stage_params)
    zero = layout.zero.resolved() if layout.zero_stage > 0 else layout.zero
    master = STAT_BYTES if (layout.dtype == "bf16" or layout.zero_stage >= 1) else 0
    items: dict[str, float] = {}

    # Model state.
    if layout.zero_stage == 3:
        keep = sum(n for n in (param.per_rank(tp) for param in stage_params) if n <= zero.param_persistence_threshold)
        partitioned = 0.0 if layout.offload_params else p * (psi - keep) / dp
        items["weights (ZeRO-3 partition)"] = partitioned
        items["weights (persistent, unpartitioned)"] = p * keep
    else:
        items["weights"] = p * psi
    grads_sharded = layout.zero_stage >= 2
    grads = p * psi / (dp if grads_sharded else 1)
    if layout.offload_optimizer and grads_sharded:
        grads = 0.0  # ZeRO-Offload keeps the gradient partitions in CPU memory
    items["gradients"] = grads
    optimizer_share = 0.0 if layout.offload_optimizer else psi / (dp if layout.zero_stage >= 1 else 1)
    items["optimizer: fp32 master"] = master * optimizer_share
    items["optimizer: Adam m, v"] = ADAM_MOMENTS * STAT_BYTES * optimizer_share

    # Activations and working sets.
    units_on_stage = set(census.stage_units(layout.pp)[stage])
    acts = _stage_activations(shape, units_on_stage, stage, layout)
    items.update(acts.items)
    buffers: dict[str, float] = {f"temporary: gradients in flight ({acts.moment})": acts.working_set}
    if layout.zero_stage >= 2:
        buffers["temporary: ZeRO reduce bucket"] = p * zero.reduce_bucket_size
    if layout.zero_stage == 3:
        unit_sizes = {}
        for param in stage_params:
            if param.unit is not None:
                unit_sizes[param.unit] = unit_sizes.get(param.unit, 0) + param.per_rank(tp)
        largest = max(unit_sizes.values(), default=0)
        buffers["temporary: ZeRO-3 gathered parameters"] = p * min(zero.max_live_parameters,
                                                                   largest + zero.prefetch_bucket_size)
    if layout.pp > 1:
        boundary = max((unit.boundary for _, unit in shape.units), default=0.0)
        buffers["temporary: pipeline send/receive buffers"] = 2 * p * boundary * layout.micro_batch
    items.update(buffers)

    # The gradient all-reduce after the last backward of a step (ZeRO-2/3 reduce in buckets during backward).
    reduce: dict[str, float] = {}
    if layout.zero_stage == 0:
        from deepspeed.runtime.engine import MEMORY_OPT_ALLREDUCE_SIZE

        reduce["temporary (all-reduce): flattened gradients"] = p * min(psi, MEMORY_OPT_ALLREDUCE_SIZE)
    elif layout.zero_stage == 1:
        reduce["temporary (all-reduce): reduce bucket"] = p * zero.reduce_bucket_size
    items.update(reduce)

    # The optimizer step's float32 temporaries.
    step: dict[str, float] = {}
    if not layout.offload_optimizer:
        if layout.zero_stage == 0:
            largest_param = max((param.per_rank(tp) for param in stage_params), default=0)
            stepped, adam_temps = (psi, 1) if layout.device == "cuda" else (largest_param, 2)
        else:
            stepped = psi / dp if layout.zero_stage < 3 else min(zero.sub_group_size, psi / dp)
            adam_temps = 1 if layout.device == "cuda" else 2
        if layout.dtype == "bf16" and layout.zero_stage >= 1:
            step["temporary (step): fp32 gradient partition"] = STAT_BYTES * stepped
        step["temporary (step): Adam denominator"] = adam_temps * STAT_BYTES * stepped
        if layout.zero_stage in (1, 2):
            step["temporary (step): parameter all-gather bucket"] = p * zero.allgather_bucket_size
    items.update(step)

    params = sum(v for k, v in items.items() if k.startswith("weights"))
    optimizer = items["optimizer: fp32 master"] + items["optimizer: Adam m, v"]
    activations = acts.live
    persistent_grads = layout.grad_accum > 1 or layout.zero_stage == 3
    live = activations + grads if persistent_grads else max(activations, grads)
    state = params + optimizer + grads
    phases = {
        "forward/backward": (params + optimizer + live + sum(buffers.values()), sum(buffers.values())),
        "gradient all-reduce": (state + sum(reduce.values()), sum(reduce.values())),
        "optimizer step": (state + sum(step.values()), sum(step.values())),
    }
    phase = max(phases, key=lambda name: phases[name][0])
    total, temporaries = phases[phase]
    return MemoryEstimate(params=params, grads=grads, optimizer=optimizer, activations=activations,
                          temporaries=temporaries, total=total, peak_phase=phase, stage=stage,
                          params_per_rank=psi, breakdown=items)


def estimate_memory(recipe_name: str, config: Any, layout: Layout, census: ParamCensus | None = None
                    ) -> MemoryEstimate:
    """Predicted peak bytes per GPU of `recipe_name` (its config) trained with `layout`, on the worst rank."""
    shape = model_shape(recipe_name, config, layout)
    census = census if census is not None else census_for(recipe_name, config, shape)
    estimates = [_estimate_stage(shape, census, layout, stage) for stage in range(layout.pp)]
    return max(estimates, key=lambda estimate: estimate.total)
