// DNAZEN G-gram fusion, CUDA kernels.
//
//   ggram_fusion_fwd:           out[r] = h[r] + sum_{e in token_ptr[r]..token_ptr[r+1]} g[token_ggram[e]]
//   ggram_fusion_grad_g:        dg[c]  =        sum_{e in ggram_ptr[c]..ggram_ptr[c+1]} dout[ggram_token[e]]
//   ggram_fusion_grad_g_atomic: dg[token_ggram[e]] += dout[r] for every entry e of every token row r
//
// The first two are one gather-sum over a CSR: one writer per output element, sums in a fixed order (entries
// ascending), deterministic, no atomics. The kernel is memory-bound (a few adds per loaded element), so it is
// built for bandwidth:
// - One warp per output row when the row fits in registers (<= 8 16-byte vectors per lane: D <= 2048 in bf16,
//   1024 in fp32; DNAZEN's 768 and 1536 included), 8 rows per 256-thread block. Every load instruction of a warp
//   reads 512 contiguous bytes.
// - The row's CSR indices are read once, 32 at a time, by the 32 lanes (one coalesced load) and handed out by
//   warp shuffles: no lane waits on an index load before it can issue the source-row load.
// - The entry loop is unrolled so that several source rows are in flight per lane (UNROLL x VPL 16-byte loads,
//   about 8) before the first add: memory-level parallelism is what a gather needs to approach HBM bandwidth.
//   The adds still happen in entry order, so the result is bitwise the same whatever the unroll.
// Rows longer than that, or hidden sizes that do not allow 16-byte vectors, take the general kernel (a group of
// threads per row, columns strided across it). The atomic variant scatters into a float32 (float64) buffer with
// float atomics and casts: summation order varies from run to run, so it is opt-in (deterministic=False in Python).
// Sums accumulate in at::opmath_type (float for half/bfloat16). The CSR comes from GGramMatching
// (dnascale/ops/ggram_fusion.py), which validates indices; these kernels trust them.
//
// Schemas are defined in dnascale/ops/extensions.py; this translation unit registers the CUDA implementations.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "../common/warp_rows.cuh"

namespace dnascale {
namespace {

using cuda_rows::kRowsPerBlock;
using cuda_rows::kWarp;
using cuda_rows::Pack;

constexpr int kThreads = kWarp * kRowsPerBlock;
constexpr int kLoadsInFlight = 8;  // 16-byte source loads per lane issued before the first add

// One warp per output row; lane l owns vectors l + 32 j (j < VPL) of the row, accumulated in registers.
// Registers decide the shape (checked with -Xptxas -v for sm_90: no spills): rows of up to 2 vectors per lane unroll
// the entry loop to 8 loads in flight at 2 blocks (16 warps) per SM; 4 vectors per lane load one entry at a time
// (4 in flight, still 2 blocks); 8 vectors per lane (64 float accumulators) run at 1 block per SM with 8 in flight.
// Every shape keeps about 32 KB of loads in flight per SM, above what Little's law asks of HBM3e (~25 KB).
template <int VPL>
constexpr int gather_unroll() { return VPL <= 2 ? kLoadsInFlight / VPL : 1; }
template <int VPL>
constexpr int gather_min_blocks() { return VPL >= cuda_rows::kMaxVectorsPerLane ? 1 : 2; }

template <typename scalar_t, typename acc_t, int VEC, int VPL, bool HAS_BASE>
__global__ void __launch_bounds__(kThreads, gather_min_blocks<VPL>())
    gather_sum_warp_kernel(const scalar_t* __restrict__ base, const scalar_t* __restrict__ src,
                           const int64_t* __restrict__ ptr, const int64_t* __restrict__ idx,
                           scalar_t* __restrict__ out, int64_t rows, int64_t D) {
  constexpr int UNROLL = gather_unroll<VPL>();
  using P = Pack<scalar_t, VEC>;
  const int64_t row = cuda_rows::warp_row();
  if (row >= rows) return;  // uniform per warp
  const int lane = cuda_rows::lane_id();
  const int64_t vectors = D / VEC;
  bool owns[VPL];
#pragma unroll
  for (int j = 0; j < VPL; ++j) owns[j] = lane + static_cast<int64_t>(kWarp) * j < vectors;

  acc_t acc[VPL][VEC];
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    P b;
    if (HAS_BASE && owns[j]) b = *reinterpret_cast<const P*>(base + row * D + (lane + kWarp * j) * VEC);
#pragma unroll
    for (int l = 0; l < VEC; ++l) acc[j][l] = (HAS_BASE && owns[j]) ? static_cast<acc_t>(b.v[l]) : acc_t(0);
  }

  const int64_t e0 = ptr[row], e1 = ptr[row + 1];
  for (int64_t first = e0; first < e1; first += kWarp) {
    const int count = static_cast<int>(e1 - first < kWarp ? e1 - first : kWarp);
    const int64_t mine = lane < count ? idx[first + lane] : 0;  // the next 32 source rows, one per lane
    int i = 0;
    for (; i + UNROLL <= count; i += UNROLL) {
      P s[UNROLL][VPL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int64_t r = __shfl_sync(0xffffffffu, mine, i + u);
#pragma unroll
        for (int j = 0; j < VPL; ++j) {
          if (owns[j]) s[u][j] = *reinterpret_cast<const P*>(src + r * D + (lane + kWarp * j) * VEC);
        }
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
        for (int j = 0; j < VPL; ++j) {
#pragma unroll
          for (int l = 0; l < VEC; ++l) acc[j][l] += owns[j] ? static_cast<acc_t>(s[u][j].v[l]) : acc_t(0);
        }
      }
    }
    for (; i < count; ++i) {  // the tail, one entry at a time (same order)
      const int64_t r = __shfl_sync(0xffffffffu, mine, i);
#pragma unroll
      for (int j = 0; j < VPL; ++j) {
        if (owns[j]) {
          const P s = *reinterpret_cast<const P*>(src + r * D + (lane + kWarp * j) * VEC);
#pragma unroll
          for (int l = 0; l < VEC; ++l) acc[j][l] += static_cast<acc_t>(s.v[l]);
        }
      }
    }
  }

#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    if (!owns[j]) continue;
    P o;
#pragma unroll
    for (int l = 0; l < VEC; ++l) o.v[l] = static_cast<scalar_t>(acc[j][l]);
    *reinterpret_cast<P*>(out + row * D + (lane + kWarp * j) * VEC) = o;
  }
}

// General gather-sum: blockDim = (threads per row, rows per block); thread x handles vectors x, x + blockDim.x, ...
// For rows too long for the warp kernel's registers and for hidden sizes without 16-byte vectors.
template <typename scalar_t, typename acc_t, int VEC, bool HAS_BASE>
__global__ void __launch_bounds__(kThreads)
    gather_sum_kernel(const scalar_t* __restrict__ base, const scalar_t* __restrict__ src,
                      const int64_t* __restrict__ ptr, const int64_t* __restrict__ idx, scalar_t* __restrict__ out,
                      int64_t rows, int64_t D) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  using P = Pack<scalar_t, VEC>;
  const int64_t e0 = ptr[row], e1 = ptr[row + 1];
  const int64_t vectors = D / VEC;
  for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
    acc_t acc[VEC];
    if constexpr (HAS_BASE) {
      const P b = *reinterpret_cast<const P*>(base + row * D + v * VEC);
#pragma unroll
      for (int l = 0; l < VEC; ++l) acc[l] = static_cast<acc_t>(b.v[l]);
    } else {
#pragma unroll
      for (int l = 0; l < VEC; ++l) acc[l] = acc_t(0);
    }
    for (int64_t e = e0; e < e1; ++e) {
      const P s = *reinterpret_cast<const P*>(src + idx[e] * D + v * VEC);
#pragma unroll
      for (int l = 0; l < VEC; ++l) acc[l] += static_cast<acc_t>(s.v[l]);
    }
    P o;
#pragma unroll
    for (int l = 0; l < VEC; ++l) o.v[l] = static_cast<scalar_t>(acc[l]);
    *reinterpret_cast<P*>(out + row * D + v * VEC) = o;
  }
}

// One warp per token row: the row is read once (16-byte vectors when possible) and added with float atomics into
// every G-gram row it matches. Indices are handed out by shuffles as in the gather.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    scatter_atomic_kernel(const scalar_t* __restrict__ src, const int64_t* __restrict__ ptr,
                          const int64_t* __restrict__ idx, acc_t* __restrict__ out, int64_t rows, int64_t D) {
  using P = Pack<scalar_t, VEC>;
  const int64_t row = cuda_rows::warp_row();
  if (row >= rows) return;
  const int64_t e0 = ptr[row], e1 = ptr[row + 1];
  if (e0 == e1) return;
  const int lane = cuda_rows::lane_id();
  const int64_t vectors = D / VEC;
  for (int64_t v = lane; v < vectors; v += kWarp) {
    const P s = *reinterpret_cast<const P*>(src + row * D + v * VEC);
    acc_t value[VEC];
#pragma unroll
    for (int l = 0; l < VEC; ++l) value[l] = static_cast<acc_t>(s.v[l]);
    for (int64_t first = e0; first < e1; first += kWarp) {
      const int count = static_cast<int>(e1 - first < kWarp ? e1 - first : kWarp);
      const int64_t mine = lane < count ? idx[first + lane] : 0;
      for (int i = 0; i < count; ++i) {
        acc_t* target = out + __shfl_sync(0xffffffffu, mine, i) * D + v * VEC;
#pragma unroll
        for (int l = 0; l < VEC; ++l) gpuAtomicAdd(target + l, value[l]);
      }
    }
  }
}

// General kernel's block: enough 32-lane groups to cover the row's vectors once (at most kThreads), rest as rows.
dim3 block_for(int64_t units_per_row) {
  const int64_t lanes = std::min<int64_t>(kThreads, std::max<int64_t>(32, (units_per_row + 31) / 32 * 32));
  return dim3(static_cast<unsigned int>(lanes), static_cast<unsigned int>(kThreads / lanes));
}

dim3 grid_for(int64_t rows, const dim3& block) {
  return dim3(static_cast<unsigned int>((rows + block.y - 1) / block.y));
}

template <typename scalar_t>
bool can_vectorize(int64_t D, std::initializer_list<const void*> pointers) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (D % kVec != 0) return false;
  for (const void* p : pointers) {
    if (p != nullptr && !cuda_rows::aligned16(p)) return false;
  }
  return true;
}

template <typename scalar_t, int VEC, int VPL, bool HAS_BASE>
void launch_warp_gather(const scalar_t* base, const scalar_t* src, const int64_t* ptr, const int64_t* idx,
                        scalar_t* out, int64_t rows, int64_t D, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  gather_sum_warp_kernel<scalar_t, acc_t, VEC, VPL, HAS_BASE>
      <<<cuda_rows::blocks_for_rows(rows), kThreads, 0, stream>>>(base, src, ptr, idx, out, rows, D);
}

template <typename scalar_t, bool HAS_BASE>
void launch_gather_sum(const scalar_t* base, const scalar_t* src, const int64_t* ptr, const int64_t* idx,
                       scalar_t* out, int64_t rows, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool vectorized = can_vectorize<scalar_t>(D, {base, src, out});
  const int per_lane = vectorized ? cuda_rows::vectors_per_lane(D / kVec) : 0;
  switch (per_lane) {
    case 1: launch_warp_gather<scalar_t, kVec, 1, HAS_BASE>(base, src, ptr, idx, out, rows, D, stream); break;
    case 2: launch_warp_gather<scalar_t, kVec, 2, HAS_BASE>(base, src, ptr, idx, out, rows, D, stream); break;
    case 4: launch_warp_gather<scalar_t, kVec, 4, HAS_BASE>(base, src, ptr, idx, out, rows, D, stream); break;
    case cuda_rows::kMaxVectorsPerLane:
      launch_warp_gather<scalar_t, kVec, cuda_rows::kMaxVectorsPerLane, HAS_BASE>(base, src, ptr, idx, out, rows, D,
                                                                                  stream);
      break;
    default:
      if (vectorized) {
        const dim3 block = block_for(D / kVec);
        gather_sum_kernel<scalar_t, acc_t, kVec, HAS_BASE>
            <<<grid_for(rows, block), block, 0, stream>>>(base, src, ptr, idx, out, rows, D);
      } else {
        const dim3 block = block_for(D);
        gather_sum_kernel<scalar_t, acc_t, 1, HAS_BASE>
            <<<grid_for(rows, block), block, 0, stream>>>(base, src, ptr, idx, out, rows, D);
      }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_csr(const at::Tensor& ptr, const at::Tensor& idx, int64_t rows, const at::Tensor& like, const char* what) {
  TORCH_CHECK(ptr.dim() == 1 && ptr.size(0) == rows + 1 && ptr.scalar_type() == at::kLong,
              "ggram_fusion: ", what, " pointer must be int64 [", rows + 1, "], got ", ptr.scalar_type(), " ",
              ptr.sizes());
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong, "ggram_fusion: ", what, " indices must be int64 [K]");
  TORCH_CHECK(ptr.device() == like.device() && idx.device() == like.device(),
              "ggram_fusion (CUDA kernel): the CSR must be on the states' device");
}

at::Tensor ggram_fusion_fwd_cuda(const at::Tensor& h_in, const at::Tensor& g_in, const at::Tensor& token_ptr,
                                 const at::Tensor& token_ggram) {
  TORCH_CHECK(h_in.dim() == 2 && g_in.dim() == 2 && h_in.size(1) == g_in.size(1),
              "ggram_fusion: h must be [R, D] and g [C, D], got ", h_in.sizes(), " and ", g_in.sizes());
  TORCH_CHECK(h_in.scalar_type() == g_in.scalar_type(), "ggram_fusion: h and g differ in dtype");
  TORCH_CHECK(h_in.is_cuda() && g_in.device() == h_in.device(),
              "ggram_fusion (CUDA kernel): h and g must be on the same CUDA device");
  check_csr(token_ptr, token_ggram, h_in.size(0), h_in, "token");
  const c10::cuda::CUDAGuard device_guard(h_in.device());
  const at::Tensor h = h_in.contiguous(), g = g_in.contiguous();
  const at::Tensor ptr = token_ptr.contiguous(), idx = token_ggram.contiguous();
  at::Tensor out = at::empty_like(h);
  if (h.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "ggram_fusion_fwd_cuda", [&] {
    launch_gather_sum<scalar_t, true>(h.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), ptr.data_ptr<int64_t>(),
                                      idx.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), h.size(0), h.size(1));
  });
  return out;
}

at::Tensor ggram_fusion_grad_g_cuda(const at::Tensor& grad_out_in, const at::Tensor& ggram_ptr,
                                    const at::Tensor& ggram_token, int64_t num_ggram_rows) {
  TORCH_CHECK(grad_out_in.dim() == 2 && grad_out_in.is_cuda(), "ggram_fusion: grad_out must be a CUDA [R, D]");
  check_csr(ggram_ptr, ggram_token, num_ggram_rows, grad_out_in, "G-gram");
  const c10::cuda::CUDAGuard device_guard(grad_out_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor ptr = ggram_ptr.contiguous(), idx = ggram_token.contiguous();
  at::Tensor grad_g = at::empty({num_ggram_rows, grad_out.size(1)}, grad_out.options());
  if (grad_g.numel() == 0) return grad_g;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "ggram_fusion_grad_g_cuda", [&] {
    launch_gather_sum<scalar_t, false>(nullptr, grad_out.data_ptr<scalar_t>(), ptr.data_ptr<int64_t>(),
                                       idx.data_ptr<int64_t>(), grad_g.data_ptr<scalar_t>(), num_ggram_rows,
                                       grad_out.size(1));
  });
  return grad_g;
}

at::Tensor ggram_fusion_grad_g_atomic_cuda(const at::Tensor& grad_out_in, const at::Tensor& token_ptr,
                                           const at::Tensor& token_ggram, int64_t num_ggram_rows) {
  TORCH_CHECK(grad_out_in.dim() == 2 && grad_out_in.is_cuda(), "ggram_fusion: grad_out must be a CUDA [R, D]");
  check_csr(token_ptr, token_ggram, grad_out_in.size(0), grad_out_in, "token");
  const c10::cuda::CUDAGuard device_guard(grad_out_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor ptr = token_ptr.contiguous(), idx = token_ggram.contiguous();
  const int64_t rows = grad_out.size(0), D = grad_out.size(1);
  const at::ScalarType acc_type = at::toOpMathType(grad_out.scalar_type());
  at::Tensor acc = at::zeros({num_ggram_rows, D}, grad_out.options().dtype(acc_type));
  if (acc.numel() == 0 || rows == 0) return acc.to(grad_out.scalar_type());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "ggram_fusion_grad_g_atomic", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const unsigned int blocks = cuda_rows::blocks_for_rows(rows);
    const scalar_t* src = grad_out.data_ptr<scalar_t>();
    if (can_vectorize<scalar_t>(D, {src})) {
      scatter_atomic_kernel<scalar_t, acc_t, kVec><<<blocks, kThreads, 0, stream>>>(
          src, ptr.data_ptr<int64_t>(), idx.data_ptr<int64_t>(), acc.data_ptr<acc_t>(), rows, D);
    } else {
      scatter_atomic_kernel<scalar_t, acc_t, 1><<<blocks, kThreads, 0, stream>>>(
          src, ptr.data_ptr<int64_t>(), idx.data_ptr<int64_t>(), acc.data_ptr<acc_t>(), rows, D);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return acc.to(grad_out.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(dnascale, CUDA, m) {
  m.impl("ggram_fusion_fwd", &ggram_fusion_fwd_cuda);
  m.impl("ggram_fusion_grad_g", &ggram_fusion_grad_g_cuda);
  m.impl("ggram_fusion_grad_g_atomic", &ggram_fusion_grad_g_atomic_cuda);
}

}  // namespace dnascale
