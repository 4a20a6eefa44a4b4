// The operators of the multi-tensor norm: multi_tensor_norm (the statistic, and per-tensor
// statistics) and multi_tensor_unscale_norm (with params.unscale: the statistic of x * inv_scale
// and its found_inf). One block per chunk writes the chunk's partial; the last block to finish (a
// ticket counter) reduces the partials in chunk order (see NormParams). The kernel, launch_norm
// (which the fused clip's two-launch path also runs, through run_norm of glue.h), and the
// operators' stable-ABI glue and registration.
#include <cmath>
#include <optional>
#include <tuple>

#include "device.cuh"
#include "glue.h"

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

namespace {

// --- the operators -----------------------------------------------------------------------------

std::tuple<Tensor, Tensor> multi_tensor_norm(TensorList tensors, double norm_type, bool per_tensor) {
  check_inputs(tensors, "multi_tensor_norm");
  norm_kind(norm_type);
  const DeviceOf device(tensors[0]);
  const DenseTensors dense(tensors, Access::kRead);
  const ScalarType acc = acc_dtype(dense.acc_double);
  NormOutputs out;
  out.statistic = empty_on(tensors[0], {}, acc);
  out.per_tensor = empty_on(tensors[0], {per_tensor ? static_cast<int64_t>(tensors.size()) : 0}, acc);
  run_norm(Tables(dense.tensors), norm_params(dense, norm_type, out, 0.0), tensors[0], device.stream);
  return {out.statistic, out.per_tensor};
}

std::tuple<Tensor, Tensor> multi_tensor_unscale_norm(TensorList tensors, Tensor inv_scale, double norm_type) {
  const char* op = "multi_tensor_unscale_norm";
  const NormKind kind = norm_kind(norm_type);
  check_scalar(inv_scale, op, "inv_scale");
  if (tensors.empty()) {  // reached through a CUDA inv_scale: the statistic of no elements
    return {torch::stable::full({}, kind == NormKind::kMin ? INFINITY : 0.0, ScalarType::Float, std::nullopt,
                                inv_scale.device()),
            torch::stable::new_zeros(inv_scale, {}, ScalarType::Float)};
  }
  check_inputs(tensors, op);
  const Tensor& like = tensors[0];
  const Coef inv = scalar_arg(inv_scale, like, op, "inv_scale");
  const DeviceOf device(like);
  const DenseTensors dense(tensors, Access::kRead);
  NormOutputs out;
  out.statistic = empty_on(like, {}, acc_dtype(dense.acc_double));
  Tensor found_inf = empty_on(like, {}, ScalarType::Float);
  NormParams params = norm_params(dense, norm_type, out, 0.0);
  params.unscale = true;
  params.inv_scale = inv;
  params.found_inf = static_cast<float*>(found_inf.data_ptr());
  run_norm(Tables(dense.tensors), params, like, device.stream);
  return {out.statistic, found_inf};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fusedclip, CUDA, m) {
  m.impl("multi_tensor_norm", TORCH_BOX(&multi_tensor_norm));
  m.impl("multi_tensor_unscale_norm", TORCH_BOX(&multi_tensor_unscale_norm));
}

}  // namespace fusedclip::cuda
