"""Core attention `(q, k, v, mask) -> out` and the one place where its backend is chosen.

Shapes: q [B, H, Tq, D], k and v [B, H, Tk, D] (H = the heads this TP rank holds); the output is [B, H, Tq, D].
Semantics shared by every backend, with query i and key j counted from 0 in the padded layout:

    out = softmax(scale * q k^T + additive) v     over the keys j that the mask allows,

- `key_padding[b, j]` False hides key j of sequence b;
- `causal` hides j > i;
- `window = r` hides |i - j| > r (a bidirectional local window; with `causal` it keeps i - r <= j <= i);
- `alibi_slopes[h]` adds -slope_h * |i - j| (ALiBi, bidirectional form);
- `bias` adds an arbitrary tensor broadcastable to [B, H, Tq, Tk] (e.g. T5 relative-position buckets);
- `offset_bias[h, j - i + window]` adds a bias that depends only on the offset (a relative-position table
  cut to the window; needs `window`), without materialising [Tq, Tk];
- `global_keys` says that the last G keys are block summaries (LongT5 transient-global): they obey only their
  own rules (`GlobalKeys`), while causal/window/key_padding/ALiBi/offset_bias apply to the Tk - G sequence keys.

A query that sees no key gets an all-zero output row. Outputs at padded query rows are unspecified (backends
that unpad return zeros there): losses must ignore them.

Backends ("auto" picks the first that can serve the call, by device, in `AUTO_ORDER`):
- `reference`: explicit float math, materialises the scores; the oracle the tests compare every other backend to;
- `sdpa`: torch.nn.functional.scaled_dot_product_attention with a materialised boolean/additive mask;
- `flex`: torch FlexAttention with block masks (compiled and block-sparse on CUDA). On CPU torch runs it eagerly
  and unfused and has no backward, so there it only serves inference when asked for by name;
- `flash`: flash-attn (CUDA, fp16/bf16; padding by unpadding; native causal, window and ALiBi; no bias tensor);
- `blocked`: pure-torch local attention by query blocks (`dnascale.nn.local_attention`): memory linear in the
  length, with autograd on CPU. It needs a window; "auto" picks it only for calls that carry an offset bias or
  global keys (ENBED's attention), so plain windowed calls keep their previous backend unless it is named.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from dnascale.errors import ConfigError
from dnascale.nn import local_attention
from dnascale.nn.local_attention import GlobalKeys
from dnascale.ops.flash_attention import flash_attention, flash_attn_unavailable


@dataclass(frozen=True)
class MaskSpec:
    """What each query may see and what is added to its scores (see the module docstring)."""

    key_padding: torch.Tensor | None = None  # [B, Tk] bool, True = real key
    query_padding: torch.Tensor | None = None  # [B, Tq] bool, True = real query (lets backends skip padding)
    causal: bool = False
    window: int | None = None
    alibi_slopes: torch.Tensor | None = None  # [H] float, this rank's heads
    bias: torch.Tensor | None = None  # additive, broadcastable to [B, H, Tq, Tk]
    offset_bias: torch.Tensor | None = None  # [H, 2 * window + 1]: added at offset j - i (sequence keys only)
    global_keys: GlobalKeys | None = None  # the last G keys are block summaries

    def __post_init__(self) -> None:
        if self.offset_bias is not None and self.window is None:
            raise ValueError("MaskSpec.offset_bias needs a window (it holds the offsets -window..window)")

    @property
    def num_global(self) -> int:
        return 0 if self.global_keys is None else self.global_keys.count

    def features(self) -> frozenset[str]:
        present = {
            "padding": self.key_padding is not None,
            "causal": self.causal,
            "window": self.window is not None,
            "alibi": self.alibi_slopes is not None,
            "bias": self.bias is not None,
            "offset_bias": self.offset_bias is not None,
            "global": self.global_keys is not None,
        }
        return frozenset(name for name, on in present.items() if on)

    def allowed(self, tq: int, tk: int, device: torch.device) -> torch.Tensor | None:
        """Boolean visibility [B or 1, 1, Tq, Tk], or None when every key is visible to every query."""
        if self.global_keys is None:
            return self._sequence_allowed(tq, tk, device)
        ts = tk - self.num_global
        sequence = self._sequence_allowed(tq, ts, device)
        if sequence is None:
            sequence = torch.ones(1, 1, tq, ts, dtype=torch.bool, device=device)
        return _cat_keys(sequence, self.global_keys.allowed(tq, self.causal, device))

    def additive(self, tq: int, tk: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """ALiBi + offset bias + global bias + bias as one float tensor broadcastable to [B, H, Tq, Tk], or None."""
        if self.global_keys is None:
            total = self._sequence_additive(tq, tk, dtype, device)
        else:
            ts = tk - self.num_global
            sequence = self._sequence_additive(tq, ts, dtype, device)
            summaries = self.global_keys.additive(dtype, device)
            total = None
            if sequence is not None or summaries is not None:
                if sequence is None:
                    sequence = torch.zeros(1, 1, tq, ts, dtype=dtype, device=device)
                if summaries is None:
                    summaries = torch.zeros(1, 1, tq, self.num_global, dtype=dtype, device=device)
                total = _cat_keys(sequence, summaries)
        if self.bias is not None:
            bias = self.bias.to(device=device, dtype=dtype)
            total = bias if total is None else total + bias
        return total

    def _sequence_allowed(self, tq: int, tk: int, device: torch.device) -> torch.Tensor | None:
        visible = None
        if self.causal or self.window is not None:
            offset = _offsets(tq, tk, device)  # i - j
            visible = torch.ones(tq, tk, dtype=torch.bool, device=device)
            if self.causal:
                visible &= offset >= 0
            if self.window is not None:
                visible &= offset.abs() <= self.window
            visible = visible[None, None]
        if self.key_padding is not None:
            keys = self.key_padding[:, None, None, :].to(device=device, dtype=torch.bool)
            visible = keys if visible is None else visible & keys
        return visible

    def _sequence_additive(self, tq: int, tk: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        total = None
        if self.alibi_slopes is not None:
            distance = _offsets(tq, tk, device).abs().to(dtype)
            total = -self.alibi_slopes.to(device=device, dtype=dtype)[None, :, None, None] * distance
        if self.offset_bias is not None:
            # Offsets outside the window are hidden by `allowed`; clamping only keeps the gather in range.
            index = (self.window - _offsets(tq, tk, device)).clamp(0, 2 * self.window)
            table = self.offset_bias.to(device=device, dtype=dtype)[:, index][None]
            total = table if total is None else total + table
        return total


def _offsets(tq: int, tk: int, device: torch.device) -> torch.Tensor:
    """i - j for every (query i, key j)."""
    return torch.arange(tq, device=device)[:, None] - torch.arange(tk, device=device)[None, :]


def _cat_keys(sequence: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
    """Sequence keys then global keys along the last dim, broadcasting the leading dims."""
    lead = torch.broadcast_shapes(sequence.shape[:-1], summaries.shape[:-1])
    return torch.cat([sequence.expand(*lead, -1), summaries.expand(*lead, -1)], dim=-1)


@dataclass(frozen=True)
class AttentionRequest:
    """What a call needs from a backend; backends accept or refuse it with a reason."""

    device_type: str
    dtype: torch.dtype
    needs_grad: bool
    features: frozenset[str]
    dropout: bool
    same_length: bool
    head_dim: int

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskSpec, dropout_p: float):
        return cls(
            device_type=q.device.type,
            dtype=q.dtype,
            needs_grad=torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
            features=mask.features(),
            dropout=dropout_p > 0.0,
            same_length=q.shape[-2] == k.shape[-2] - mask.num_global,  # global keys are not sequence positions
            head_dim=q.shape[-1],
        )


class CoreAttentionBackend(ABC):
    name: ClassVar[str]

    def unavailable(self) -> str | None:
        """Why this backend cannot run in this installation at all (None: it can)."""
        return None

    def unsupported(self, request: AttentionRequest) -> str | None:
        """Why this backend cannot serve this particular call (None: it can)."""
        return None

    def volunteers(self, request: AttentionRequest) -> bool:
        """Whether "auto" may pick this backend for the call (it must also support it)."""
        return True

    @abstractmethod
    def __call__(self, q, k, v, mask: MaskSpec, scale: float, dropout_p: float) -> torch.Tensor: ...


class ReferenceAttention(CoreAttentionBackend):
    name = "reference"

    def __call__(self, q, k, v, mask, scale, dropout_p):
        compute = torch.promote_types(q.dtype, torch.float32)
        qf, kf, vf = (t.to(compute) for t in (q, k, v))
        tq, tk = q.shape[-2], k.shape[-2]
        scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
        additive = mask.additive(tq, tk, compute, q.device)
        if additive is not None:
            scores = scores + additive
        visible = mask.allowed(tq, tk, q.device)
        if visible is None:
            probs = torch.softmax(scores, dim=-1)
        else:
            # Rows with no visible key would be softmax(-inf...) = NaN: give them finite scores, then zero them.
            row_sees_something = visible.any(dim=-1, keepdim=True)
            scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~row_sees_something, 0.0)
            probs = torch.softmax(scores, dim=-1) * row_sees_something
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p)
        return torch.matmul(probs, vf).to(q.dtype)


class SdpaAttention(CoreAttentionBackend):
    name = "sdpa"

    def __call__(self, q, k, v, mask, scale, dropout_p):
        if mask.features() == {"causal"}:
            # Top-left aligned, like our convention; lets torch pick its fused causal kernels.
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
        tq, tk = q.shape[-2], k.shape[-2]
        visible = mask.allowed(tq, tk, q.device)
        additive = mask.additive(tq, tk, q.dtype, q.device)
        if additive is None:
            attn_mask = visible
        elif visible is None:
            attn_mask = additive
        else:
            attn_mask = additive.masked_fill(~visible, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


class FlexAttention(CoreAttentionBackend):
    name = "flex"

    def unsupported(self, request):
        if request.device_type == "cpu" and request.needs_grad:
            return "torch FlexAttention has no backward pass on CPU (use 'sdpa' or 'auto' to train on CPU)"
        if request.dropout:
            return "FlexAttention has no attention-probability dropout"
        return None

    def __call__(self, q, k, v, mask, scale, dropout_p):
        from torch.nn.attention.flex_attention import flex_attention

        if q.device.type == "cpu" and not torch.is_grad_enabled():
            # torch refuses CPU inputs that merely carry requires_grad, even under no_grad.
            q, k, v = q.detach(), k.detach(), v.detach()
        batch, heads, tq, _ = q.shape
        tk = k.shape[-2]
        run = _compiled_flex() if q.device.type == "cuda" else flex_attention
        if mask.offset_bias is not None or mask.global_keys is not None:  # ENBED's local + global attention
            mask_mod, score_mod = local_attention.flex_mods(mask, batch, tq, tk, q.dtype, q.device)
            block_mask = _BLOCK_MASKS.get(mask_mod, mask, batch, tq, tk, q.device)
            return run(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
        mask_mod = _flex_mask_mod(mask)
        block_mask = None
        if mask_mod is not None:
            per_batch = batch if mask.key_padding is not None else 1
            block_mask = _BLOCK_MASKS.get(mask_mod, mask, per_batch, tq, tk, q.device)
        score_mod = _flex_score_mod(mask, (batch, heads, tq, tk), q.dtype, q.device)
        return run(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


class _BlockMaskCache:
    """FlexAttention block masks, built once per distinct mask instead of once per layer.

    A block mask depends only on what the mask_mod reads: the lengths, causal, window, the global-key layout and
    the padding tensors. Every layer of a stack passes the same padding tensors (and ENBED's blocks are built once
    per forward), so keying on those tensors' identity finds the mask the first layer built, also for the
    recomputation under activation checkpointing; the entry holds the tensors, so their ids cannot be reused
    while it lives. Per-layer tables (relative-position and global biases) live in the score_mod, not here.
    Building one on CUDA is not free: eager `create_block_mask` evaluates the mask_mod on the whole
    [B, Tq, Tk] grid (gigabytes of int64 temporaries at 16k), so on CUDA it is compiled (torch's advice for long
    sequences), and either way it runs once per mask rather than once per layer.
    """

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self._entries: list[tuple[tuple, tuple, object]] = []  # (scalars, tensors, block mask), newest last

    @staticmethod
    def _key(mask: MaskSpec, batch: int, tq: int, tk: int, device: torch.device) -> tuple[tuple, tuple]:
        keys = mask.global_keys
        scalars = (batch, tq, tk, str(device), mask.causal, mask.window, mask.num_global,
                   keys.block if keys is not None else None)
        tensors = (mask.key_padding, keys.valid if keys is not None else None)
        return scalars, tensors

    def get(self, mask_mod, mask: MaskSpec, batch: int, tq: int, tk: int, device: torch.device):
        scalars, tensors = self._key(mask, batch, tq, tk, device)
        for index, (cached_scalars, cached_tensors, block_mask) in enumerate(self._entries):
            if cached_scalars == scalars and all(a is b for a, b in zip(cached_tensors, tensors)):
                self._entries.append(self._entries.pop(index))
                return block_mask
        build = _compiled_create_block_mask() if device.type == "cuda" else _create_block_mask
        block_mask = build(mask_mod, B=batch, H=None, Q_LEN=tq, KV_LEN=tk, device=device)
        self._entries.append((scalars, tensors, block_mask))
        del self._entries[:-self.capacity]
        return block_mask

    def clear(self) -> None:
        self._entries.clear()


def _create_block_mask(*args, **kwargs):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(*args, **kwargs)


@functools.cache
def _compiled_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


_BLOCK_MASKS = _BlockMaskCache()


def _flex_mask_mod(mask: MaskSpec):
    if not (mask.causal or mask.window is not None or mask.key_padding is not None):
        return None
    causal, window, keys = mask.causal, mask.window, mask.key_padding

    def mask_mod(b, h, q_idx, kv_idx):
        keep = q_idx >= 0  # an all-True tensor of the right kind to AND onto
        if causal:
            keep = keep & (q_idx >= kv_idx)
        if window is not None:
            keep = keep & ((q_idx - kv_idx).abs() <= window)
        if keys is not None:
            keep = keep & keys[b, kv_idx]
        return keep

    return mask_mod


def _flex_score_mod(mask: MaskSpec, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device):
    if mask.alibi_slopes is None and mask.bias is None:
        return None
    slopes = None if mask.alibi_slopes is None else mask.alibi_slopes.to(device=device, dtype=dtype)
    bias = None if mask.bias is None else mask.bias.to(device=device, dtype=dtype).expand(shape)

    def score_mod(score, b, h, q_idx, kv_idx):
        if slopes is not None:
            score = score - slopes[h] * (q_idx - kv_idx).abs()
        if bias is not None:
            score = score + bias[b, h, q_idx, kv_idx]
        return score

    return score_mod


class FlashAttention(CoreAttentionBackend):
    name = "flash"

    def unavailable(self):
        return flash_attn_unavailable()

    def unsupported(self, request):
        if request.device_type != "cuda":
            return "flash-attn runs on CUDA tensors only"
        if request.dtype not in (torch.float16, torch.bfloat16):
            return f"flash-attn needs float16/bfloat16, got {request.dtype}"
        if "bias" in request.features:
            return "flash-attn takes no additive bias tensor (ALiBi slopes are fine)"
        if request.features & {"offset_bias", "global"}:
            return "flash-attn has no relative-position table or global keys (window and ALiBi are fine)"
        if "causal" in request.features and not request.same_length:
            return "flash-attn aligns causal masks bottom-right; ours are top-left, so Tq must equal Tk"
        if request.head_dim > 256:
            return f"flash-attn supports head_dim <= 256, got {request.head_dim}"
        return None

    def __call__(self, q, k, v, mask, scale, dropout_p):
        return flash_attention(
            q, k, v, key_padding=mask.key_padding, query_padding=mask.query_padding, causal=mask.causal,
            window=mask.window, alibi_slopes=mask.alibi_slopes, scale=scale, dropout_p=dropout_p,
        )


class BlockedAttention(CoreAttentionBackend):
    name = "blocked"

    def unsupported(self, request):
        if "window" not in request.features:
            return "blocked attention needs a local window (MaskSpec.window)"
        if "bias" in request.features:
            return "blocked attention takes no dense bias tensor (use offset_bias for relative positions)"
        if request.dropout:
            return "blocked attention has no attention-probability dropout"
        if not request.same_length:
            return "blocked attention needs as many queries as sequence keys (self-attention)"
        return None

    def volunteers(self, request):
        # Only for ENBED-style calls: plain windowed calls keep the backend "auto" gave them before.
        return bool(request.features & {"offset_bias", "global"})

    def __call__(self, q, k, v, mask, scale, dropout_p):
        return local_attention.blocked_attention(q, k, v, mask, scale)


BACKENDS: dict[str, CoreAttentionBackend] = {
    backend.name: backend
    for backend in (ReferenceAttention(), SdpaAttention(), FlexAttention(), FlashAttention(), BlockedAttention())
}
# "auto" tries these in order. On CPU flex is left out: eager FlexAttention materialises the scores like sdpa
# does, but without a backward pass. `blocked` volunteers only for calls with an offset bias or global keys.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("flash", "flex", "blocked", "sdpa", "reference"),
    "cpu": ("blocked", "sdpa", "reference"),
}
BACKEND_CHOICES: tuple[str, ...] = ("auto", *BACKENDS)


def check_backend(name: str) -> None:
    """Fail early (at config/build time) on a name we do not know or a backend this installation lacks."""
    if name == "auto":
        return
    if name not in BACKENDS:
        raise ConfigError(f"attention_backend={name!r} is unknown; choose one of {list(BACKEND_CHOICES)}")
    reason = BACKENDS[name].unavailable()
    if reason:
        raise ConfigError(f"attention_backend={name!r} cannot be used: {reason}")


def resolve_backend(name: str, request: AttentionRequest) -> CoreAttentionBackend:
    """The backend that serves `request`: the named one (or a ConfigError why not), or auto's first fit."""
    if name != "auto":
        check_backend(name)
        backend = BACKENDS[name]
        reason = backend.unsupported(request)
        if reason:
            raise ConfigError(f"attention_backend={name!r} cannot serve this call: {reason}")
        return backend
    for candidate in AUTO_ORDER.get(request.device_type, ("reference",)):
        backend = BACKENDS[candidate]
        if backend.unavailable() is None and backend.unsupported(request) is None and backend.volunteers(request):
            return backend
    return BACKENDS["reference"]


def core_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: MaskSpec | None = None,
    *,
    backend: str = "auto",
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(scale * q k^T + bias | mask) v with the chosen backend; scale defaults to 1/sqrt(head_dim)."""
    mask = mask if mask is not None else MaskSpec()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    impl = resolve_backend(backend, AttentionRequest.of(q, k, v, mask, dropout_p))
    return impl(q, k, v, mask, scale, dropout_p)
