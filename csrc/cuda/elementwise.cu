// The in-place elementwise operators: multi_tensor_scale_ (one coefficient),
// multi_tensor_scale_per_tensor_ (one per tensor) and multi_tensor_clamp_, one block per chunk.
// The kernels, launch_scale (which the fused clip's two-launch path also runs), launch_clamp, and
// the operators' stable-ABI glue and registration.
#include "device.cuh"
#include "glue.h"

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

// tensors = min(max(tensors, lo), hi); nan stays nan.
cudaError_t launch_clamp(const FullTable& full, double lo, double hi, cudaStream_t stream) {
  const ClampOp op{static_cast<float>(lo), static_cast<float>(hi), lo, hi};
  return launch_per_chunk(full, op, stream, [](const auto& table) { return clamp_kernel<Plain<decltype(table)>>; });
}

}  // namespace

cudaError_t launch_scale(const FullTable& full, const Coef& coef, cudaStream_t stream) {
  return launch_per_chunk(full, coef, stream, [](const auto& table) { return scale_kernel<Plain<decltype(table)>>; });
}

cudaError_t kernel_image_status() {
  cudaFuncAttributes attributes;
  return cudaFuncGetAttributes(&attributes, scale_kernel<TensorTable<kSmallTier>>);
}

namespace {

// --- the operators -----------------------------------------------------------------------------

void multi_tensor_scale_(TensorList tensors, Tensor coef) {
  check_writable(tensors, "multi_tensor_scale_");
  const Coef value = scalar_arg(coef, tensors[0], "multi_tensor_scale_", "coef");
  if (value.data == nullptr && value.value >= 1.0) return;  // a CPU coef: nothing to write
  const DeviceOf device(tensors[0]);
  transform_writable(tensors, [&](const FullTable& table) { return launch_scale(table, value, device.stream); });
}

void multi_tensor_clamp_(TensorList tensors, double lo, double hi) {
  check_writable(tensors, "multi_tensor_clamp_");
  for (size_t i = 0; i < tensors.size(); ++i) {
    FUSEDCLIP_CHECK_TYPE(!is_complex(tensors[i].scalar_type()), "multi_tensor_clamp_: tensor ", i,
                         " is complex; clamping is not defined for complex values");
  }
  const DeviceOf device(tensors[0]);
  transform_writable(tensors, [&](const FullTable& table) { return launch_clamp(table, lo, hi, device.stream); });
}

void multi_tensor_scale_per_tensor_(TensorList tensors, Tensor coefs) {
  const char* op = "multi_tensor_scale_per_tensor_";
  FUSEDCLIP_CHECK_TYPE(is_floating(coefs.scalar_type()) && coefs.is_cuda(), op,
                       ": coefs must be a float CUDA tensor, got ", dtype_name(coefs.scalar_type()), " on ",
                       device_name(coefs));
  FUSEDCLIP_CHECK_VALUE(coefs.dim() == 1 && coefs.numel() == static_cast<int64_t>(tensors.size()), op,
                        ": coefs must be 1-dim with one coefficient per tensor (", tensors.size(), "), got shape ",
                        shape_name(coefs));
  if (tensors.empty()) return;
  check_writable(tensors, op);
  FUSEDCLIP_CHECK_TYPE(coefs.device() == tensors[0].device(), op, ": coefs is on ", device_name(coefs),
                       " but the tensors are on ", device_name(tensors[0]));
  const DeviceOf device(tensors[0]);
  const Tensor dense_coefs = torch::stable::contiguous(coefs);
  const Coef coef{dense_coefs.data_ptr(), dtype_of(dense_coefs.scalar_type()), 0.0, /*per_tensor=*/true};
  transform_writable(tensors, [&](const FullTable& table) { return launch_scale(table, coef, device.stream); });
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fusedclip, CUDA, m) {
  m.impl("multi_tensor_scale_", TORCH_BOX(&multi_tensor_scale_));
  m.impl("multi_tensor_clamp_", TORCH_BOX(&multi_tensor_clamp_));
  m.impl("multi_tensor_scale_per_tensor_", TORCH_BOX(&multi_tensor_scale_per_tensor_));
}

}  // namespace fusedclip::cuda
