// Launch helpers shared by the CUDA kernels of the binary bag ops (posterior,
// posterior_weighted): grid sizes, and the compaction of wide bags into the
// list the thread-block kernels take.
#pragma once

#include <cstdint>

namespace mlellp {
namespace cuda_detail {

// Bags whose band is at least this wide get a thread block each (BlockTeam),
// smaller ones a thread each: a lone thread would crawl through a wide row.
constexpr int64_t kBlockMinWidth = 64;

inline unsigned int blocks_for(int64_t work, int threads) {
  return static_cast<unsigned int>((work + threads - 1) / threads);
}

// Writes bag b at wide_bags[position[b] - 1], where position is the inclusive
// prefix sum of the bags' wide marks, zeroed at the bags that are not wide.
// (A template, so that every file that launches it may define it.)
template <typename Index>
__global__ void wide_scatter_kernel(const Index* __restrict__ position, Index* __restrict__ wide_bags,
                                    Index num_bags) {
  const Index b = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x;
  if (b >= num_bags || position[b] == 0) return;
  wide_bags[position[b] - 1] = b;
}

}  // namespace cuda_detail
}  // namespace mlellp
