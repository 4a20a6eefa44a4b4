// CPU kernel of fusedclip::multi_tensor_unscale_norm: the norm statistic of x * inv_scale and
// whether any x is non-finite, in one read of the tensors. With it a GradScaler's unscale_ and the
// clipping norm share one pass; the scale by inv_scale * coef is then one multi_tensor_scale_.
#include "kernels.h"

namespace fusedclip::cpu {

// As norm_statistic: segment statistics in parallel over chunks, combined in segment order.
std::tuple<Tensor, Tensor> unscaled_statistic(const TensorTable& table, double norm_type, double inv_scale) {
  const NormKind kind = norm_kind(norm_type);
  const SegmentKernels& kernels = segment_kernels();
  const auto& segments = table.segments();
  std::vector<double> partial(segments.size());
  std::vector<char> non_finite(segments.size());
  parallel_over_chunks(table.num_chunks(), [&](int64_t begin, int64_t end) {
    for_each_segment(table, begin, end, table.memory_descending(), [&](int64_t s) {
      bool found = false;
      partial[s] = kernels.unscaled_statistic(kind, segments[s], norm_type, inv_scale, &found);
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

std::tuple<Tensor, Tensor> multi_tensor_unscale_norm(TensorList tensors, Tensor inv_scale, double norm_type) {
  check_norm_type(norm_type);
  check_scalar(inv_scale, "multi_tensor_unscale_norm", "inv_scale");
  FUSEDCLIP_CHECK_TYPE(inv_scale.is_cpu(), "multi_tensor_unscale_norm: inv_scale must be a CPU tensor for CPU ",
                       "tensors, got one on ", device_name(inv_scale));
  const TensorTable table(tensors, Access::kRead, "multi_tensor_unscale_norm");
  return unscaled_statistic(table, norm_type, cpu_value(inv_scale));
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fusedclip, CPU, m) {
  m.impl("multi_tensor_unscale_norm", TORCH_BOX(&multi_tensor_unscale_norm));
}

}  // namespace fusedclip::cpu
