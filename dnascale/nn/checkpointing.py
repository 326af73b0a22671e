"""Activation checkpointing that replays every random stream, on CPU and on GPU.

torch.utils.checkpoint restores the default CPU/CUDA generators before recomputing, but not megatron's tracker
streams (attention dropout draws from the per-TP-rank stream); without them the recomputed dropout masks would
differ from the forward ones and the gradients would be wrong. megatron's own `tensor_parallel.checkpoint`
handles the tracker but reads CUDA generator states unconditionally, so it fails on CPU. Here the tracker
snapshot taken at forward time is swapped in for the recomputation through torch's `context_fn` hook.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch.utils.checkpoint
from megatron.core import tensor_parallel


def _tracker_replay_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    tracker = tensor_parallel.get_cuda_rng_tracker()
    at_forward = dict(tracker.get_states())  # states are replaced on use, never mutated: a shallow copy suffices

    @contextlib.contextmanager
    def replay() -> Iterator[None]:
        now = dict(tracker.get_states())
        tracker.set_states(dict(at_forward))
        try:
            yield
        finally:
            tracker.set_states(now)

    return contextlib.nullcontext(), replay()


def checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run `function(*args, **kwargs)` without keeping its activations; recompute them in backward."""
    return torch.utils.checkpoint.checkpoint(
        function, *args, use_reentrant=False, preserve_rng_state=True, context_fn=_tracker_replay_contexts, **kwargs
    )
