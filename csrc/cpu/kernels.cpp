// CPU kernels of the fusedclip operators (the building blocks are in kernels.h).
#include "kernels.h"

#include <torch/library.h>

namespace fusedclip::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> multi_tensor_norm(at::TensorList tensors, double norm_type,
                                                     bool per_tensor) {
  check_norm_type(norm_type);
  const TensorTable table(tensors, Access::kRead, "multi_tensor_norm");
  return norm_statistic(table, norm_type, per_tensor);
}

void multi_tensor_scale_(at::TensorList tensors, const at::Tensor& coef) {
  check_scalar(coef, "multi_tensor_scale_", "coef");
  check_writable(tensors, "multi_tensor_scale_", at::kCPU);
  scale_writable(tensors, coef.item<double>(), "multi_tensor_scale_");  // a CPU tensor: reading it is no device sync
}

void multi_tensor_clamp_(at::TensorList tensors, double lo, double hi) {
  check_writable(tensors, "multi_tensor_clamp_", at::kCPU);
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK_TYPE(!tensors[i].is_complex(), "fusedclip.multi_tensor_clamp_: tensor ", i,
                     " is complex; clamping is not defined for complex values");
  }
  transform_writable(tensors, ClampOp{lo, hi}, "multi_tensor_clamp_");
}

at::Tensor clip_grad_norm_(at::TensorList tensors, double max_norm, double norm_type) {
  check_norm_type(norm_type);
  check_writable(tensors, "clip_grad_norm_", at::kCPU);
  const TensorTable table(tensors, Access::kRead, "clip_grad_norm_");
  const at::Tensor statistic = std::get<0>(norm_statistic(table, norm_type, false));
  const at::Tensor total = rescaled_if_overflowed(
      table, total_norm_from_statistic(statistic, norm_type, table.numel() == 0), norm_type);
  scale_writable(tensors, clip_coefficient(total, max_norm), "clip_grad_norm_", &table);
  return total;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedclip, CPU, m) {
  m.impl("multi_tensor_norm", &multi_tensor_norm);
  m.impl("multi_tensor_scale_", &multi_tensor_scale_);
  m.impl("multi_tensor_clamp_", &multi_tensor_clamp_);
  m.impl("clip_grad_norm_", &clip_grad_norm_);
}

}  // namespace fusedclip::cpu
