// The CPU kernels of multi_tensor_norm, multi_tensor_scale_, multi_tensor_clamp_ and
// clip_grad_norm_ (schemas in fusedclip/operators.py), and the building blocks of kernels.h.
#include "kernels.h"

namespace fusedclip::cpu {

std::tuple<Tensor, Tensor> norm_statistic(const TensorTable& table, double norm_type, bool per_tensor) {
  const NormKind kind = norm_kind(norm_type);
  StatisticKernel* const statistic = statistic_kernel.chosen();
  const auto& segments = table.segments();
  std::vector<double> partial(segments.size());
  parallel_over_chunks(table.num_chunks(), [&](int64_t begin, int64_t end) {
    for_each_segment(table, begin, end, table.memory_descending(), [&](int64_t s) {
      partial[s] = statistic(kind, segments[s], norm_type);
    });
  });
  double total = identity_of(kind);
  for (double value : partial) total = combine(kind, total, value);

  const ScalarType acc = table.accumulate_dtype();
  Tensor per = torch::stable::empty({per_tensor ? table.num_tensors() : 0}, acc);
  if (per_tensor) {
    std::vector<double> by_tensor(table.num_tensors(), identity_of(kind));
    for (size_t s = 0; s < segments.size(); ++s) {
      by_tensor[segments[s].tensor] = combine(kind, by_tensor[segments[s].tensor], partial[s]);
    }
    if (acc == ScalarType::Double) {
      auto* out = static_cast<double*>(per.mutable_data_ptr());
      for (int64_t i = 0; i < table.num_tensors(); ++i) out[i] = by_tensor[i];
    } else {
      auto* out = static_cast<float*>(per.mutable_data_ptr());
      for (int64_t i = 0; i < table.num_tensors(); ++i) out[i] = static_cast<float>(by_tensor[i]);
    }
  }
  return {cpu_scalar(total, acc), per};
}

Tensor total_norm_from_statistic(const Tensor& statistic, double norm_type, bool empty) {
  const double value = cpu_value(statistic);
  const ScalarType dtype = statistic.scalar_type();
  const NormKind kind = norm_kind(norm_type);
  if (dtype == ScalarType::Double) {
    switch (kind) {
      case NormKind::kSquareSum: return cpu_scalar(root_of_statistic<NormKind::kSquareSum>(value, norm_type, empty), dtype);
      case NormKind::kPowerSum: return cpu_scalar(root_of_statistic<NormKind::kPowerSum>(value, norm_type, empty), dtype);
      default: return cpu_scalar(empty ? 0.0 : value, dtype);
    }
  }
  const float single = static_cast<float>(value);
  switch (kind) {
    case NormKind::kSquareSum: return cpu_scalar(root_of_statistic<NormKind::kSquareSum>(single, norm_type, empty), dtype);
    case NormKind::kPowerSum: return cpu_scalar(root_of_statistic<NormKind::kPowerSum>(single, norm_type, empty), dtype);
    default: return cpu_scalar(empty ? 0.0f : single, dtype);
  }
}

Tensor rescaled_if_overflowed(const TensorTable& table, const Tensor& total, double norm_type) {
  if (!norm_out_of_range(cpu_value(total), norm_type)) return total;
  const double pivot = cpu_value(std::get<0>(norm_statistic(table, pivot_norm_type(norm_type), false)));
  const bool wide = total.scalar_type() == ScalarType::Double;
  const double inv_scale = wide ? 1.0 / pivot : static_cast<float>(1.0 / pivot);
  // A pivot of 0 (p < 0 with an element of 0: the norm is 0), inf or nan, or whose reciprocal is
  // beyond float32 (a min|x| below 2.9e-39) leaves the norm as it is.
  if (!(std::isfinite(pivot) && pivot > 0 && std::isfinite(inv_scale))) return total;
  const double scaled = cpu_value(std::get<0>(unscaled_statistic(table, norm_type, inv_scale)));
  return cpu_scalar(rescaled_norm(pivot, scaled, norm_type), total.scalar_type());
}

double clip_coefficient(const Tensor& total, double max_norm) {
  if (total.scalar_type() == ScalarType::Double) return fusedclip::clip_coefficient(cpu_value(total), max_norm);
  return fusedclip::clip_coefficient(static_cast<float>(cpu_value(total)), max_norm);
}

namespace {

std::tuple<Tensor, Tensor> multi_tensor_norm(TensorListArg& tensors, double norm_type, bool per_tensor) {
  check_norm_type(norm_type);
  const TensorMetaList meta = checked_meta(tensors, "multi_tensor_norm", DeviceType::CPU, false, true);
  const TensorTable table(tensors, meta, Access::kRead);
  return norm_statistic(table, norm_type, per_tensor);
}

void multi_tensor_scale_(TensorListArg& tensors, const Tensor& coef) {
  check_scalar(coef, "multi_tensor_scale_", "coef");
  FUSEDCLIP_CHECK_TYPE(coef.is_cpu(), "multi_tensor_scale_: coef must be a CPU tensor for CPU tensors, got one on ",
                       device_name(coef));
  // check_writable, reading each tensor's metadata once for the scale too.
  const TensorMetaList meta = checked_meta(tensors, "multi_tensor_scale_", DeviceType::CPU, true, true);
  scale_checked(meta, tensor_of(tensors), cpu_value(coef));
}

void multi_tensor_clamp_(TensorListArg& tensors, double lo, double hi) {
  const TensorMetaList meta = checked_meta(tensors, "multi_tensor_clamp_", DeviceType::CPU, true, true);
  for (size_t i = 0; i < meta.size(); ++i) {
    FUSEDCLIP_CHECK_TYPE(!is_complex(meta[i].dtype), "multi_tensor_clamp_: tensor ", i,
                         " is complex; clamping is not defined for complex values");
  }
  ClampKernel* const clamp = clamp_kernel.chosen();
  transform_checked(meta, tensor_of(tensors), [clamp, lo, hi](const Segment& s) { clamp(s, lo, hi); });
}

Tensor clip_grad_norm_(TensorListArg& tensors, double max_norm, double norm_type) {
  check_norm_type(norm_type);
  // check_writable, the table and the scale from one read of each tensor's metadata.
  const TensorMetaList meta = checked_meta(tensors, "clip_grad_norm_", DeviceType::CPU, true, true);
  const TensorTable table(tensors, meta, Access::kRead);
  const Tensor statistic = std::get<0>(norm_statistic(table, norm_type, false));
  const Tensor total =
      rescaled_if_overflowed(table, total_norm_from_statistic(statistic, norm_type, table.numel() == 0), norm_type);
  scale_checked(meta, tensor_of(tensors), clip_coefficient(total, max_norm), &table);
  return total;
}

// The boxed kernels: TORCH_BOX's, but for the Tensor[] argument (see TensorListArg).
using torch::stable::detail::from;
using torch::stable::detail::to;

void multi_tensor_norm_boxed(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  check_arity(num_args, 3, num_outputs, 2);
  TensorListArg tensors(stack[0]);
  const auto [total, per] = multi_tensor_norm(tensors, to<double>(stack[1]), to<bool>(stack[2]));
  stack[0] = from(total);
  stack[1] = from(per);
}

void multi_tensor_scale_boxed(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  check_arity(num_args, 2, num_outputs, 0);
  TensorListArg tensors(stack[0]);
  const Tensor coef = to<Tensor>(stack[1]);
  multi_tensor_scale_(tensors, coef);
}

void multi_tensor_clamp_boxed(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  check_arity(num_args, 3, num_outputs, 0);
  TensorListArg tensors(stack[0]);
  multi_tensor_clamp_(tensors, to<double>(stack[1]), to<double>(stack[2]));
}

void clip_grad_norm_boxed(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  check_arity(num_args, 3, num_outputs, 1);
  TensorListArg tensors(stack[0]);
  stack[0] = from(clip_grad_norm_(tensors, to<double>(stack[1]), to<double>(stack[2])));
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fusedclip, CPU, m) {
  m.impl("multi_tensor_norm", &multi_tensor_norm_boxed);
  m.impl("multi_tensor_scale_", &multi_tensor_scale_boxed);
  m.impl("multi_tensor_clamp_", &multi_tensor_clamp_boxed);
  m.impl("clip_grad_norm_", &clip_grad_norm_boxed);
}

}  // namespace fusedclip::cpu
