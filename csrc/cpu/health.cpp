// CPU kernel of clip_grad_norm_with_norms_ (schema in fusedclip/operators.py): the fused clip, also
// returning the per-tensor norms that the norm pass reduces on the way to the total.
#include "kernels.h"

#include <cmath>
#include <type_traits>

namespace fusedclip::cpu {
namespace {

// The norms from per-tensor statistics, root by root in a plain loop: ATen's sqrt and pow of a few
// thousand elements enter a parallel region, which costs a scheduler time slice (milliseconds) on
// a busy machine. A tensor with no elements has norm 0 for every p (the root of the identity is
// not 0 for p = -inf or p < 0). sqrt in float64 then rounded to float32 is float32's sqrt.
// A norm whose sum left the accumulator's range is taken again, of that tensor alone
// (rescaled_if_overflowed).
template <typename T, typename TensorAt>
void take_roots(T* value, const TensorMetaList& meta, const TensorAt& tensor_at, double norm_type) {
  constexpr ScalarType dtype = std::is_same_v<T, double> ? ScalarType::Double : ScalarType::Float;
  const bool is_root = !(norm_type == 0.0 || norm_type == 1.0 || std::isinf(norm_type));
  for (size_t i = 0; i < meta.size(); ++i) {
    if (meta[i].numel == 0) {
      value[i] = T(0);
    } else if (norm_type == 2.0) {
      value[i] = static_cast<T>(std::sqrt(static_cast<double>(value[i])));
    } else if (is_root) {
      value[i] = static_cast<T>(std::pow(static_cast<double>(value[i]), 1.0 / norm_type));
    }
    if (meta[i].numel != 0 && fusedclip::norm_out_of_range(static_cast<double>(value[i]), norm_type)) {
      const TensorTable one(TensorMetaList{meta[i]}, Access::kRead,
                            [&tensor_at, i](size_t) -> const Tensor& { return tensor_at(i); });
      const Tensor norm = cpu_scalar(static_cast<double>(value[i]), dtype);
      value[i] = static_cast<T>(cpu_value(rescaled_if_overflowed(one, norm, norm_type)));
    }
  }
}

// In place on the statistics, which the norm pass returned as a new contiguous tensor: no copy and
// no conversion on the per-step path of a GradientMonitor.
template <typename TensorAt>
Tensor per_tensor_roots(const Tensor& statistics, const TensorMetaList& meta, const TensorAt& tensor_at,
                        double norm_type) {
  if (!(statistics.is_contiguous() && statistics.numel() == static_cast<int64_t>(meta.size()))) {
    fail("clip_grad_norm_with_norms_: the per-tensor statistics are not a contiguous tensor of one entry per "
         "tensor (internal error)");
  }
  if (statistics.scalar_type() == ScalarType::Double) {
    take_roots(static_cast<double*>(statistics.mutable_data_ptr()), meta, tensor_at, norm_type);
  } else {
    take_roots(static_cast<float*>(statistics.mutable_data_ptr()), meta, tensor_at, norm_type);
  }
  return statistics;
}

std::tuple<Tensor, Tensor> clip_grad_norm_with_norms_(TensorListArg& tensors, double max_norm, double norm_type) {
  check_norm_type(norm_type);
  // check_writable, the table, the roots and the scale from one read of each tensor's metadata.
  const TensorMetaList meta = checked_meta(tensors, "clip_grad_norm_with_norms_", DeviceType::CPU, true, true);
  const TensorTable table(tensors, meta, Access::kRead);
  const auto [statistic, per_statistic] = norm_statistic(table, norm_type, true);
  const Tensor total = rescaled_if_overflowed(
      table, total_norm_from_statistic(statistic, norm_type, table.numel() == 0), norm_type);
  // The roots before the scale: an overflowed norm is taken again of its tensor as it was.
  const Tensor per_tensor = per_tensor_roots(per_statistic, meta, tensor_of(tensors), norm_type);
  scale_checked(meta, tensor_of(tensors), clip_coefficient(total, max_norm), &table);
  return {total, per_tensor};
}

// TORCH_BOX's boxing, but for the Tensor[] argument (see TensorListArg).
void clip_grad_norm_with_norms_boxed(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  check_arity(num_args, 3, num_outputs, 2);
  TensorListArg tensors(stack[0]);
  const auto [total, per] = clip_grad_norm_with_norms_(tensors, torch::stable::detail::to<double>(stack[1]),
                                                       torch::stable::detail::to<double>(stack[2]));
  stack[0] = torch::stable::detail::from(total);
  stack[1] = torch::stable::detail::from(per);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fusedclip, CPU, m) {
  m.impl("clip_grad_norm_with_norms_", &clip_grad_norm_with_norms_boxed);
}

}  // namespace fusedclip::cpu
