// DNACHUNKER routing boundary, CPU kernel: one pass over q and k, parallel over (sequence, position) rows.
//
// The contract (shapes, eps, padding, sequence starts, forcing, clamp and its gradient) is written once, in
// dnascale/ops/routing_boundary.py; this file and routing_boundary_cuda.cu implement exactly that formula:
//
//   kind(b, t) = PAD    if padding given and padding[b, t] is False           -> p = 0, boundary = False
//                START  if t == 0, or padding[b, t - 1] is False, or force    -> p = 1, boundary = True
//                SCORED otherwise:
//   cos = dot(q_t, k_{t-1}) / max(|q_t| * |k_{t-1}|, eps),  p = clamp((1 - cos) / 2, 0, 1),  boundary = p >= 0.5
//   chunk_index = inclusive cumsum of boundary along t, minus 1;  num_chunks = sum of boundary.
//
// Gradients flow only through SCORED rows, and only where (1 - cos) / 2 lies in [0, 1] (torch.clamp's rule);
// the norm product gets no gradient where it is below eps (torch.clamp_min's rule). Accumulation is in
// at::opmath_type (float for half/bfloat16/float, double for double); p comes out in that type.
//
// The schemas of dnascale::routing_boundary_fwd / _bwd are defined in Python (dnascale/ops/extensions.py);
// this translation unit only registers the CPU implementations.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>

namespace dnascale {
namespace {

enum RowKind : int { kPad = 0, kStart = 1, kScored = 2 };

inline RowKind row_kind(const bool* force, const bool* pad, int64_t row, int64_t t) {
  if (pad != nullptr && !pad[row]) return kPad;
  if (t == 0 || (pad != nullptr && !pad[row - 1]) || (force != nullptr && force[row])) return kStart;
  return kScored;
}

// dot(q, k), |q|^2 and |k|^2 with kLanes independent accumulators per sum, so the compiler vectorises the loop
// without being allowed to reassociate floating-point sums (no -ffast-math). The loop is fully unrolled and the
// 12 accumulators stay in registers (16 and 8 lanes spilled and measured up to 3x slower).
template <typename scalar_t, typename acc_t>
inline void dot_norms(const scalar_t* q, const scalar_t* k, int64_t D, acc_t& dot, acc_t& qq, acc_t& kk) {
  constexpr int kLanes = 4;  // 3 sums x 4 lanes: one SSE register each for float, measured fastest here
  acc_t sd[kLanes] = {}, sq[kLanes] = {}, sk[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t a = static_cast<acc_t>(q[d + l]);
      const acc_t b = static_cast<acc_t>(k[d + l]);
      sd[l] += a * b;
      sq[l] += a * a;
      sk[l] += b * b;
    }
  }
  for (int l = 0; d < D; ++d, ++l) {
    const acc_t a = static_cast<acc_t>(q[d]);
    const acc_t b = static_cast<acc_t>(k[d]);
    sd[l] += a * b;
    sq[l] += a * a;
    sk[l] += b * b;
  }
  dot = qq = kk = acc_t(0);
  for (int l = 0; l < kLanes; ++l) {
    dot += sd[l];
    qq += sq[l];
    kk += sk[l];
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& force,
                  const std::optional<at::Tensor>& padding) {
  TORCH_CHECK(q.dim() == 3, "routing_boundary: q must be [B, T, D], got ", q.sizes());
  TORCH_CHECK(q.sizes() == k.sizes(), "routing_boundary: q ", q.sizes(), " and k ", k.sizes(), " differ in shape");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "routing_boundary: q and k differ in dtype");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "routing_boundary (CPU kernel): tensors must be on CPU");
  for (const auto* mask : {&force, &padding}) {
    if (mask->has_value()) {
      const at::Tensor& m = mask->value();
      TORCH_CHECK(m.scalar_type() == at::kBool, "routing_boundary: force/padding must be bool");
      TORCH_CHECK(m.dim() == 2 && m.size(0) == q.size(0) && m.size(1) == q.size(1),
                  "routing_boundary: force/padding must be [B, T] = [", q.size(0), ", ", q.size(1), "], got ",
                  m.sizes());
      TORCH_CHECK(m.device().is_cpu(), "routing_boundary (CPU kernel): force/padding must be on CPU");
    }
  }
}

const bool* mask_ptr(const std::optional<at::Tensor>& mask, at::Tensor& holder) {
  if (!mask.has_value()) return nullptr;
  holder = mask->contiguous();
  return holder.data_ptr<bool>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routing_boundary_fwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const std::optional<at::Tensor>& force,
    const std::optional<at::Tensor>& padding, double eps) {
  check_inputs(q_in, k_in, force, padding);
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = k_in.contiguous();
  const int64_t B = q.size(0), T = q.size(1), D = q.size(2);
  at::Tensor force_c, pad_c;
  const bool* force_p = mask_ptr(force, force_c);
  const bool* pad_p = mask_ptr(padding, pad_c);

  at::Tensor prob = at::empty({B, T}, q.options().dtype(at::toOpMathType(q.scalar_type())));
  at::Tensor boundary = at::empty({B, T}, q.options().dtype(at::kBool));
  at::Tensor chunk_index = at::empty({B, T}, q.options().dtype(at::kLong));
  at::Tensor num_chunks = at::empty({B}, q.options().dtype(at::kLong));
  if (B * T == 0) {
    num_chunks.zero_();
    return {prob, boundary, chunk_index, num_chunks};
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "routing_boundary_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    acc_t* pp = prob.data_ptr<acc_t>();
    bool* bp = boundary.data_ptr<bool>();
    const acc_t eps_t = static_cast<acc_t>(eps);
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
    at::parallel_for(0, B * T, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t t = row % T;
        const RowKind kind = row_kind(force_p, pad_p, row, t);
        if (kind != kScored) {
          pp[row] = kind == kStart ? acc_t(1) : acc_t(0);
          bp[row] = kind == kStart;
          continue;
        }
        acc_t dot, qq, kk;
        dot_norms<scalar_t, acc_t>(qp + row * D, kp + (row - 1) * D, D, dot, qq, kk);
        const acc_t prod = std::sqrt(qq) * std::sqrt(kk);
        const acc_t cos = dot / (prod >= eps_t ? prod : eps_t);
        const acc_t raw = (acc_t(1) - cos) / acc_t(2);
        const acc_t p = std::min(std::max(raw, acc_t(0)), acc_t(1));
        pp[row] = p;
        bp[row] = p >= acc_t(0.5);
      }
    });
  });

  // Chunk numbering: a serial scan per sequence (cheap next to reading q and k), parallel over sequences.
  const bool* bp = boundary.data_ptr<bool>();
  int64_t* cp = chunk_index.data_ptr<int64_t>();
  int64_t* np = num_chunks.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t count = 0;
      for (int64_t t = 0; t < T; ++t) {
        count += bp[b * T + t] ? 1 : 0;
        cp[b * T + t] = count - 1;
      }
      np[b] = count;
    }
  });
  return {prob, boundary, chunk_index, num_chunks};
}

std::tuple<at::Tensor, at::Tensor> routing_boundary_bwd_cpu(
    const at::Tensor& grad_prob_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const std::optional<at::Tensor>& force, const std::optional<at::Tensor>& padding, double eps) {
  check_inputs(q_in, k_in, force, padding);
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = k_in.contiguous();
  const int64_t B = q.size(0), T = q.size(1), D = q.size(2);
  const at::ScalarType acc_type = at::toOpMathType(q.scalar_type());
  TORCH_CHECK(grad_prob_in.dim() == 2 && grad_prob_in.size(0) == B && grad_prob_in.size(1) == T,
              "routing_boundary_bwd: grad_prob must be [B, T]");
  const at::Tensor grad_prob = grad_prob_in.to(acc_type).contiguous();
  at::Tensor force_c, pad_c;
  const bool* force_p = mask_ptr(force, force_c);
  const bool* pad_p = mask_ptr(padding, pad_c);

  at::Tensor grad_q = at::empty_like(q);
  at::Tensor grad_k = at::empty_like(k);
  if (B * T == 0 || D == 0) return {grad_q, grad_k};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "routing_boundary_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const acc_t* gp = grad_prob.data_ptr<acc_t>();
    scalar_t* dqp = grad_q.data_ptr<scalar_t>();
    scalar_t* dkp = grad_k.data_ptr<scalar_t>();
    const acc_t eps_t = static_cast<acc_t>(eps);
    const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(D, 1));
    // Row t owns grad_q[t] and grad_k[t - 1] (p_t reads q_t and k_{t-1}); the last row also clears grad_k[T - 1].
    at::parallel_for(0, B * T, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t t = row % T;
        scalar_t* dq = dqp + row * D;
        scalar_t* dk = t > 0 ? dkp + (row - 1) * D : nullptr;
        if (t == T - 1) std::fill(dkp + row * D, dkp + (row + 1) * D, scalar_t(0));
        const RowKind kind = row_kind(force_p, pad_p, row, t);
        if (kind != kScored) {
          std::fill(dq, dq + D, scalar_t(0));
          if (dk != nullptr) std::fill(dk, dk + D, scalar_t(0));
          continue;
        }
        const scalar_t* qr = qp + row * D;
        const scalar_t* kr = kp + (row - 1) * D;
        acc_t dot, qq, kk;
        dot_norms<scalar_t, acc_t>(qr, kr, D, dot, qq, kk);
        const acc_t prod = std::sqrt(qq) * std::sqrt(kk);
        const bool normed = prod >= eps_t;
        const acc_t cos = dot / (normed ? prod : eps_t);
        const acc_t raw = (acc_t(1) - cos) / acc_t(2);
        // dL/dcos = dL/dp * dp/dcos = -g / 2, zero where the clamp is active.
        const acc_t gcos = (raw >= acc_t(0) && raw <= acc_t(1)) ? -gp[row] / acc_t(2) : acc_t(0);
        // dcos/dq = k / n - [n = |q||k|] cos q / |q|^2, and symmetrically for k (n = max(|q||k|, eps)).
        const acc_t a = gcos / (normed ? prod : eps_t);
        const acc_t cq = normed ? gcos * cos / qq : acc_t(0);
        const acc_t ck = normed ? gcos * cos / kk : acc_t(0);
        for (int64_t d = 0; d < D; ++d) {
          const acc_t qv = static_cast<acc_t>(qr[d]);
          const acc_t kv = static_cast<acc_t>(kr[d]);
          dq[d] = static_cast<scalar_t>(a * kv - cq * qv);
          dk[d] = static_cast<scalar_t>(a * qv - ck * kv);
        }
      }
    });
  });
  return {grad_q, grad_k};
}

}  // namespace

TORCH_LIBRARY_IMPL(dnascale, CPU, m) {
  m.impl("routing_boundary_fwd", &routing_boundary_fwd_cpu);
  m.impl("routing_boundary_bwd", &routing_boundary_bwd_cpu);
}

}  // namespace dnascale
