"""DNAZEN G-gram fusion: add to each token state the states of the G-grams that contain it (v* = v + sum_j m_ij mu_j).

    out[b, n] = h[b, n] + sum over G-grams j of sequence b that contain token n of g[b, j]
    grad_h = grad_out;   grad_g[b, j] = sum over the tokens n of G-gram j of grad_out[b, n]

h [B, N, D] (token states), g [B, M, D] (G-gram states), same floating dtype and device. Sums are unnormalised
and ungated (a token inside k G-grams receives k vectors), accumulated in float32 for half/bfloat16 (float64 for
float64) and returned in h's dtype.

The matching matrix is given sparsely as a `GGramMatching`, built once per batch and reused by every fusion layer:

- from triplets: a LongTensor [K, 3] of (batch b, token n, G-gram j) with 0 <= b < B, 0 <= n < N, 0 <= j < M.
  Duplicates collapse (the matrix is binary: a token in two occurrences of one G-gram receives it once).
  Padding is expressed by absence: padded tokens and padded G-gram rows have no triplets, or pass
  `token_valid` [B, N] / `ggram_valid` [B, M] (True = real) to drop the triplets that touch padding.
  A token (or a G-gram) with no triplet is fine: its output is h (its gradient is zero).
- from a dense matching matrix [B, N, M] (nonzero = match), e.g. what the DNAZEN reference collator builds.

It holds two CSRs over the rows of the flattened [B*N, D] and [B*M, D] states, both sorted so that results are
deterministic: per token row, its G-gram rows ascending (forward); per G-gram row, its token rows ascending
(backward gathers through it, so the gradient needs no atomics). Memory is O(B*N + B*M + K).

Implementations: `ggram_fusion_reference` (sparse, index_select/index_add in pure torch: the oracle),
`ggram_fusion_dense` (the DNAZEN/ZEN formulation, h + bmm(M, g) in float32 over a materialised [B, N, M] matrix:
kept for the benchmark and as a second check), and the csrc kernels behind `ggram_fusion(..., backend=...)`.
On CUDA the G-gram gradient gathers by default (deterministic); `deterministic=False` scatters with float
atomics instead (order-dependent rounding), unless torch.use_deterministic_algorithms is on.
Tolerances of the extension against the float64 reference (tests/test_ops_ggram_fusion.py): float64 1e-12,
float32 1e-5 relative, bfloat16/float16 one rounding of the output (both accumulate in float32).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dnascale.ops.extensions import resolve_backend


class GGramMatching(NamedTuple):
    """The sparse token/G-gram matching of one batch (see the module docstring); all index tensors int64."""

    batch: int  # B
    tokens: int  # N, token positions per sequence
    ggrams: int  # M, G-gram rows per sequence
    token_ptr: torch.Tensor  # [B*N + 1]: entries of token row r are token_ptr[r]:token_ptr[r+1]
    token_row: torch.Tensor  # [K] token row (b*N + n) of each entry, ascending (the CSR's rows, expanded)
    token_ggram: torch.Tensor  # [K] G-gram row (b*M + j) of each entry, ascending within a token row
    ggram_ptr: torch.Tensor  # [B*M + 1]: entries of G-gram row c are ggram_ptr[c]:ggram_ptr[c+1]
    ggram_token: torch.Tensor  # [K] token row of each entry, ascending within a G-gram row

    @property
    def num_matches(self) -> int:
        return int(self.token_ggram.numel())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "GGramMatching":
        return self._replace(**{
            name: getattr(self, name).to(device, non_blocking=non_blocking)
            for name in ("token_ptr", "token_row", "token_ggram", "ggram_ptr", "ggram_token")
        })

    @classmethod
    def from_triplets(
        cls,
        triplets: torch.Tensor,
        batch: int,
        tokens: int,
        ggrams: int,
        *,
        token_valid: torch.Tensor | None = None,
        ggram_valid: torch.Tensor | None = None,
    ) -> "GGramMatching":
        """Build both CSRs from (batch, token, G-gram) triplets [K, 3] (on the triplets' device)."""
        triplets = torch.as_tensor(triplets)
        if triplets.numel() == 0:
            triplets = triplets.reshape(0, 3)
        if triplets.dim() != 2 or triplets.shape[1] != 3 or triplets.is_floating_point():
            raise ValueError(f"G-gram matching: triplets must be an integer [K, 3] tensor; got {tuple(triplets.shape)}")
        triplets = triplets.long()
        b, n, j = triplets.unbind(1)
        for name, values, limit in (("batch", b, batch), ("token", n, tokens), ("G-gram", j, ggrams)):
            if values.numel() and (int(values.min()) < 0 or int(values.max()) >= limit):
                raise ValueError(
                    f"G-gram matching: {name} index out of range [0, {limit}): min {int(values.min())}, "
                    f"max {int(values.max())}"
                )
        keep = None
        if token_valid is not None:
            keep = token_valid.to(triplets.device, torch.bool)[b, n]
        if ggram_valid is not None:
            in_real_ggram = ggram_valid.to(triplets.device, torch.bool)[b, j]
            keep = in_real_ggram if keep is None else keep & in_real_ggram
        if keep is not None:
            b, n, j = b[keep], n[keep], j[keep]
        token_rows, ggram_rows = batch * tokens, batch * ggrams
        tok = b * tokens + n
        gg = b * ggrams + j
        # unique() sorts: entries ordered by token row, then G-gram row; duplicates collapse.
        key = torch.unique(tok * max(ggram_rows, 1) + gg)
        token_row, token_ggram = key // max(ggram_rows, 1), key % max(ggram_rows, 1)
        by_ggram = torch.sort(token_ggram * max(token_rows, 1) + token_row).values
        ggram_row, ggram_token = by_ggram // max(token_rows, 1), by_ggram % max(token_rows, 1)
        return cls(
            batch, tokens, ggrams,
            token_ptr=_row_pointers(token_row, token_rows),
            token_row=token_row,
            token_ggram=token_ggram,
            ggram_ptr=_row_pointers(ggram_row, ggram_rows),
            ggram_token=ggram_token,
        )

    @classmethod
    def from_dense(cls, matrix: torch.Tensor) -> "GGramMatching":
        """From a matching matrix [B, N, M] (any dtype; nonzero = token n lies in G-gram j)."""
        if matrix.dim() != 3:
            raise ValueError(f"G-gram matching: the matching matrix must be [B, N, M]; got {tuple(matrix.shape)}")
        batch, tokens, ggrams = matrix.shape
        return cls.from_triplets(torch.nonzero(matrix), batch, tokens, ggrams)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The matching matrix [B, N, M] (what the dense formulation multiplies by)."""
        matrix = torch.zeros(self.batch * self.tokens, self.ggrams, dtype=dtype, device=self.token_ptr.device)
        matrix[self.token_row, self.token_ggram % self.ggrams] = 1
        return matrix.view(self.batch, self.tokens, self.ggrams)


def _row_pointers(sorted_rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    counts = torch.bincount(sorted_rows, minlength=num_rows)
    ptr = torch.zeros(num_rows + 1, dtype=torch.long, device=sorted_rows.device)
    torch.cumsum(counts, dim=0, out=ptr[1:])
    return ptr


def ggram_fusion_reference(h: torch.Tensor, g: torch.Tensor, matching: GGramMatching) -> torch.Tensor:
    """Sparse pure torch: gather the matched G-gram rows, index_add them onto the token rows (the oracle)."""
    _check(h, g, matching)
    batch, tokens, dim = h.shape
    compute = torch.promote_types(h.dtype, torch.float32)
    flat_h = h.reshape(batch * tokens, dim).to(compute)
    gathered = g.reshape(-1, dim).to(compute).index_select(0, matching.token_ggram)
    out = flat_h.index_add(0, matching.token_row, gathered)
    return out.to(h.dtype).view(batch, tokens, dim)


def ggram_fusion_dense(h: torch.Tensor, g: torch.Tensor, matching: GGramMatching | torch.Tensor) -> torch.Tensor:
    """The DNAZEN/ZEN formulation: h + bmm(M, g) over the dense [B, N, M] matching matrix, in float32 (float64
    for float64 inputs).

    Pass a prebuilt matrix to time only the fusion (DNAZEN's collator builds M per sample on the host)."""
    compute = torch.promote_types(h.dtype, torch.float32)
    matrix = matching.dense(compute) if isinstance(matching, GGramMatching) else matching
    fused = torch.bmm(matrix.to(device=h.device, dtype=compute), g.to(compute))
    return (h.to(compute) + fused).to(h.dtype)


class _GGramFusionFunction(torch.autograd.Function):
    """The csrc kernels (CPU or CUDA, by the tensors' device): gather-sum forward, gather-sum G-gram gradient."""

    @staticmethod
    def forward(ctx, h, g, token_ptr, token_ggram, ggram_ptr, ggram_token, deterministic):
        batch, tokens, dim = h.shape
        ggrams = g.shape[1]
        out = torch.ops.dnascale.ggram_fusion_fwd(
            h.reshape(batch * tokens, dim), g.reshape(batch * ggrams, dim), token_ptr, token_ggram
        )
        ctx.save_for_backward(token_ptr, token_ggram, ggram_ptr, ggram_token)
        ctx.shape = (batch, tokens, ggrams, dim)
        ctx.deterministic = deterministic
        return out.view(batch, tokens, dim)

    @staticmethod
    def backward(ctx, grad_out):
        token_ptr, token_ggram, ggram_ptr, ggram_token = ctx.saved_tensors
        batch, tokens, ggrams, dim = ctx.shape
        grad_g = None
        if ctx.needs_input_grad[1]:
            flat = grad_out.reshape(batch * tokens, dim)
            if ctx.deterministic or grad_out.device.type != "cuda" or torch.are_deterministic_algorithms_enabled():
                grad_g = torch.ops.dnascale.ggram_fusion_grad_g(flat, ggram_ptr, ggram_token, batch * ggrams)
            else:
                grad_g = torch.ops.dnascale.ggram_fusion_grad_g_atomic(flat, token_ptr, token_ggram, batch * ggrams)
            grad_g = grad_g.view(batch, ggrams, dim)
        grad_h = grad_out if ctx.needs_input_grad[0] else None
        return grad_h, grad_g, None, None, None, None, None


def ggram_fusion(
    h: torch.Tensor,
    g: torch.Tensor,
    matching: GGramMatching,
    *,
    backend: str = "auto",
    deterministic: bool = True,
) -> torch.Tensor:
    """out = h + M g with M given sparsely (module docstring); backend per dnascale/ops/extensions.py."""
    _check(h, g, matching)
    if resolve_backend("ggram_fusion", backend, h.device.type) == "reference":
        return ggram_fusion_reference(h, g, matching)
    return _GGramFusionFunction.apply(
        h, g, matching.token_ptr, matching.token_ggram, matching.ggram_ptr, matching.ggram_token, deterministic
    )


def _check(h: torch.Tensor, g: torch.Tensor, matching: GGramMatching) -> None:
    if h.dim() != 3 or g.dim() != 3 or h.shape[0] != g.shape[0] or h.shape[2] != g.shape[2]:
        raise ValueError(f"ggram_fusion: h must be [B, N, D] and g [B, M, D]; got {tuple(h.shape)}, {tuple(g.shape)}")
    if h.dtype != g.dtype or not h.is_floating_point():
        raise ValueError(f"ggram_fusion: h and g must share a floating dtype; got {h.dtype} and {g.dtype}")
    if (matching.batch, matching.tokens, matching.ggrams) != (h.shape[0], h.shape[1], g.shape[1]):
        raise ValueError(
            f"ggram_fusion: the matching was built for (B, N, M) = {(matching.batch, matching.tokens, matching.ggrams)}"
            f" but h, g give {(h.shape[0], h.shape[1], g.shape[1])}"
        )
    if matching.token_ptr.device != h.device:
        raise ValueError(f"ggram_fusion: the matching is on {matching.token_ptr.device}, h on {h.device} (use .to())")
