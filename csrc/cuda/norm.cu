// The multi-tensor norm statistic: one block per chunk writes the chunk's partial; the last block
// to finish (a ticket counter) reduces the partials in chunk order (see NormParams).
#include "device.cuh"

namespace fusedclip::cuda {
namespace {

template <NormKind kind>
__global__ void __launch_bounds__(kBlockThreads)
    norm_kernel(const __grid_constant__ TensorTable table, const __grid_constant__ NormParams params) {
  const int c = blockIdx.x;
  if (c < table.num_chunks) {  // a launch of zero-size tensors has one block and no chunk
    const double partial = chunk_partial<kind>(table, c, params.p);
    if (threadIdx.x == 0) params.chunk_partials[table.first_chunk + c] = partial;
  }
  // The last block of the launch finishes it: the fence makes this block's partial visible
  // before its ticket, so the block that draws the last ticket sees every partial.
  __shared__ bool is_last;
  if (threadIdx.x == 0) {
    __threadfence();
    is_last = atomicAdd(params.tickets + params.launch, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (is_last) {
    __threadfence();
    finish_launch<kind>(table, params);
  }
}

template <NormKind kind>
cudaError_t launch(const TensorTable& table, const NormParams& params, cudaStream_t stream) {
  const unsigned int blocks = table.num_chunks > 0 ? table.num_chunks : 1;
  norm_kernel<kind><<<blocks, kBlockThreads, 0, stream>>>(table, params);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_norm(const TensorTable& table, const NormParams& params, cudaStream_t stream) {
  return launch_for_kind(params.kind, [&](auto kind) { return launch<decltype(kind)::value>(table, params, stream); });
}

}  // namespace fusedclip::cuda
