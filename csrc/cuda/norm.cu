// The multi-tensor norm statistic (and, with params.unscale, multi_tensor_unscale_norm's statistic
// of x * inv_scale and its found_inf): one block per chunk writes the chunk's partial; the last
// block to finish (a ticket counter) reduces the partials in chunk order (see NormParams).
#include "device.cuh"

namespace fusedclip::cuda {
namespace {

template <NormKind kind, bool kUnscale, int kCapacity>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm)
    norm_kernel(const __grid_constant__ TensorTable<kCapacity> table, const __grid_constant__ NormParams params) {
  const int c = blockIdx.x;
  if (c < table.num_chunks) {  // a launch of zero-size tensors has one block and no chunk
    const BlockStatistic chunk = chunk_statistic<kind, kUnscale>(chunk_view(table, c), params);
    if (threadIdx.x == 0) {
      params.chunk_partials[table.first_chunk + c] = chunk.value;
      // An integer OR: the same result in any order.
      if (kUnscale && chunk.non_finite) atomicOr(params.non_finite, 1u);
    }
  }
  if (is_last_block(params)) finish_launch<kind>(table, params);
}

template <NormKind kind, bool kUnscale, typename Table>
cudaError_t launch(const Table& table, const NormParams& params, cudaStream_t stream) {
  const unsigned int blocks = table.num_chunks > 0 ? table.num_chunks : 1;
  norm_kernel<kind, kUnscale><<<blocks, kBlockThreads, 0, stream>>>(table, params);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_norm(const FullTable& full, const NormParams& params, cudaStream_t stream) {
  return with_smallest_tier(full, [&](const auto& table) {
    return launch_for_kind(params.kind, [&](auto kind) {
      return params.unscale ? launch<decltype(kind)::value, true>(table, params, stream)
                            : launch<decltype(kind)::value, false>(table, params, stream);
    });
  });
}

}  // namespace fusedclip::cuda
