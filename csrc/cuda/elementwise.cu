// In-place multi-tensor scale (one coefficient, or one per tensor) and clamp: one block per chunk.
#include "device.cuh"

namespace fusedclip::cuda {
namespace {

// Every block reads its coefficient first and returns at once when it is >= 1 (a nan coefficient
// scales, as torch's multiply would).
template <typename Table>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm)
    scale_kernel(const __grid_constant__ Table table, const Coef coef) {
  const ChunkView chunk = chunk_view(table, blockIdx.x);
  const double value = read_coef(coef, coef.per_tensor ? table.first_tensor + chunk.tensor : 0);
  if (value >= 1.0) return;
  transform(chunk.data, chunk.numel, chunk.dtype, scale_op(value));
}

template <typename Table>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm)
    clamp_kernel(const __grid_constant__ Table table, const ClampOp op) {
  const ChunkView chunk = chunk_view(table, blockIdx.x);
  transform(chunk.data, chunk.numel, chunk.dtype, op);
}

// kernel_of(table)<<<one block per chunk>>>(table, arg) for the smallest tier of full.
template <typename Arg, typename KernelOf>
cudaError_t launch_per_chunk(const FullTable& full, const Arg& arg, cudaStream_t stream, const KernelOf& kernel_of) {
  if (full.num_chunks == 0) return cudaSuccess;
  return with_smallest_tier(full, [&](const auto& table) {
    kernel_of(table)<<<table.num_chunks, kBlockThreads, 0, stream>>>(table, arg);
    return cudaGetLastError();
  });
}

template <typename Table> using Plain = std::remove_cv_t<std::remove_reference_t<Table>>;

}  // namespace

cudaError_t launch_scale(const FullTable& full, const Coef& coef, cudaStream_t stream) {
  return launch_per_chunk(full, coef, stream, [](const auto& table) { return scale_kernel<Plain<decltype(table)>>; });
}

cudaError_t launch_clamp(const FullTable& full, double lo, double hi, cudaStream_t stream) {
  const ClampOp op{static_cast<float>(lo), static_cast<float>(hi), lo, hi};
  return launch_per_chunk(full, op, stream, [](const auto& table) { return clamp_kernel<Plain<decltype(table)>>; });
}

cudaError_t kernel_image_status() {
  cudaFuncAttributes attributes;
  return cudaFuncGetAttributes(&attributes, scale_kernel<TensorTable<kSmallTier>>);
}

}  // namespace fusedclip::cuda
