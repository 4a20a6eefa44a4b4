// CPU kernels of the operators behind adaptive clipping: unit-wise AGC and a per-tensor scale
// (schemas in csrc/fusedclip.cpp; the building blocks are in kernels.h).
#include "kernels.h"

#include <torch/library.h>

#include <algorithm>
#include <cmath>
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
double clip_unit(const Unit& unit, double clip_factor, double eps) {
  const double param_sq = dispatch_segment_statistic<NormKind::kSquareSum>(unit.param, 2.0);
  const double grad_sq = dispatch_segment_statistic<NormKind::kSquareSum>(unit.grad, 2.0);
  double coef = 1.0;
  if (agc_scales(grad_sq, param_sq, clip_factor, eps, &coef)) {  // the rule of csrc/numerics.h
    // The row was just read: the scale runs from the cache, so the gradient is read from memory
    // once and written once.
    dispatch_transform_segment(unit.grad, ScaleOp{coef});
  }
  return grad_sq;
}

// Clips gradients [first, last) of the list in one parallel pass over runs of whole units, and
// adds each unit's sum of squares to total and to per[its tensor], in unit order: the same bits
// for any thread count.
void clip_pass(at::TensorList grads, at::TensorList params, size_t first, size_t last,
               double clip_factor, double eps, std::vector<double>& per, double& total) {
  // Units are rows of the row-major layout: other layouts go through contiguous temporaries.
  std::vector<at::Tensor> keep_alive;
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;  // (gradient, contiguous copy)
  std::vector<Unit> units;
  std::vector<int64_t> task_end;  // tasks are runs of whole units of about one chunk
  int64_t task_numel = 0;
  for (size_t i = first; i < last; ++i) {
    if (grads[i].numel() == 0) continue;
    at::Tensor grad = grads[i].contiguous();
    if (!grad.is_same(grads[i])) write_back.emplace_back(grads[i], grad);
    const at::Tensor param = params[i].contiguous();
    keep_alive.push_back(grad);
    keep_alive.push_back(param);
    const int64_t rows = grad.dim() > 1 ? grad.size(0) : 1;
    const int64_t row_numel = grad.numel() / rows;
    auto* grad_data = static_cast<char*>(grad.data_ptr());
    auto* param_data = static_cast<char*>(param.data_ptr());
    for (int64_t r = 0; r < rows; ++r) {
      if (task_numel > 0 && task_numel + row_numel > kChunkElements) {
        task_end.push_back(static_cast<int64_t>(units.size()));
        task_numel = 0;
      }
      const auto tensor = static_cast<int64_t>(i);
      units.push_back({{param_data + r * row_numel * param.element_size(), row_numel, tensor,
                        param.scalar_type()},
                       {grad_data + r * row_numel * grad.element_size(), row_numel, tensor,
                        grad.scalar_type()}});
      task_numel += row_numel;
    }
  }
  if (task_numel > 0) task_end.push_back(static_cast<int64_t>(units.size()));

  std::vector<double> unit_sq(units.size());
  at::parallel_for(0, static_cast<int64_t>(task_end.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t u = t == 0 ? 0 : task_end[t - 1]; u < task_end[t]; ++u) {
        unit_sq[u] = clip_unit(units[u], clip_factor, eps);
      }
    }
  });
  for (auto& [original, dense] : write_back) original.copy_(dense);

  for (size_t u = 0; u < units.size(); ++u) {
    total += unit_sq[u];
    per[units[u].grad.tensor] += unit_sq[u];
  }
}

std::tuple<at::Tensor, at::Tensor> multi_tensor_agc_(at::TensorList grads, at::TensorList params,
                                                     double clip_factor, double eps) {
  // A parameter may have another dtype than its gradient (torch allows it through grad_dtype):
  // each segment is read in its own dtype.
  check_agc_arguments(grads, params, clip_factor, eps, at::kCPU);
  at::ScalarType acc = at::kFloat;
  for (const at::Tensor& g : grads) {
    if (g.scalar_type() == at::kDouble) acc = at::kDouble;
  }
  bump_versions(grads);

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

  const auto options = at::TensorOptions().dtype(acc);
  at::Tensor per_tensor = at::empty({num_tensors}, options);
  per_tensor.copy_(at::from_blob(per.data(), {num_tensors}, at::kDouble));
  return {at::scalar_tensor(total, options), per_tensor};
}

// tensors[i] *= coefs[i] in place; tensor i is not written when coefs[i] >= 1.
void multi_tensor_scale_per_tensor_(at::TensorList tensors, const at::Tensor& coefs) {
  TORCH_CHECK_TYPE(coefs.is_floating_point() && coefs.device().is_cpu(),
                   "fusedclip.multi_tensor_scale_per_tensor_: coefs must be a float CPU tensor, got ",
                   coefs.scalar_type(), " on ", coefs.device());
  TORCH_CHECK_VALUE(coefs.dim() == 1 && coefs.numel() == static_cast<int64_t>(tensors.size()),
                    "fusedclip.multi_tensor_scale_per_tensor_: coefs must be 1-dim with one "
                    "coefficient per tensor (", tensors.size(), "), got shape ", coefs.sizes());
  check_writable(tensors, "multi_tensor_scale_per_tensor_", at::kCPU);
  const at::Tensor as_double = coefs.to(at::kDouble).contiguous();  // a CPU tensor: no sync
  const double* coef = as_double.data_ptr<double>();
  std::vector<at::Tensor> written;
  std::vector<double> written_coef;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (!(coef[i] >= 1.0)) {  // a nan coefficient still writes
      written.push_back(tensors[i]);
      written_coef.push_back(coef[i]);
    }
  }
  if (written.empty()) return;
  bump_versions(written);
  const auto scale_list = [](at::TensorList list, const double* list_coef) {
    TensorTable table(list, Access::kWrite, "multi_tensor_scale_per_tensor_");
    const auto& segments = table.segments();
    at::parallel_for(0, table.num_chunks(), 1, [&](int64_t begin, int64_t end) {
      for_each_segment(table, begin, end, !table.memory_descending(), [&](int64_t s) {
        dispatch_transform_segment(segments[s], ScaleOp{list_coef[segments[s].tensor]});
      });
    });
    table.write_back();
  };
  if (any_memory_shared(written)) {
    for (size_t i = 0; i < written.size(); ++i) scale_list(written[i], &written_coef[i]);
  } else {
    scale_list(written, written_coef.data());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedclip, CPU, m) {
  m.impl("multi_tensor_agc_", &multi_tensor_agc_);
  m.impl("multi_tensor_scale_per_tensor_", &multi_tensor_scale_per_tensor_);
}

}  // namespace fusedclip::cpu
