"""Count the bytes autograd keeps for backward while a function runs: the oracle for the activation formulas.

`saved_bytes(fn, exclude=module.parameters())` runs `fn()` under `torch.autograd.graph.saved_tensors_hooks` and
sums the storage of every tensor saved for backward, once per storage (views of one buffer, e.g. q, k and v
sliced from a fused QKV output, keep that whole buffer alive and are counted once), leaving out the storages of
`exclude` (weights are model state, not activations).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch


def saved_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, Any]:
    """(bytes of the distinct storages saved for backward by `fn()`, what `fn()` returned)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    return sum(storages.values()), result
