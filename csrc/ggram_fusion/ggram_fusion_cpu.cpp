// DNAZEN G-gram fusion, CPU kernel: a CSR segment gather-sum, parallel over output rows.
//
//   ggram_fusion_fwd:    out[r]  = h[r] + sum_{e in token_ptr[r] .. token_ptr[r+1]} g[token_ggram[e]]
//   ggram_fusion_grad_g: dg[c]   =        sum_{e in ggram_ptr[c] .. ggram_ptr[c+1]} dout[ggram_token[e]]
//
// Both are the same primitive (rows of `src` gathered through a CSR and summed onto an optional `base` row), so
// one template serves both. Every output row is written by exactly one thread, in CSR order: the result is
// deterministic and needs no atomics. Sums accumulate in at::opmath_type (float for half/bfloat16). Memory is
// O(rows x D + matches): no [tokens x G-grams] matrix is formed. The CSR comes from GGramMatching
// (dnascale/ops/ggram_fusion.py), which validates indices; this kernel trusts them.
//
// The op schemas live in dnascale/ops/extensions.py; this translation unit registers the CPU implementations.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

namespace dnascale {
namespace {

// Output rows are processed in column blocks of kBlock values held in registers: the base row and every gathered
// source row are read once and the accumulator never round-trips through memory. 16 is deliberate: GCC peels
// loops of up to 16 iterations completely (so `acc` lives in registers, 4 SSE registers for float); at 32 it keeps
// the loop and the accumulator in memory, which measured 2-4x slower.
constexpr int64_t kBlock = 16;

template <typename scalar_t, typename acc_t, int64_t W>
inline void gather_block(const scalar_t* base, const scalar_t* src, const int64_t* idx, int64_t e0, int64_t e1,
                         scalar_t* out, int64_t D) {
  acc_t acc[W];
  if (base != nullptr) {
    for (int64_t d = 0; d < W; ++d) acc[d] = static_cast<acc_t>(base[d]);
  } else {
    for (int64_t d = 0; d < W; ++d) acc[d] = acc_t(0);
  }
  for (int64_t e = e0; e < e1; ++e) {
    const scalar_t* s = src + idx[e] * D;
    for (int64_t d = 0; d < W; ++d) acc[d] += static_cast<acc_t>(s[d]);
  }
  for (int64_t d = 0; d < W; ++d) out[d] = static_cast<scalar_t>(acc[d]);
}

template <typename scalar_t>
void gather_sum(const scalar_t* base, const scalar_t* src, const int64_t* ptr, const int64_t* idx, scalar_t* out,
                int64_t rows, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t e0 = ptr[r], e1 = ptr[r + 1];
      scalar_t* o = out + r * D;
      const scalar_t* b = base == nullptr ? nullptr : base + r * D;
      if (e0 == e1) {  // no match: a copy (or zeros)
        if (b != nullptr) {
          std::copy(b, b + D, o);
        } else {
          std::fill(o, o + D, scalar_t(0));
        }
        continue;
      }
      int64_t d = 0;
      for (; d + kBlock <= D; d += kBlock) {
        gather_block<scalar_t, acc_t, kBlock>(b == nullptr ? nullptr : b + d, src + d, idx, e0, e1, o + d, D);
      }
      for (; d < D; ++d) {  // tail, one column at a time
        acc_t acc = b == nullptr ? acc_t(0) : static_cast<acc_t>(b[d]);
        for (int64_t e = e0; e < e1; ++e) acc += static_cast<acc_t>(src[idx[e] * D + d]);
        o[d] = static_cast<scalar_t>(acc);
      }
    }
  });
}

void check_csr(const at::Tensor& ptr, const at::Tensor& idx, int64_t rows, const char* what) {
  TORCH_CHECK(ptr.dim() == 1 && ptr.size(0) == rows + 1 && ptr.scalar_type() == at::kLong,
              "ggram_fusion: ", what, " pointer must be int64 [", rows + 1, "], got ", ptr.scalar_type(), " ",
              ptr.sizes());
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong, "ggram_fusion: ", what, " indices must be int64 [K]");
  TORCH_CHECK(ptr.device().is_cpu() && idx.device().is_cpu(), "ggram_fusion (CPU kernel): CSR must be on CPU");
}

// h [R, D], g [C, D] (flattened over the batch), token_ptr [R + 1], token_ggram [K] (rows of g).
at::Tensor ggram_fusion_fwd_cpu(const at::Tensor& h_in, const at::Tensor& g_in, const at::Tensor& token_ptr,
                                const at::Tensor& token_ggram) {
  TORCH_CHECK(h_in.dim() == 2 && g_in.dim() == 2 && h_in.size(1) == g_in.size(1),
              "ggram_fusion: h must be [R, D] and g [C, D], got ", h_in.sizes(), " and ", g_in.sizes());
  TORCH_CHECK(h_in.scalar_type() == g_in.scalar_type(), "ggram_fusion: h and g differ in dtype");
  TORCH_CHECK(h_in.device().is_cpu() && g_in.device().is_cpu(), "ggram_fusion (CPU kernel): tensors must be on CPU");
  check_csr(token_ptr, token_ggram, h_in.size(0), "token");
  const at::Tensor h = h_in.contiguous(), g = g_in.contiguous();
  const at::Tensor ptr = token_ptr.contiguous(), idx = token_ggram.contiguous();
  at::Tensor out = at::empty_like(h);
  if (h.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "ggram_fusion_fwd_cpu", [&] {
    gather_sum<scalar_t>(h.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), ptr.data_ptr<int64_t>(),
                         idx.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), h.size(0), h.size(1));
  });
  return out;
}

// grad_out [R, D], ggram_ptr [C + 1], ggram_token [K] (rows of grad_out) -> grad_g [C, D].
at::Tensor ggram_fusion_grad_g_cpu(const at::Tensor& grad_out_in, const at::Tensor& ggram_ptr,
                                   const at::Tensor& ggram_token, int64_t num_ggram_rows) {
  TORCH_CHECK(grad_out_in.dim() == 2, "ggram_fusion: grad_out must be [R, D], got ", grad_out_in.sizes());
  TORCH_CHECK(grad_out_in.device().is_cpu(), "ggram_fusion (CPU kernel): tensors must be on CPU");
  check_csr(ggram_ptr, ggram_token, num_ggram_rows, "G-gram");
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor ptr = ggram_ptr.contiguous(), idx = ggram_token.contiguous();
  at::Tensor grad_g = at::empty({num_ggram_rows, grad_out.size(1)}, grad_out.options());
  if (grad_g.numel() == 0) return grad_g;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "ggram_fusion_grad_g_cpu", [&] {
    gather_sum<scalar_t>(nullptr, grad_out.data_ptr<scalar_t>(), ptr.data_ptr<int64_t>(), idx.data_ptr<int64_t>(),
                         grad_g.data_ptr<scalar_t>(), num_ggram_rows, grad_out.size(1));
  });
  return grad_g;
}

}  // namespace

TORCH_LIBRARY_IMPL(dnascale, CPU, m) {
  m.impl("ggram_fusion_fwd", &ggram_fusion_fwd_cpu);
  m.impl("ggram_fusion_grad_g", &ggram_fusion_grad_g_cpu);
}

}  // namespace dnascale
