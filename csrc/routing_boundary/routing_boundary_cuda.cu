// DNACHUNKER routing boundary, CUDA kernels: one warp per (sequence, position) row.
//
// Same contract as routing_boundary_cpu.cpp (see dnascale/ops/routing_boundary.py for the formula):
//   PAD (padding[b, t] False): p = 0, boundary = False; START (t == 0, padding[b, t-1] False, or force): p = 1,
//   boundary = True; SCORED: cos = dot(q_t, k_{t-1}) / max(|q_t| |k_{t-1}|, eps), p = clamp((1 - cos) / 2, 0, 1),
//   boundary = p >= 0.5. Accumulation in at::opmath_type (float for half/bfloat16/float); p in that type.
//
// Both kernels are memory-bound (3 multiply-adds per loaded element), so they are built for bandwidth:
// - Each warp reads q_t and k_{t-1} with 16-byte vector loads (lane l owns vectors l, l + 32, ...: every load
//   instruction of the warp reads 512 contiguous bytes) and keeps them in registers (rows of up to 8 vectors per
//   lane: D <= 2048 in bf16, 1024 in fp32); all of a lane's loads are issued before the first multiply. Longer rows
//   and hidden sizes without 16-byte vectors stream through the general path (VPL = 0).
// - The backward computes grad_q[t] and grad_k[t-1] from the same registers (no second read), and every output row
//   has exactly one writer: no atomics, deterministic.
// - The chunk numbering (a prefix count of boundaries per sequence) is one block-scan kernel per sequence over the
//   [B, T] booleans, instead of ATen's cumsum, sub, select and add (four launches and three temporaries).
//
// Schemas are defined in dnascale/ops/extensions.py; this translation unit registers the CUDA implementations.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_scan.cuh>

#include <cstdint>
#include <optional>
#include <type_traits>

#include "../common/warp_rows.cuh"

namespace dnascale {
namespace {

using cuda_rows::kRowsPerBlock;
using cuda_rows::kWarp;
using cuda_rows::Pack;
using cuda_rows::warp_sum;

constexpr int kThreads = kWarp * kRowsPerBlock;
constexpr int kScanThreads = 256;
constexpr int kScanItems = 8;  // positions per thread per tile: 2048-position tiles

enum RowKind : int { kPad = 0, kStart = 1, kScored = 2 };

__device__ __forceinline__ int row_kind(const bool* force, const bool* pad, int64_t row, int64_t t) {
  if (pad != nullptr && !pad[row]) return kPad;
  if (t == 0 || (pad != nullptr && !pad[row - 1]) || (force != nullptr && force[row])) return kStart;
  return kScored;
}

// A warp's share of one row: VPL vectors per lane held in registers (VPL > 0), zero where the row ends.
template <typename scalar_t, int VEC, int VPL>
struct RowRegisters {
  Pack<scalar_t, VEC> v[VPL];

  __device__ __forceinline__ void load(const scalar_t* __restrict__ row, int64_t vectors, int lane) {
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      const int64_t index = lane + static_cast<int64_t>(kWarp) * j;
      if (index < vectors) {
        v[j] = *reinterpret_cast<const Pack<scalar_t, VEC>*>(row + index * VEC);
      } else {
#pragma unroll
        for (int l = 0; l < VEC; ++l) v[j].v[l] = static_cast<scalar_t>(0.0f);
      }
    }
  }
};

template <typename acc_t>
struct DotNorms {
  acc_t dot, qq, kk;
};

// The registers a row of VPL vectors per lane needs (one unused vector on the streaming path, VPL = 0).
template <typename scalar_t, int VEC, int VPL>
using RowOf = RowRegisters<scalar_t, VEC, (VPL > 0 ? VPL : 1)>;

// dot(q, k), |q|^2, |k|^2 of one row pair, reduced across the warp (every lane gets the totals). With VPL > 0 the
// rows are left in qr and kr for the caller.
template <typename scalar_t, typename acc_t, int VEC, int VPL>
__device__ __forceinline__ DotNorms<acc_t> row_sums(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                                    int64_t D, int lane, RowOf<scalar_t, VEC, VPL>& qr,
                                                    RowOf<scalar_t, VEC, VPL>& kr) {
  acc_t sd = acc_t(0), sq = acc_t(0), sk = acc_t(0);
  auto add = [&](const Pack<scalar_t, VEC>& a, const Pack<scalar_t, VEC>& b) {
#pragma unroll
    for (int l = 0; l < VEC; ++l) {
      const acc_t x = static_cast<acc_t>(a.v[l]);
      const acc_t y = static_cast<acc_t>(b.v[l]);
      sd += x * y;
      sq += x * x;
      sk += y * y;
    }
  };
  if constexpr (VPL > 0) {
    qr.load(q, D / VEC, lane);
    kr.load(k, D / VEC, lane);
#pragma unroll
    for (int j = 0; j < VPL; ++j) add(qr.v[j], kr.v[j]);
  } else {
    for (int64_t i = static_cast<int64_t>(lane) * VEC; i < D; i += static_cast<int64_t>(kWarp) * VEC) {
      add(*reinterpret_cast<const Pack<scalar_t, VEC>*>(q + i), *reinterpret_cast<const Pack<scalar_t, VEC>*>(k + i));
    }
  }
  return {warp_sum(sd), warp_sum(sq), warp_sum(sk)};
}

template <typename scalar_t, typename acc_t, int VEC, int VPL>
__global__ void __launch_bounds__(kThreads)
    boundary_fwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                        const bool* __restrict__ force, const bool* __restrict__ pad, acc_t* __restrict__ prob,
                        bool* __restrict__ boundary, int64_t rows, int64_t T, int64_t D, acc_t eps) {
  const int64_t row = cuda_rows::warp_row();
  if (row >= rows) return;  // uniform per warp: a warp is one row
  const int lane = cuda_rows::lane_id();
  const int64_t t = row % T;
  const int kind = row_kind(force, pad, row, t);
  if (kind != kScored) {
    if (lane == 0) {
      prob[row] = kind == kStart ? acc_t(1) : acc_t(0);
      boundary[row] = kind == kStart;
    }
    return;
  }
  RowOf<scalar_t, VEC, VPL> qr, kr;
  const DotNorms<acc_t> s = row_sums<scalar_t, acc_t, VEC, VPL>(q + row * D, k + (row - 1) * D, D, lane, qr, kr);
  if (lane == 0) {
    const acc_t prod = sqrt(s.qq) * sqrt(s.kk);
    const acc_t cos = s.dot / (prod >= eps ? prod : eps);
    const acc_t raw = (acc_t(1) - cos) / acc_t(2);
    const acc_t p = raw < acc_t(0) ? acc_t(0) : (raw > acc_t(1) ? acc_t(1) : raw);
    prob[row] = p;
    boundary[row] = p >= acc_t(0.5);
  }
}
template <typename scalar_t, typename acc_t, int VEC, int VPL>
__global__ void __launch_bounds__(kThreads)
    boundary_bwd_kernel(const acc_t* __restrict__ grad_prob, const scalar_t* __restrict__ q,
                        const scalar_t* __restrict__ k, const bool* __restrict__ force,
                        const bool* __restrict__ pad, scalar_t* __restrict__ grad_q, scalar_t* __restrict__ grad_k,
                        int64_t rows, int64_t T, int64_t D, acc_t eps) {
  const int64_t row = cuda_rows::warp_row();
  if (row >= rows) return;
  const int lane = cuda_rows::lane_id();
  const int64_t t = row % T;
  const int kind = row_kind(force, pad, row, t);
  using P = Pack<scalar_t, VEC>;
  const int64_t stride = static_cast<int64_t>(kWarp) * VEC;
  const int64_t first = static_cast<int64_t>(lane) * VEC;
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
  const scalar_t* q_row = q + row * D;
  const scalar_t* k_row = k + (row - 1) * D;
  RowOf<scalar_t, VEC, VPL> qr, kr;
  const DotNorms<acc_t> s = row_sums<scalar_t, acc_t, VEC, VPL>(q_row, k_row, D, lane, qr, kr);
  const acc_t prod = sqrt(s.qq) * sqrt(s.kk);
  const bool normed = prod >= eps;
  const acc_t cos = s.dot / (normed ? prod : eps);
  const acc_t raw = (acc_t(1) - cos) / acc_t(2);
  const acc_t gcos = (raw >= acc_t(0) && raw <= acc_t(1)) ? -grad_prob[row] / acc_t(2) : acc_t(0);
  const acc_t a = gcos / (normed ? prod : eps);
  const acc_t cq = normed ? gcos * cos / s.qq : acc_t(0);
  const acc_t ck = normed ? gcos * cos / s.kk : acc_t(0);
  // d cos / d q = k / (|q||k|) - cos q / |q|^2 (and symmetrically for k), scaled by d loss / d cos.
  auto write = [&](const P& qv, const P& kv, int64_t offset) {
    P dq, dk;
#pragma unroll
    for (int l = 0; l < VEC; ++l) {
      const acc_t x = static_cast<acc_t>(qv.v[l]);
      const acc_t y = static_cast<acc_t>(kv.v[l]);
      dq.v[l] = static_cast<scalar_t>(a * y - cq * x);
      dk.v[l] = static_cast<scalar_t>(a * x - ck * y);
    }
    *reinterpret_cast<P*>(grad_q + row * D + offset) = dq;
    *reinterpret_cast<P*>(grad_k + (row - 1) * D + offset) = dk;
  };
  if constexpr (VPL > 0) {
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      const int64_t offset = first + stride * j;
      if (offset < D) write(qr.v[j], kr.v[j], offset);
    }
  } else {
    for (int64_t i = first; i < D; i += stride) {
      write(*reinterpret_cast<const P*>(q_row + i), *reinterpret_cast<const P*>(k_row + i), i);
    }
  }
}

// chunk_index[b, t] = (boundaries at positions <= t) - 1 and num_chunks[b]: one block per sequence, tiles of
// kScanThreads * kScanItems positions, each thread scanning kScanItems consecutive positions, tiles chained by a
// running carry. [B, T] booleans are a few KB: this kernel's cost is its launch, which it saves three times over.
__global__ void __launch_bounds__(kScanThreads)
    chunk_numbering_kernel(const bool* __restrict__ boundary, int64_t* __restrict__ chunk_index,
                           int64_t* __restrict__ num_chunks, int64_t T) {
  using BlockScan = cub::BlockScan<int64_t, kScanThreads>;
  __shared__ typename BlockScan::TempStorage scratch;
  const int64_t b = blockIdx.x;
  const bool* row = boundary + b * T;
  int64_t* out = chunk_index + b * T;
  int64_t carry = 0;
  for (int64_t tile = 0; tile < T; tile += static_cast<int64_t>(kScanThreads) * kScanItems) {
    const int64_t first = tile + static_cast<int64_t>(threadIdx.x) * kScanItems;
    int64_t items[kScanItems];
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) items[i] = (first + i < T && row[first + i]) ? 1 : 0;
    int64_t tile_total;
    BlockScan(scratch).InclusiveSum(items, items, tile_total);
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      if (first + i < T) out[first + i] = carry + items[i] - 1;
    }
    carry += tile_total;
    __syncthreads();  // the scratch is reused by the next tile
  }
  if (threadIdx.x == 0) num_chunks[b] = carry;
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

// Which kernel instance serves a row: 16-byte vectors when every row starts 16-byte aligned (else scalars), and the
// vectors per lane that keep the row in registers (0: stream it).
struct RowShape {
  bool vectorized;
  int per_lane;
};

template <typename scalar_t>
RowShape row_shape(const at::Tensor& q, const at::Tensor& k, int64_t D) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vectorized = D % kVec == 0 && cuda_rows::aligned16(q.data_ptr()) && cuda_rows::aligned16(k.data_ptr());
  return {vectorized, cuda_rows::vectors_per_lane(vectorized ? D / kVec : D)};
}

// Calls launch(std::integral_constant<int, VEC>{}, std::integral_constant<int, VPL>{}) for the row's shape. The scalar
// path (hidden sizes not a multiple of 16 bytes: rare, e.g. tests) always streams, to keep the instance count down.
template <typename scalar_t, typename Launch>
void dispatch_row_shape(const RowShape& shape, Launch&& launch) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  using std::integral_constant;
  if (!shape.vectorized) return launch(integral_constant<int, 1>{}, integral_constant<int, 0>{});
  switch (shape.per_lane) {
    case 1: return launch(integral_constant<int, kVec>{}, integral_constant<int, 1>{});
    case 2: return launch(integral_constant<int, kVec>{}, integral_constant<int, 2>{});
    case 4: return launch(integral_constant<int, kVec>{}, integral_constant<int, 4>{});
    case cuda_rows::kMaxVectorsPerLane:
      return launch(integral_constant<int, kVec>{}, integral_constant<int, cuda_rows::kMaxVectorsPerLane>{});
    default: return launch(integral_constant<int, kVec>{}, integral_constant<int, 0>{});
  }
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
  at::Tensor chunk_index = at::empty({B, T}, q.options().dtype(at::kLong));
  at::Tensor num_chunks = at::zeros({B}, q.options().dtype(at::kLong));
  if (B * T == 0) return {prob, boundary, chunk_index, num_chunks};
  const int64_t rows = B * T;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "routing_boundary_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t eps_t = static_cast<acc_t>(eps);
    dispatch_row_shape<scalar_t>(row_shape<scalar_t>(q, k, D), [&](auto vec, auto per_lane) {
      boundary_fwd_kernel<scalar_t, acc_t, decltype(vec)::value, decltype(per_lane)::value>
          <<<cuda_rows::blocks_for_rows(rows), kThreads, 0, stream>>>(
              q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), force_p, pad_p, prob.data_ptr<acc_t>(),
              boundary.data_ptr<bool>(), rows, T, D, eps_t);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  chunk_numbering_kernel<<<static_cast<unsigned int>(B), kScanThreads, 0, stream>>>(
      boundary.data_ptr<bool>(), chunk_index.data_ptr<int64_t>(), num_chunks.data_ptr<int64_t>(), T);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "routing_boundary_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t eps_t = static_cast<acc_t>(eps);
    // grad_q and grad_k come from empty_like of contiguous q and k: same alignment as q and k.
    dispatch_row_shape<scalar_t>(row_shape<scalar_t>(q, k, D), [&](auto vec, auto per_lane) {
      boundary_bwd_kernel<scalar_t, acc_t, decltype(vec)::value, decltype(per_lane)::value>
          <<<cuda_rows::blocks_for_rows(rows), kThreads, 0, stream>>>(
              grad_prob.data_ptr<acc_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), force_p, pad_p,
              grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(), rows, T, D, eps_t);
    });
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
