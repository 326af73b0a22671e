"""Dispatch into flash-attn (CUDA only, fp16/bf16), with key padding handled by unpadding to varlen form.

flash-attn is an optional dependency (`pip install dnascale[gpu]`); `flash_attn_unavailable()` says why it
cannot be used here, and nothing in this module imports flash_attn until a call needs it.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F


@functools.cache
def flash_attn_unavailable() -> str | None:
    """None when flash-attn can run here, otherwise the reason."""
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn not installed (pip install flash-attn, CUDA machines only)"
    if not torch.cuda.is_available():
        return "flash-attn needs CUDA and none is available"
    return None


def _unpad(x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """[B, T, H, D] + keep [B, T] -> (packed [N, H, D], flat indices, cu_seqlens int32 [B+1], max length)."""
    lengths = keep.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    packed = x.reshape(-1, *x.shape[2:]).index_select(0, indices)
    return packed, indices, cu_seqlens, int(lengths.max().item())


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding: torch.Tensor | None,
    query_padding: torch.Tensor | None,
    causal: bool,
    window: int | None,
    alibi_slopes: torch.Tensor | None,
    scale: float,
    dropout_p: float,
) -> torch.Tensor:
    """Attention over q, k, v laid out [B, H, T, D]; returns [B, H, Tq, D].

    Padded sequences must keep their real tokens contiguous (right or left padding): flash-attn measures window
    and ALiBi distances inside the packed sequence. Outputs at padded query rows are zero.
    """
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    batch, _, tq, _ = q.shape
    tk = k.shape[2]
    # flash-attn wants [B, T, H, D]; window_size=(-1, -1) means unlimited on that side.
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    left = -1 if window is None else window
    right = 0 if causal else (-1 if window is None else window)
    slopes = None if alibi_slopes is None else alibi_slopes.to(torch.float32)
    common = dict(
        dropout_p=dropout_p, softmax_scale=scale, causal=causal, window_size=(left, right), alibi_slopes=slopes
    )
    if key_padding is None and query_padding is None:
        return flash_attn_func(qt, kt, vt, **common).transpose(1, 2)

    kv_keep = key_padding if key_padding is not None else torch.ones(batch, tk, dtype=torch.bool, device=q.device)
    q_keep = query_padding if query_padding is not None else torch.ones(batch, tq, dtype=torch.bool, device=q.device)
    q_packed, q_index, cu_q, max_q = _unpad(qt, q_keep)
    k_packed, _, cu_k, max_k = _unpad(kt, kv_keep)
    v_packed, _, _, _ = _unpad(vt, kv_keep)
    out_packed = flash_attn_varlen_func(
        q_packed, k_packed, v_packed, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
        max_seqlen_k=max_k, **common,
    )
    out = out_packed.new_zeros(batch * tq, *out_packed.shape[1:]).index_copy(0, q_index, out_packed)
    return out.view(batch, tq, *out_packed.shape[1:]).transpose(1, 2)
