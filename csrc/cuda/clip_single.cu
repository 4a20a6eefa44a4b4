// The fused clip: clip_grad_norm_ and clip_grad_norm_with_norms_ (which also returns the
// per-tensor norms of the same read). Each runs as the single-launch clip where it can, else as two
// launches (launch_norm through run_norm, then launch_scale).
//
// The single-launch clip: a persistent cooperative kernel (one block per co-resident slot) that
// computes the norm, syncs the grid, finishes the norm in block 0, syncs again and scales. The
// second pass starts on the chunks each block read last, so grads that fit in L2 are read from
// L2 the second time. The chunk partials and their order of combination are those of the
// two-launch path (norm_kernel, then scale_kernel), so both give the same bits.
#include <cooperative_groups.h>

#include <algorithm>
#include <atomic>
#include <tuple>

#include "device.cuh"
#include "glue.h"

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

// The single-launch clip of one call (params as for launch_norm, with one launch, total and coef
// set). The table must hold every tensor of the call and must point into the tensors themselves.
// Returns cudaErrorNotSupported where the device has no cooperative launch.
cudaError_t launch_clip_single(const FullTable& full, const NormParams& params, cudaStream_t stream) {
  return with_smallest_tier(full, [&](const auto& table) {
    return launch_for_kind(params.kind, [&](auto kind) { return launch<decltype(kind)::value>(table, params, stream); });
  });
}

// --- the operators -----------------------------------------------------------------------------

// The device's L2 size in bytes, queried once per device (an attribute read, no sync).
int64_t l2_bytes(int device) {
  static std::atomic<int64_t> cached[64];
  if (device < 0 || device >= 64) return 0;
  if (cached[device].load() == 0) {
    int bytes = 0;
    FUSEDCLIP_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrL2CacheSize, device));
    cached[device].store(std::max(bytes, 1));
  }
  return cached[device].load();
}

bool use_single_launch(const DenseTensors& dense, const Tables& tables, const TensorList& tensors) {
  int64_t limit = single_launch_max_bytes();
  if (limit < 0) limit = l2_bytes(tensors[0].get_device_index());
  return dense.bytes <= limit && tables.tables.size() == 1 && dense.direct && !any_memory_shared(tensors);
}

// The fused clip; with_norms also returns the per-tensor norms of the same read.
std::tuple<Tensor, Tensor> clip(const TensorList& tensors, double max_norm, double norm_type, bool with_norms,
                                const char* op) {
  check_writable(tensors, op);
  norm_kind(norm_type);
  const Tensor& like = tensors[0];
  const DeviceOf device(like);
  const DenseTensors dense(tensors, Access::kRead);
  const Tables tables(dense.tensors);
  NormOutputs out;
  const ScalarType acc = acc_dtype(dense.acc_double);
  out.statistic = empty_on(like, {}, acc);
  out.total = empty_on(like, {}, acc);
  out.coef = empty_on(like, {}, acc);
  // The second result: the per-tensor norms, or an undefined tensor (clip_grad_norm_ returns the
  // total only).
  if (with_norms) out.per_tensor = empty_on(like, {static_cast<int64_t>(tensors.size())}, acc);
  NormParams params = norm_params(dense, norm_type, out, max_norm);
  params.per_tensor_roots = with_norms;

  if (use_single_launch(dense, tables, tensors)) {
    NormParams single = params;
    NormScratch scratch(tables.num_chunks, 1, like, device.stream, single, /*zero_counters=*/false);
    single.launch = 0;
    single.num_launches = 1;
    const cudaError_t error = launch_clip_single(tables.tables[0], single, device.stream);
    if (error == cudaSuccess) return {out.total, out.per_tensor};
    // Only "no cooperative launch here" falls back to two launches; anything else is an error.
    if (error != cudaErrorNotSupported && error != cudaErrorCooperativeLaunchTooLarge) {
      check_cuda(error, "launch_clip_single");
    }
    (void)cudaGetLastError();
  }

  run_norm(tables, params, like, device.stream);
  const Coef coef{out.coef.data_ptr(), dense.acc_double ? DType::kFloat64 : DType::kFloat32, 0.0, false};
  if (dense.direct && !any_memory_shared(tensors)) {
    for (const FullTable& table : tables.tables) FUSEDCLIP_CUDA_CHECK(launch_scale(table, coef, device.stream));
  } else {
    transform_writable(tensors, [&](const FullTable& table) { return launch_scale(table, coef, device.stream); });
  }
  return {out.total, out.per_tensor};
}

Tensor clip_grad_norm_(TensorList tensors, double max_norm, double norm_type) {
  return std::get<0>(clip(tensors, max_norm, norm_type, false, "clip_grad_norm_"));
}

std::tuple<Tensor, Tensor> clip_grad_norm_with_norms_(TensorList tensors, double max_norm, double norm_type) {
  return clip(tensors, max_norm, norm_type, true, "clip_grad_norm_with_norms_");
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fusedclip, CUDA, m) {
  m.impl("clip_grad_norm_", TORCH_BOX(&clip_grad_norm_));
  m.impl("clip_grad_norm_with_norms_", TORCH_BOX(&clip_grad_norm_with_norms_));
}

}  // namespace fusedclip::cuda
