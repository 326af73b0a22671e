// Shared by the CUDA kernels: 16-byte vector packs and the "one warp per row, row held in registers" layout.
//
// A row of D elements is split into vectors of VEC elements (VEC * sizeof(T) = 16 bytes when the row and the
// pointers allow, else VEC = 1). Lane l of the row's warp owns vectors l, l + 32, l + 64, ... (VPL of them), so
// every load instruction of the warp reads 32 consecutive 16-byte vectors (512 contiguous bytes: fully coalesced)
// and a row of up to 32 * VPL vectors stays in registers between its read and its use.
#pragma once

#include <cstdint>

namespace dnascale {
namespace cuda_rows {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // 8 warps = 256 threads per block
constexpr int kMaxVectorsPerLane = 8;  // rows of up to 32 * 8 vectors (2048 bf16, 1024 fp32) stay in registers

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;  // every lane holds the total
}

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) & (kWarp - 1); }

// The row this warp owns: blocks of kRowsPerBlock warps laid out along threadIdx.x.
__device__ __forceinline__ int64_t warp_row() {
  return static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + static_cast<int64_t>(threadIdx.x) / kWarp;
}

// Vectors per lane for a row of `vectors` vectors: 1, 2, 4 or 8, or 0 when the row is too long for registers.
inline int vectors_per_lane(int64_t vectors) {
  const int64_t need = (vectors + kWarp - 1) / kWarp;
  if (need <= 1) return 1;
  if (need <= 2) return 2;
  if (need <= 4) return 4;
  if (need <= kMaxVectorsPerLane) return kMaxVectorsPerLane;
  return 0;
}

inline unsigned int blocks_for_rows(int64_t rows) {
  return static_cast<unsigned int>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
}

template <typename T>
bool aligned16(const T* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

}  // namespace cuda_rows
}  // namespace dnascale
