// CPU kernels of the operators behind adaptive clipping: unit-wise AGC and a per-tensor scale
// (schemas in fusedclip/operators.py; the building blocks are in kernels.h).
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace fusedclip::cpu {
namespace {

// One AGC unit: a row (the slice along dim 0) of a parameter and of its gradient, or the whole
// tensor when it has at most one dimension, as timm's unitwise_norm defines units.
struct Unit {
  Segment param;
  Segment grad;
};

// Clips one unit in place; returns the sum of squares of its gradient before clipping.
// W* = clip_factor * max(||W||, eps); when not ||G|| < W*, G *= W* / max(||G||, 1e-6). A nan
// norm fails the comparison, so a nan gradient is scaled by nan, as timm's torch.where does.
double clip_unit(StatisticKernel* statistic, ScaleKernel* scale, const Unit& unit, double clip_factor, double eps) {
  const double param_sq = statistic(NormKind::kSquareSum, unit.param, 2.0);
  const double grad_sq = statistic(NormKind::kSquareSum, unit.grad, 2.0);
  double coef = 1.0;
  if (agc_scales(grad_sq, param_sq, clip_factor, eps, &coef)) {  // the rule of csrc/numerics.h
    // The row was just read: the scale runs from the cache, so the gradient is read from memory
    // once and written once.
    scale(unit.grad, coef);
  }
  return grad_sq;
}

// Clips gradients [first, last) of the list in one parallel pass over runs of whole units, and
// adds each unit's sum of squares to total and to per[its tensor], in unit order: the same bits
// for any thread count.
void clip_pass(const TensorList& grads, const TensorList& params, size_t first, size_t last,
               double clip_factor, double eps, std::vector<double>& per, double& total) {
  // Units are rows of the row-major layout: other layouts go through contiguous temporaries.
  std::vector<Tensor> keep_alive;
  std::vector<std::pair<Tensor, Tensor>> write_back;  // (gradient, contiguous copy)
  std::vector<Unit> units;
  std::vector<int64_t> task_end;  // tasks are runs of whole units of about one chunk
  int64_t task_numel = 0;
  for (size_t i = first; i < last; ++i) {
    if (grads[i].numel() == 0) continue;
    // contiguous() returns the tensor itself when it is contiguous: a copy is made (and written
    // back) only otherwise.
    const bool grad_contiguous = grads[i].is_contiguous();
    Tensor grad = grad_contiguous ? grads[i] : torch::stable::contiguous(grads[i]);
    if (!grad_contiguous) write_back.emplace_back(grads[i], grad);
    const Tensor param = params[i].is_contiguous() ? params[i] : torch::stable::contiguous(params[i]);
    keep_alive.push_back(grad);
    keep_alive.push_back(param);
    const int64_t rows = grad.dim() > 1 ? grad.size(0) : 1;
    const int64_t row_numel = grad.numel() / rows;
    auto* grad_data = static_cast<char*>(grad.mutable_data_ptr());
    // Only read: const_cast for the Segment, which the statistic kernel does not write through.
    auto* param_data = static_cast<char*>(const_cast<void*>(param.const_data_ptr()));
    const auto grad_element_size = static_cast<int64_t>(grad.element_size());
    const auto param_element_size = static_cast<int64_t>(param.element_size());
    const DType grad_dtype = dtype_of(grad);
    const DType param_dtype = dtype_of(param);
    for (int64_t r = 0; r < rows; ++r) {
      if (task_numel > 0 && task_numel + row_numel > kChunkElements) {
        task_end.push_back(static_cast<int64_t>(units.size()));
        task_numel = 0;
      }
      const auto tensor = static_cast<int64_t>(i);
      units.push_back({{param_data + r * row_numel * param_element_size, row_numel, tensor, param_dtype},
                       {grad_data + r * row_numel * grad_element_size, row_numel, tensor, grad_dtype}});
      task_numel += row_numel;
    }
  }
  if (task_numel > 0) task_end.push_back(static_cast<int64_t>(units.size()));

  StatisticKernel* const statistic = statistic_kernel.chosen();
  ScaleKernel* const scale = scale_kernel.chosen();
  std::vector<double> unit_sq(units.size());
  parallel_over_chunks(static_cast<int64_t>(task_end.size()), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t u = t == 0 ? 0 : task_end[t - 1]; u < task_end[t]; ++u) {
        unit_sq[u] = clip_unit(statistic, scale, units[u], clip_factor, eps);
      }
    }
  });
  for (auto& [original, dense] : write_back) torch::stable::copy_(original, dense);

  for (size_t u = 0; u < units.size(); ++u) {
    total += unit_sq[u];
    per[units[u].grad.tensor] += unit_sq[u];
  }
}

std::tuple<Tensor, Tensor> multi_tensor_agc_(TensorList grads, TensorList params, double clip_factor, double eps) {
  // A parameter may have another dtype than its gradient (torch allows it through grad_dtype):
  // each segment is read in its own dtype.
  check_agc_arguments(grads, params, clip_factor, eps, DeviceType::CPU);
  ScalarType acc = ScalarType::Float;
  for (const Tensor& g : grads) {
    if (g.scalar_type() == ScalarType::Double) acc = ScalarType::Double;
  }

  const auto num_tensors = static_cast<int64_t>(grads.size());
  std::vector<double> per(num_tensors, 0.0);
  double total = 0.0;
  if (any_memory_shared(grads)) {
    // Gradients that share memory are clipped one tensor at a time in list order, as torch's
    // per-tensor loop clips them: each tensor's contiguous temporary is written back before the
    // next tensor is read, so a later occurrence sees the earlier clips and none is undone.
    for (size_t i = 0; i < grads.size(); ++i) {
      clip_pass(grads, params, i, i + 1, clip_factor, eps, per, total);
    }
  } else {
    clip_pass(grads, params, 0, grads.size(), clip_factor, eps, per, total);
  }

  // The sums in float64, each rounded once to the accumulate dtype.
  Tensor per_tensor = torch::stable::empty({num_tensors}, acc);
  if (acc == ScalarType::Double) {
    auto* out = static_cast<double*>(per_tensor.mutable_data_ptr());
    for (int64_t i = 0; i < num_tensors; ++i) out[i] = per[i];
  } else {
    auto* out = static_cast<float*>(per_tensor.mutable_data_ptr());
    for (int64_t i = 0; i < num_tensors; ++i) out[i] = static_cast<float>(per[i]);
  }
  return {cpu_scalar(total, acc), per_tensor};
}

// torch's is_floating_point: the float8 dtypes too (csrc/stable.h's is_floating names only the
// four the kernels read).
bool is_floating_point(ScalarType t) {
  switch (t) {
    case ScalarType::Float:
    case ScalarType::Double:
    case ScalarType::Half:
    case ScalarType::BFloat16:
    case ScalarType::Float8_e5m2:
    case ScalarType::Float8_e4m3fn:
    case ScalarType::Float8_e5m2fnuz:
    case ScalarType::Float8_e4m3fnuz:
    case ScalarType::Float8_e8m0fnu:
      return true;
    default:
      return false;
  }
}

// tensors[i] *= coefs[i] in place; tensor i is not written when coefs[i] >= 1.
void multi_tensor_scale_per_tensor_(TensorListArg& tensors, const Tensor& coefs) {
  FUSEDCLIP_CHECK_TYPE(is_floating_point(coefs.scalar_type()) && coefs.is_cpu(),
                       "multi_tensor_scale_per_tensor_: coefs must be a float CPU tensor, got ",
                       dtype_name(coefs.scalar_type()), " on ", device_name(coefs));
  FUSEDCLIP_CHECK_VALUE(coefs.dim() == 1 && coefs.numel() == static_cast<int64_t>(tensors.size()),
                        "multi_tensor_scale_per_tensor_: coefs must be 1-dim with one "
                        "coefficient per tensor (", tensors.size(), "), got shape ", shape_name(coefs));
  // check_writable, the tables and the scale from one read of each tensor's metadata.
  const TensorMetaList meta = checked_meta(tensors, "multi_tensor_scale_per_tensor_", DeviceType::CPU, true, true);
  // A CPU tensor: no sync. Converted (and made contiguous) only when it is not already so.
  const Tensor as_double = coefs.scalar_type() == ScalarType::Double && coefs.is_contiguous()
                               ? coefs
                               : torch::stable::contiguous(torch::stable::to(coefs, ScalarType::Double));
  const auto* coef = static_cast<const double*>(as_double.const_data_ptr());
  TensorMetaList written;
  std::vector<size_t> written_index;
  std::vector<double> written_coef;
  for (size_t i = 0; i < meta.size(); ++i) {
    if (!(coef[i] >= 1.0)) {  // a nan coefficient still writes
      written.push_back(meta[i]);
      written_index.push_back(i);
      written_coef.push_back(coef[i]);
    }
  }
  if (written.empty()) return;
  ScaleKernel* const scale = scale_kernel.chosen();
  // Scales written[first, first + count): a segment's tensor index is its place in that range.
  const auto scale_range = [&](size_t first, size_t count) {
    const TensorMetaList range(written.begin() + first, written.begin() + first + count);
    TensorTable table(range, Access::kWrite, [&](size_t k) -> const Tensor& {
      return tensors.tensors()[written_index[first + k]];
    });
    const auto& segments = table.segments();
    parallel_over_chunks(table.num_chunks(), [&](int64_t begin, int64_t end) {
      for_each_segment(table, begin, end, !table.memory_descending(), [&](int64_t s) {
        scale(segments[s], written_coef[first + segments[s].tensor]);
      });
    });
    table.write_back();
  };
  if (any_memory_shared(written)) {
    for (size_t k = 0; k < written.size(); ++k) scale_range(k, 1);
  } else {
    scale_range(0, written.size());
  }
}

// TORCH_BOX's boxing, but for the Tensor[] argument (see TensorListArg).
void multi_tensor_scale_per_tensor_boxed(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  check_arity(num_args, 2, num_outputs, 0);
  TensorListArg tensors(stack[0]);
  multi_tensor_scale_per_tensor_(tensors, torch::stable::detail::to<Tensor>(stack[1]));
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fusedclip, CPU, m) {
  m.impl("multi_tensor_agc_", TORCH_BOX(&multi_tensor_agc_));
  m.impl("multi_tensor_scale_per_tensor_", &multi_tensor_scale_per_tensor_boxed);
}

}  // namespace fusedclip::cpu
