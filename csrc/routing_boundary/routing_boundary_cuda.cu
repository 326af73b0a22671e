// DNACHUNKER routing boundary, CUDA kernels: one warp per (sequence, position) row.
//
// Same contract as routing_boundary_cpu.cpp (see dnascale/ops/routing_boundary.py for the formula):
//   PAD (padding[b, t] False): p = 0, boundary = False; START (t == 0, padding[b, t-1] False, or force): p = 1,
//   boundary = True; SCORED: cos = dot(q_t, k_{t-1}) / max(|q_t| |k_{t-1}|, eps), p = clamp((1 - cos) / 2, 0, 1),
//   boundary = p >= 0.5. Accumulation in at::opmath_type (float for half/bfloat16/float); p in that type.
//
// Each warp reads q_t and k_{t-1} with 16-byte vector loads when the hidden size allows (coalesced: lane l reads
// the l-th 16 bytes of each 512-byte stretch), reduces with shuffles, and lane 0 writes p and the boundary.
// The backward warp re-reads the two rows (from L1/L2) and writes grad_q[t] and grad_k[t-1]: every output row has
// exactly one writer, so there are no atomics and the result is deterministic. The chunk numbering is a cumsum
// over [B, T] booleans (negligible next to the [B, T, D] reads), left to ATen.
//
// Schemas are defined in dnascale/ops/extensions.py; this translation unit registers the CUDA implementations.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

namespace dnascale {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // 8 warps = 256 threads per block

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

enum RowKind : int { kPad = 0, kStart = 1, kScored = 2 };

__device__ __forceinline__ int row_kind(const bool* force, const bool* pad, int64_t row, int64_t t) {
  if (pad != nullptr && !pad[row]) return kPad;
  if (t == 0 || (pad != nullptr && !pad[row - 1]) || (force != nullptr && force[row])) return kStart;
  return kScored;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;  // every lane holds the total
}

// dot(q, k), |q|^2, |k|^2 over one row pair, reduced across the warp.
template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void warp_dot_norms(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                               int64_t D, acc_t& dot, acc_t& qq, acc_t& kk) {
  acc_t sd = acc_t(0), sq = acc_t(0), sk = acc_t(0);
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * VEC; i < D; i += static_cast<int64_t>(kWarp) * VEC) {
    const Pack<scalar_t, VEC> a = *reinterpret_cast<const Pack<scalar_t, VEC>*>(q + i);
    const Pack<scalar_t, VEC> b = *reinterpret_cast<const Pack<scalar_t, VEC>*>(k + i);
#pragma unroll
    for (int l = 0; l < VEC; ++l) {
      const acc_t x = static_cast<acc_t>(a.v[l]);
      const acc_t y = static_cast<acc_t>(b.v[l]);
      sd += x * y;
      sq += x * x;
      sk += y * y;
    }
  }
  dot = warp_sum(sd);
  qq = warp_sum(sq);
  kk = warp_sum(sk);
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kWarp * kRowsPerBlock)
    boundary_fwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                        const bool* __restrict__ force, const bool* __restrict__ pad, acc_t* __restrict__ prob,
                        bool* __restrict__ boundary, int64_t rows, int64_t T, int64_t D, acc_t eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= rows) return;  // uniform per warp: a warp is one row
  const int64_t t = row % T;
  const int kind = row_kind(force, pad, row, t);
  if (kind != kScored) {
    if (threadIdx.x == 0) {
      prob[row] = kind == kStart ? acc_t(1) : acc_t(0);
      boundary[row] = kind == kStart;
    }
    return;
  }
  acc_t dot, qq, kk;
  warp_dot_norms<scalar_t, acc_t, VEC>(q + row * D, k + (row - 1) * D, D, dot, qq, kk);
  if (threadIdx.x == 0) {
    const acc_t prod = sqrt(qq) * sqrt(kk);
    const acc_t cos = dot / (prod >= eps ? prod : eps);
    const acc_t raw = (acc_t(1) - cos) / acc_t(2);
    const acc_t p = raw < acc_t(0) ? acc_t(0) : (raw > acc_t(1) ? acc_t(1) : raw);
    prob[row] = p;
    boundary[row] = p >= acc_t(0.5);
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kWarp * kRowsPerBlock)
    boundary_bwd_kernel(const acc_t* __restrict__ grad_prob, const scalar_t* __restrict__ q,
                        const scalar_t* __restrict__ k, const bool* __restrict__ force,
                        const bool* __restrict__ pad, scalar_t* __restrict__ grad_q, scalar_t* __restrict__ grad_k,
                        int64_t rows, int64_t T, int64_t D, acc_t eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= rows) return;
  const int64_t t = row % T;
  const int kind = row_kind(force, pad, row, t);
  using P = Pack<scalar_t, VEC>;
  const int64_t stride = static_cast<int64_t>(kWarp) * VEC;
  const int64_t first = static_cast<int64_t>(threadIdx.x) * VEC;
  P zero;
#pragma unroll
  for (int l = 0; l < VEC; ++l) zero.v[l] = static_cast<scalar_t>(0.0f);
  if (t == T - 1) {  // nobody else owns grad_k of the last position
    for (int64_t i = first; i < D; i += stride) *reinterpret_cast<P*>(grad_k + row * D + i) = zero;
  }
  if (kind != kScored) {
    for (int64_t i = first; i < D; i += stride) {
      *reinterpret_cast<P*>(grad_q + row * D + i) = zero;
      if (t > 0) *reinterpret_cast<P*>(grad_k + (row - 1) * D + i) = zero;
    }
    return;
  }
  const scalar_t* qr = q + row * D;
  const scalar_t* kr = k + (row - 1) * D;
  acc_t dot, qq, kk;
  warp_dot_norms<scalar_t, acc_t, VEC>(qr, kr, D, dot, qq, kk);
  const acc_t prod = sqrt(qq) * sqrt(kk);
  const bool normed = prod >= eps;
  const acc_t cos = dot / (normed ? prod : eps);
  const acc_t raw = (acc_t(1) - cos) / acc_t(2);
  const acc_t gcos = (raw >= acc_t(0) && raw <= acc_t(1)) ? -grad_prob[row] / acc_t(2) : acc_t(0);
  const acc_t a = gcos / (normed ? prod : eps);
  const acc_t cq = normed ? gcos * cos / qq : acc_t(0);
  const acc_t ck = normed ? gcos * cos / kk : acc_t(0);
  for (int64_t i = first; i < D; i += stride) {
    const P qv = *reinterpret_cast<const P*>(qr + i);
    const P kv = *reinterpret_cast<const P*>(kr + i);
    P dq, dk;
#pragma unroll
    for (int l = 0; l < VEC; ++l) {
      const acc_t x = static_cast<acc_t>(qv.v[l]);
      const acc_t y = static_cast<acc_t>(kv.v[l]);
      dq.v[l] = static_cast<scalar_t>(a * y - cq * x);
      dk.v[l] = static_cast<scalar_t>(a * x - ck * y);
    }
    *reinterpret_cast<P*>(grad_q + row * D + i) = dq;
    *reinterpret_cast<P*>(grad_k + (row - 1) * D + i) = dk;
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& force,
                  const std::optional<at::Tensor>& padding) {
  TORCH_CHECK(q.dim() == 3, "routing_boundary: q must be [B, T, D], got ", q.sizes());
  TORCH_CHECK(q.sizes() == k.sizes(), "routing_boundary: q ", q.sizes(), " and k ", k.sizes(), " differ in shape");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "routing_boundary: q and k differ in dtype");
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && q.device() == k.device(),
              "routing_boundary (CUDA kernel): q and k must be on the same CUDA device");
  for (const auto* mask : {&force, &padding}) {
    if (mask->has_value()) {
      const at::Tensor& m = mask->value();
      TORCH_CHECK(m.scalar_type() == at::kBool, "routing_boundary: force/padding must be bool");
      TORCH_CHECK(m.dim() == 2 && m.size(0) == q.size(0) && m.size(1) == q.size(1),
                  "routing_boundary: force/padding must be [B, T], got ", m.sizes());
      TORCH_CHECK(m.device() == q.device(), "routing_boundary (CUDA kernel): force/padding must be on q's device");
    }
  }
}

const bool* mask_ptr(const std::optional<at::Tensor>& mask, at::Tensor& holder) {
  if (!mask.has_value()) return nullptr;
  holder = mask->contiguous();
  return holder.data_ptr<bool>();
}

// 16-byte vectors when every row starts 16-byte aligned, else scalar loads.
template <typename scalar_t>
int vector_width(const at::Tensor& q, const at::Tensor& k, int64_t D) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool aligned = D % kVec == 0 && reinterpret_cast<std::uintptr_t>(q.data_ptr()) % 16 == 0 &&
                       reinterpret_cast<std::uintptr_t>(k.data_ptr()) % 16 == 0;
  return aligned ? kVec : 1;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routing_boundary_fwd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const std::optional<at::Tensor>& force,
    const std::optional<at::Tensor>& padding, double eps) {
  check_inputs(q_in, k_in, force, padding);
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = k_in.contiguous();
  const int64_t B = q.size(0), T = q.size(1), D = q.size(2);
  at::Tensor force_c, pad_c;
  const bool* force_p = mask_ptr(force, force_c);
  const bool* pad_p = mask_ptr(padding, pad_c);
  at::Tensor prob = at::empty({B, T}, q.options().dtype(at::toOpMathType(q.scalar_type())));
  at::Tensor boundary = at::empty({B, T}, q.options().dtype(at::kBool));
  if (B * T == 0) {
    return {prob, boundary, at::empty({B, T}, q.options().dtype(at::kLong)),
            at::zeros({B}, q.options().dtype(at::kLong))};
  }
  const int64_t rows = B * T;
  const dim3 block(kWarp, kRowsPerBlock);
  const dim3 grid(static_cast<unsigned int>((rows + kRowsPerBlock - 1) / kRowsPerBlock));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "routing_boundary_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const acc_t eps_t = static_cast<acc_t>(eps);
    if (vector_width<scalar_t>(q, k, D) == kVec) {
      boundary_fwd_kernel<scalar_t, acc_t, kVec><<<grid, block, 0, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), force_p, pad_p, prob.data_ptr<acc_t>(),
          boundary.data_ptr<bool>(), rows, T, D, eps_t);
    } else {
      boundary_fwd_kernel<scalar_t, acc_t, 1><<<grid, block, 0, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), force_p, pad_p, prob.data_ptr<acc_t>(),
          boundary.data_ptr<bool>(), rows, T, D, eps_t);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor chunk_index = at::cumsum(boundary, 1, at::kLong).sub_(1);
  at::Tensor num_chunks = chunk_index.select(1, T - 1).add(1);
  return {prob, boundary, chunk_index, num_chunks};
}

std::tuple<at::Tensor, at::Tensor> routing_boundary_bwd_cuda(
    const at::Tensor& grad_prob_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const std::optional<at::Tensor>& force, const std::optional<at::Tensor>& padding, double eps) {
  check_inputs(q_in, k_in, force, padding);
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = k_in.contiguous();
  const int64_t B = q.size(0), T = q.size(1), D = q.size(2);
  TORCH_CHECK(grad_prob_in.dim() == 2 && grad_prob_in.size(0) == B && grad_prob_in.size(1) == T,
              "routing_boundary_bwd: grad_prob must be [B, T]");
  const at::Tensor grad_prob = grad_prob_in.to(at::toOpMathType(q.scalar_type())).contiguous();
  at::Tensor force_c, pad_c;
  const bool* force_p = mask_ptr(force, force_c);
  const bool* pad_p = mask_ptr(padding, pad_c);
  at::Tensor grad_q = at::empty_like(q);
  at::Tensor grad_k = at::empty_like(k);
  if (B * T == 0 || D == 0) return {grad_q, grad_k};
  const int64_t rows = B * T;
  const dim3 block(kWarp, kRowsPerBlock);
  const dim3 grid(static_cast<unsigned int>((rows + kRowsPerBlock - 1) / kRowsPerBlock));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "routing_boundary_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const acc_t eps_t = static_cast<acc_t>(eps);
    // grad_q and grad_k come from empty_like of contiguous q and k: same alignment as q and k.
    if (vector_width<scalar_t>(q, k, D) == kVec) {
      boundary_bwd_kernel<scalar_t, acc_t, kVec><<<grid, block, 0, stream>>>(
          grad_prob.data_ptr<acc_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), force_p, pad_p,
          grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(), rows, T, D, eps_t);
    } else {
      boundary_bwd_kernel<scalar_t, acc_t, 1><<<grid, block, 0, stream>>>(
          grad_prob.data_ptr<acc_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), force_p, pad_p,
          grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(), rows, T, D, eps_t);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_q, grad_k};
}

}  // namespace

TORCH_LIBRARY_IMPL(dnascale, CUDA, m) {
  m.impl("routing_boundary_fwd", &routing_boundary_fwd_cuda);
  m.impl("routing_boundary_bwd", &routing_boundary_bwd_cuda);
}

}  // namespace dnascale
