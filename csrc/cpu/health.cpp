// CPU kernel of clip_grad_norm_with_norms_ (schema in csrc/fusedclip.cpp): the fused clip, also
// returning the per-tensor norms that the norm pass reduces on the way to the total.
#include "kernels.h"

#include <torch/library.h>

namespace fusedclip::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> clip_grad_norm_with_norms_(at::TensorList tensors, double max_norm,
                                                              double norm_type) {
  check_norm_type(norm_type);
  check_writable(tensors, "clip_grad_norm_with_norms_");
  const TensorTable table(tensors, Access::kRead);
  const auto [statistic, per_statistic] = norm_statistic(table, norm_type, true);
  at::Tensor total = total_norm_from_statistic(statistic, norm_type, table.numel() == 0);
  scale_writable(tensors, clip_coefficient(total, max_norm).item<double>(), &table);
  // The statistic of no elements is the identity, whose root is not 0 for p = -inf or p < 0.
  at::Tensor per = total_norm_from_statistic(per_statistic, norm_type, false);
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].numel() == 0) per.select(0, static_cast<int64_t>(i)).zero_();
  }
  return {total, per};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedclip, CPU, m) {
  m.impl("clip_grad_norm_with_norms_", &clip_grad_norm_with_norms_);
}

}  // namespace fusedclip::cpu
