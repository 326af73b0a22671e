"""Bytes each GPU sends per optimizer step, by parallelism, with ring collectives over n ranks:
all-reduce of M bytes sends 2 (n-1)/n M per rank; reduce-scatter and all-gather send (n-1)/n M each.

- TP (megatron, no sequence parallelism): per unit and micro-batch, one all-reduce of [tokens, hidden] per
  row-parallel output in forward (attention out, MLP out: 2 per Transformer block) and one per column-parallel
  input gradient in backward (QKV, MLP up, + the gate of a gated MLP), counted from each family's structure;
  checkpointed units repeat their forward all-reduces in the recomputation. Embedding and head add theirs.
- DP / ZeRO over dp ranks, Psi parameters per rank (gradients communicated in the weights' dtype):
  stage 0: gradient all-reduce once per step (2 Psi);  stage 1: reduce-scatter + all-gather of the updated
  weights once per step (2 Psi);  stage 2: gradient reduce-scatter every micro-batch + one all-gather;
  stage 3: every micro-batch all-gathers the weights for forward and again for backward and reduce-scatters the
  gradients (3 Psi per micro-batch; parameters under the persistence threshold are not gathered).
- PP: point-to-point activations forward and their gradients backward at each stage boundary, per micro-batch
  (an inner stage sends both, an end stage one of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dnascale.scaling.families import model_shape
from dnascale.scaling.layout import Layout
from dnascale.scaling.memory import census_for
from dnascale.scaling.param_census import ParamCensus


@dataclass(frozen=True)
class CommVolume:
    """Bytes sent per GPU per optimizer step (worst rank of each kind)."""

    tp: float
    dp: float
    pp: float
    breakdown: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.tp + self.dp + self.pp


def _ring(n: int) -> float:
    return (n - 1) / n if n > 1 else 0.0


def estimate_communication(recipe_name: str, config: Any, layout: Layout, census: ParamCensus | None = None
                           ) -> CommVolume:
    shape = model_shape(recipe_name, config, layout)
    census = census if census is not None else census_for(recipe_name, config, shape)
    p, mb, steps = layout.value_bytes, layout.micro_batch, layout.grad_accum
    zero = layout.zero.resolved() if layout.zero_stage == 3 else layout.zero
    tp_worst = dp_worst = 0.0
    for stage in range(layout.pp):
        units = set(census.stage_units(layout.pp)[stage])
        elements = 0.0
        for key, unit in shape.units:
            if key in units:
                elements += unit.tp_forward * (2 if unit.checkpointed else 1) + unit.tp_backward
        if stage == 0:
            elements += shape.first.tp_forward + shape.first.tp_backward
        if stage == layout.pp - 1:
            elements += shape.last.tp_forward + shape.last.tp_backward
        tp_worst = max(tp_worst, steps * mb * elements * p * 2 * _ring(layout.tp))

        params = census.on_stage(stage, layout.pp)
        psi = sum(param.per_rank(layout.tp) for param in params)
        ring = _ring(layout.dp)
        if layout.zero_stage <= 1:
            dp = 2 * ring * psi * p  # stage 0: one all-reduce; stage 1: reduce-scatter + all-gather
        elif layout.zero_stage == 2:
            dp = (steps + 1) * ring * psi * p
        else:
            gathered = sum(n for n in (param.per_rank(layout.tp) for param in params)
                           if n > zero.param_persistence_threshold)
            dp = steps * ring * (2 * gathered + psi) * p
        dp_worst = max(dp_worst, dp)

    pp = 0.0
    if layout.pp > 1:
        boundary = max((unit.boundary for _, unit in shape.units), default=0.0)
        directions = 2 if layout.pp > 2 else 1
        pp = steps * mb * boundary * p * directions
    return CommVolume(tp=tp_worst, dp=dp_worst, pp=pp,
                      breakdown={"tensor parallel": tp_worst, "data parallel / ZeRO": dp_worst, "pipeline": pp})
