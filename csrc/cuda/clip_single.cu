// The single-launch clip: a persistent cooperative kernel (one block per co-resident slot) that
// computes the norm, syncs the grid, finishes the norm in block 0, syncs again and scales. The
// second pass starts on the chunks each block read last, so grads that fit in L2 are read from
// L2 the second time. The chunk partials and their order of combination are those of the
// two-launch path (norm_kernel, then scale_kernel), so both give the same bits.
#include <cooperative_groups.h>

#include <atomic>

#include "device.cuh"

namespace fusedclip::cuda {
namespace {

namespace cg = cooperative_groups;

template <NormKind kind, typename Table>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm)
    clip_single_kernel(const __grid_constant__ Table table, const __grid_constant__ NormParams params) {
  const cg::grid_group grid = cg::this_grid();
  for (int c = blockIdx.x; c < table.num_chunks; c += gridDim.x) {
    const double partial = chunk_statistic<kind, false>(chunk_view(table, c), params).value;
    if (threadIdx.x == 0) params.chunk_partials[table.first_chunk + c] = partial;
  }
  grid.sync();
  if (blockIdx.x == 0) finish_launch<kind>(table, params);
  grid.sync();
  const double coef = params.acc_double ? __ldcg(static_cast<const double*>(params.coef))
                                        : __ldcg(static_cast<const float*>(params.coef));
  if (coef >= 1.0) return;
  const ScaleOp op = scale_op(coef);
  if (static_cast<int>(blockIdx.x) >= table.num_chunks) return;
  const int last = blockIdx.x + (table.num_chunks - 1 - static_cast<int>(blockIdx.x)) / gridDim.x * gridDim.x;
  for (int c = last; c >= 0; c -= gridDim.x) {
    const ChunkView chunk = chunk_view(table, c);
    transform(chunk.data, chunk.numel, chunk.dtype, op);
  }
}

template <NormKind kind, typename Table>
cudaError_t launch(const Table& table, const NormParams& params, cudaStream_t stream) {
  // Blocks per SM at full co-residency, per device, computed once (an occupancy query, no sync).
  constexpr int kMaxDevices = 64;
  static std::atomic<int> blocks_per_sm[kMaxDevices];
  static std::atomic<int> sm_count[kMaxDevices];
  int device = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error != cudaSuccess) return error;
  if (device >= kMaxDevices) return cudaErrorNotSupported;
  if (sm_count[device].load() == 0) {
    int cooperative = 0, sms = 0, blocks = 0;
    error = cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device);
    if (error == cudaSuccess) error = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (error == cudaSuccess) {
      error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, clip_single_kernel<kind, Table>, kBlockThreads, 0);
    }
    if (error != cudaSuccess) return error;
    if (!cooperative || blocks == 0) return cudaErrorNotSupported;
    blocks_per_sm[device].store(blocks);
    sm_count[device].store(sms);
  }
  const int resident = blocks_per_sm[device].load() * sm_count[device].load();
  const int blocks = table.num_chunks < 1 ? 1 : (table.num_chunks < resident ? table.num_chunks : resident);
  void* args[] = {const_cast<Table*>(&table), const_cast<NormParams*>(&params)};
  error = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(clip_single_kernel<kind, Table>), dim3(blocks),
                                      dim3(kBlockThreads), args, 0, stream);
  // The launch's own status: cudaGetLastError() could also return an earlier, unrelated error and
  // make the caller run the two-launch path on top of a kernel that was queued.
  return error;
}

}  // namespace

cudaError_t launch_clip_single(const FullTable& full, const NormParams& params, cudaStream_t stream) {
  return with_smallest_tier(full, [&](const auto& table) {
    return launch_for_kind(params.kind, [&](auto kind) { return launch<decltype(kind)::value>(table, params, stream); });
  });
}

}  // namespace fusedclip::cuda
