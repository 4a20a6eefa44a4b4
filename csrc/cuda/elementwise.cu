// In-place multi-tensor scale and clamp: one block per chunk.
#include "device.cuh"

namespace fusedclip::cuda {
namespace {

// Every block reads the coefficient first and returns at once when it is >= 1 (a nan coefficient
// scales, as torch's multiply would).
__global__ void __launch_bounds__(kBlockThreads)
    scale_kernel(const __grid_constant__ TensorTable table, const Coef coef) {
  const double value = read_coef(coef);
  if (value >= 1.0) return;
  transform_chunk(table, blockIdx.x, scale_op(value));
}

__global__ void __launch_bounds__(kBlockThreads)
    clamp_kernel(const __grid_constant__ TensorTable table, const ClampOp op) {
  transform_chunk(table, blockIdx.x, op);
}

}  // namespace

cudaError_t launch_scale(const TensorTable& table, const Coef& coef, cudaStream_t stream) {
  if (table.num_chunks == 0) return cudaSuccess;
  scale_kernel<<<table.num_chunks, kBlockThreads, 0, stream>>>(table, coef);
  return cudaGetLastError();
}

cudaError_t launch_clamp(const TensorTable& table, double lo, double hi, cudaStream_t stream) {
  if (table.num_chunks == 0) return cudaSuccess;
  const ClampOp op{static_cast<float>(lo), static_cast<float>(hi), lo, hi};
  clamp_kernel<<<table.num_chunks, kBlockThreads, 0, stream>>>(table, op);
  return cudaGetLastError();
}

cudaError_t kernel_image_status() {
  cudaFuncAttributes attributes;
  return cudaFuncGetAttributes(&attributes, scale_kernel);
}

}  // namespace fusedclip::cuda
