// DNAZEN G-gram fusion, CUDA kernels.
//
//   ggram_fusion_fwd:           out[r] = h[r] + sum_{e in token_ptr[r]..token_ptr[r+1]} g[token_ggram[e]]
//   ggram_fusion_grad_g:        dg[c]  =        sum_{e in ggram_ptr[c]..ggram_ptr[c+1]} dout[ggram_token[e]]
//   ggram_fusion_grad_g_atomic: dg[token_ggram[e]] += dout[r] for every entry e of every token row r
//
// The first two are one gather-sum kernel: a group of threads per output row, each thread owning 16-byte column
// vectors, so that reads of every source row and the write of the output row are coalesced; the CSR entries of a
// row are read by all threads of the group (a broadcast). One writer per output element, sums in a fixed order:
// deterministic, no atomics. The atomic variant scatters into a float32 (float64) buffer with float atomics and
// casts: summation order varies from run to run, so it is opt-in (deterministic=False in Python).
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

namespace dnascale {
namespace {

constexpr int kThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// blockDim = (threads per row, rows per block); each thread handles vectors v = threadIdx.x, += blockDim.x.
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

// One thread block row-group per token row; every column of the row adds itself into each matched G-gram row.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    scatter_atomic_kernel(const scalar_t* __restrict__ src, const int64_t* __restrict__ ptr,
                          const int64_t* __restrict__ idx, acc_t* __restrict__ out, int64_t rows, int64_t D) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const int64_t e0 = ptr[row], e1 = ptr[row + 1];
  if (e0 == e1) return;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const acc_t value = static_cast<acc_t>(src[row * D + d]);
    for (int64_t e = e0; e < e1; ++e) gpuAtomicAdd(out + idx[e] * D + d, value);
  }
}

// Threads per row: enough 32-lane groups to cover the row's vectors once (at most kThreads), rest as rows.
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
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

template <typename scalar_t, bool HAS_BASE>
void launch_gather_sum(const scalar_t* base, const scalar_t* src, const int64_t* ptr, const int64_t* idx,
                       scalar_t* out, int64_t rows, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (can_vectorize<scalar_t>(D, {base, src, out})) {
    const dim3 block = block_for(D / kVec);
    gather_sum_kernel<scalar_t, acc_t, kVec, HAS_BASE>
        <<<grid_for(rows, block), block, 0, stream>>>(base, src, ptr, idx, out, rows, D);
  } else {
    const dim3 block = block_for(D);
    gather_sum_kernel<scalar_t, acc_t, 1, HAS_BASE>
        <<<grid_for(rows, block), block, 0, stream>>>(base, src, ptr, idx, out, rows, D);
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
    const dim3 block = block_for(D);
    scatter_atomic_kernel<scalar_t, acc_t><<<grid_for(rows, block), block, 0, stream>>>(
        grad_out.data_ptr<scalar_t>(), ptr.data_ptr<int64_t>(), idx.data_ptr<int64_t>(), acc.data_ptr<acc_t>(), rows,
        D);
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
