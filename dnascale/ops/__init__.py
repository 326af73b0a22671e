"""Python faces of the compute kernels.

Each op has a pure-torch reference (the test oracle) and dispatches to an optimised implementation when one is
available and the device fits: the csrc/ extensions (routing boundary, G-gram fusion; CPU and CUDA, JIT-built
with a cache, see `dnascale/ops/extensions.py`), flash-attn, and mamba-ssm as it lands. Model code never imports
the optional kernels itself: it goes through these modules, which report availability instead of failing at
import time on machines without them. `DNASCALE_OPS_BACKEND=reference` makes every "auto" choice the reference.
"""

from dnascale.ops.ggram_fusion import GGramMatching, ggram_fusion
from dnascale.ops.routing_boundary import BoundaryOutput, routing_boundary

__all__ = ["BoundaryOutput", "GGramMatching", "ggram_fusion", "routing_boundary"]
