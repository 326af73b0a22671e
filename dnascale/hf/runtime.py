"""The process state the wrapped dnascale modules need outside a training job.

dnascale's layers are megatron-core tensor-parallel layers: even at TP=1 they look up megatron's tensor-parallel
group (an embedding asks its group's size, the MLM loss all-reduces over it). A plain `AutoModel.from_pretrained`
in a notebook has no such group, so the first HF model built starts a world of one (a gloo process group on a
free local port, megatron groups at tp=1) through dnascale.parallel, exactly as a single-process training run
does. The caller's random streams are left as they were: loading a model must not reseed anyone's RNG.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core import parallel_state

from dnascale.errors import ConfigError


def ensure_single_process_groups() -> None:
    if parallel_state.model_parallel_is_initialized():
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if tp != 1:
            raise ConfigError(f"the HF classes run at tensor-parallel size 1, but this process has tp={tp}")
        return
    from dnascale.parallel import init_distributed

    saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
    # Not under the meta device that from_pretrained may have entered: the groups hold real (CPU) tensors.
    with torch.device("cpu"):
        init_distributed(tp=1, seed=0)
    torch.set_rng_state(saved[0])
    random.setstate(saved[1])
    np.random.set_state(saved[2])
