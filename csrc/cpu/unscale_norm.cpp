// CPU kernel of fusedclip::multi_tensor_unscale_norm: the norm statistic of x * inv_scale and
// whether any x is non-finite, in one read of the tensors. With it a GradScaler's unscale_ and the
// clipping norm share one pass; the scale by inv_scale * coef is then one multi_tensor_scale_.
#include "kernels.h"

namespace fusedclip::cpu {

// As norm_statistic: segment statistics in parallel over chunks, combined in segment order.
std::tuple<Tensor, Tensor> unscaled_statistic(const TensorTable& table, double norm_type, double inv_scale) {
  const NormKind kind = norm_kind(norm_type);
  UnscaledStatisticKernel* const statistic = unscaled_statistic_kernel.chosen();
  const auto& segments = table.segments();
  std::vector<double> partial(segments.size());
  std::vector<char> non_finite(segments.size());
  parallel_over_chunks(table.num_chunks(), [&](int64_t begin, int64_t end) {
    for_each_segment(table, begin, end, table.memory_descending(), [&](int64_t s) {
      bool found = false;
      partial[s] = statistic(kind, segments[s], norm_type, inv_scale, &found);
      non_finite[s] = found ? 1 : 0;
    });
  });
  double total = identity_of(kind);
  bool found = false;
  for (size_t s = 0; s < segments.size(); ++s) {
    total = combine(kind, total, partial[s]);
    found |= non_finite[s] != 0;
  }
  return {cpu_scalar(total, table.accumulate_dtype()), cpu_scalar(found ? 1.0 : 0.0, ScalarType::Float)};
}

namespace {

std::tuple<Tensor, Tensor> multi_tensor_unscale_norm(TensorListArg& tensors, const Tensor& inv_scale,
                                                     double norm_type) {
  check_norm_type(norm_type);
  check_scalar(inv_scale, "multi_tensor_unscale_norm", "inv_scale");
  FUSEDCLIP_CHECK_TYPE(inv_scale.is_cpu(), "multi_tensor_unscale_norm: inv_scale must be a CPU tensor for CPU ",
                       "tensors, got one on ", device_name(inv_scale));
  const TensorMetaList meta = checked_meta(tensors, "multi_tensor_unscale_norm", DeviceType::CPU, false, true);
  const TensorTable table(tensors, meta, Access::kRead);
  return unscaled_statistic(table, norm_type, cpu_value(inv_scale));
}

// TORCH_BOX's boxing, but for the Tensor[] argument (see TensorListArg).
void multi_tensor_unscale_norm_boxed(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  check_arity(num_args, 3, num_outputs, 2);
  TensorListArg tensors(stack[0]);
  const Tensor inv_scale = torch::stable::detail::to<Tensor>(stack[1]);
  const auto [statistic, found_inf] =
      multi_tensor_unscale_norm(tensors, inv_scale, torch::stable::detail::to<double>(stack[2]));
  stack[0] = torch::stable::detail::from(statistic);
  stack[1] = torch::stable::detail::from(found_inf);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fusedclip, CPU, m) {
  m.impl("multi_tensor_unscale_norm", &multi_tensor_unscale_norm_boxed);
}

}  // namespace fusedclip::cpu
