// The CUDA team of the shared headers (bag_recursion.h, augment_image.h): the
// threads of one block. Loops are strided by blockDim.x; reductions use a
// shared-memory tree in a fixed order, so results are deterministic.
#pragma once

namespace mlellp {
namespace cuda_detail {

constexpr int kBlockThreads = 256;  // a power of two (tree reductions)

class BlockTeam {
 public:
  // shared: count * blockDim.x doubles, count the largest reduce() count used
  __device__ explicit BlockTeam(double* shared) : shared_(shared) {}
  __device__ int rank() const { return threadIdx.x; }
  __device__ int size() const { return blockDim.x; }
  __device__ void sync() const { __syncthreads(); }
  template <typename T, typename Op>
  __device__ void reduce(T* values, int count, Op op) const {
    const int n = blockDim.x, t = threadIdx.x;
    for (int j = 0; j < count; ++j) shared_[j * n + t] = static_cast<double>(values[j]);
    __syncthreads();
    for (int stride = n / 2; stride > 0; stride /= 2) {
      if (t < stride) {
        for (int j = 0; j < count; ++j) {
          shared_[j * n + t] = static_cast<double>(
              op(j, static_cast<T>(shared_[j * n + t]), static_cast<T>(shared_[j * n + t + stride])));
        }
      }
      __syncthreads();
    }
    for (int j = 0; j < count; ++j) values[j] = static_cast<T>(shared_[j * n]);
    __syncthreads();  // the buffer is reused by the next reduction
  }

 private:
  double* shared_;
};

}  // namespace cuda_detail
}  // namespace mlellp
