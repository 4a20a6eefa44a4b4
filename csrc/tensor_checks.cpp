#include "tensor_checks.h"

#include <ATen/MemoryOverlap.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace fusedclip {

void check_tensors(at::TensorList tensors, const char* op, c10::DeviceType device_type) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_TYPE(t.defined(), "fusedclip.", op, ": tensor ", i, " is undefined");
    TORCH_CHECK_TYPE(t.layout() == at::kStrided, "fusedclip.", op, ": tensor ", i, " has layout ",
                     t.layout(), "; only dense (strided) tensors are supported");
    TORCH_CHECK_TYPE(t.device().type() == device_type, "fusedclip.", op, ": the ", device_type,
                     " kernels take ", device_type, " tensors, but tensor ", i, " is on ", t.device());
    TORCH_CHECK_TYPE(t.device() == tensors[0].device(), "fusedclip.", op,
                     ": all tensors must be on one device, but tensor 0 is on ", tensors[0].device(),
                     " and tensor ", i, " on ", t.device());
    const at::ScalarType s = t.scalar_type();
    TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16 ||
                         s == at::kComplexFloat || s == at::kComplexDouble,
                     "fusedclip.", op, ": tensor ", i, " has dtype ", s,
                     "; expected float32, float64, float16, bfloat16 or complex");
  }
}

void check_writable(at::TensorList tensors, const char* op, c10::DeviceType device_type) {
  check_tensors(tensors, op, device_type);
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK_VALUE(at::has_internal_overlap(tensors[i]) != at::MemOverlap::Yes, "fusedclip.", op,
                      ": tensor ", i,
                      " has internally overlapping memory (an expanded tensor) and cannot be "
                      "modified in place; clone it first");
    TORCH_CHECK_VALUE(!tensors[i].is_inference() || c10::InferenceMode::is_enabled(), "fusedclip.", op,
                      ": tensor ", i,
                      " is an inference tensor, which cannot be modified in place outside "
                      "torch.inference_mode()");
  }
}

void check_agc_arguments(at::TensorList grads, at::TensorList params, double clip_factor, double eps,
                         c10::DeviceType device_type) {
  const char* op = "multi_tensor_agc_";
  TORCH_CHECK_VALUE(grads.size() == params.size(), "fusedclip.", op, ": got ", grads.size(), " gradients but ",
                    params.size(), " parameters");
  TORCH_CHECK_VALUE(clip_factor >= 0, "fusedclip.", op, ": clip_factor must be >= 0, got ", clip_factor);
  TORCH_CHECK_VALUE(eps >= 0, "fusedclip.", op, ": eps must be >= 0, got ", eps);
  check_writable(grads, op, device_type);
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK_TYPE(p.defined() && p.layout() == at::kStrided && p.device() == grads[i].device(), "fusedclip.",
                     op, ": parameter ", i, " must be a dense tensor on its gradient's device (", grads[i].device(),
                     ")");
    const at::ScalarType dtype = p.scalar_type();
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                     "fusedclip.", op, ": parameter ", i, " has dtype ", dtype,
                     "; expected float32, float64, float16 or bfloat16");
    TORCH_CHECK_TYPE(!grads[i].is_complex(), "fusedclip.", op, ": gradient ", i,
                     " is complex; AGC is defined for real tensors");
    TORCH_CHECK_VALUE(p.sizes() == grads[i].sizes(), "fusedclip.", op, ": parameter ", i, " has shape ", p.sizes(),
                      " but its gradient has shape ", grads[i].sizes());
  }
}

void check_monitor_state(const at::Tensor& norms, const at::Tensor& mean, const at::Tensor& var,
                         const at::Tensor& count, const at::Tensor& below, const at::Tensor& explosions,
                         const at::Tensor& exploding, const at::Tensor& vanishing, c10::DeviceType device_type) {
  const at::ScalarType dtype = norms.scalar_type();
  TORCH_CHECK_TYPE(norms.device().type() == device_type && (dtype == at::kFloat || dtype == at::kDouble),
                   "fusedclip.monitor_update_: norms must be a float32 or float64 ", device_type, " tensor, got ",
                   dtype, " on ", norms.device());
  TORCH_CHECK_VALUE(norms.dim() == 1, "fusedclip.monitor_update_: norms must be 1-dim, got shape ", norms.sizes());
  const int64_t size = norms.size(0);
  struct State {
    const at::Tensor& tensor;
    const char* name;
    at::ScalarType dtype;
  };
  for (const State& s : {State{norms, "norms", dtype}, State{mean, "mean", dtype}, State{var, "var", dtype},
                         State{count, "count", at::kLong}, State{below, "below", at::kLong},
                         State{explosions, "explosions", at::kLong}, State{exploding, "exploding", at::kBool},
                         State{vanishing, "vanishing", at::kBool}}) {
    TORCH_CHECK_TYPE(s.tensor.device() == norms.device() && s.tensor.scalar_type() == s.dtype,
                     "fusedclip.monitor_update_: ", s.name, " must be a ", s.dtype, " tensor on ", norms.device(),
                     ", got ", s.tensor.scalar_type(), " on ", s.tensor.device());
    TORCH_CHECK_VALUE(s.tensor.dim() == 1 && s.tensor.size(0) == size && s.tensor.is_contiguous(),
                      "fusedclip.monitor_update_: ", s.name, " must be a contiguous 1-dim tensor of size ", size,
                      ", got shape ", s.tensor.sizes(), " and strides ", s.tensor.strides());
  }
}

void check_norm_type(double norm_type) {
  TORCH_CHECK_VALUE(!std::isnan(norm_type), "fusedclip: norm_type must not be nan");
}

void check_scalar(const at::Tensor& t, const char* op, const char* arg_name) {
  TORCH_CHECK_VALUE(t.numel() == 1, "fusedclip.", op, ": ", arg_name,
                    " must be a one-element float tensor, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.is_floating_point(), "fusedclip.", op, ": ", arg_name,
                   " must be a one-element float tensor, got ", t.scalar_type());
}

bool any_memory_shared(at::TensorList tensors) {
  // The byte range each tensor can touch: [first element, one past its farthest element].
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  ranges.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    if (t.numel() == 0) continue;
    int64_t last = 0;  // offset of the farthest element, in elements
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    ranges.emplace_back(begin, begin + (last + 1) * t.element_size());
  }
  // Grads are usually allocated in (reverse) parameter order: check those orders in one pass
  // before sorting.
  bool ascending = true, descending = true;
  for (size_t i = 1; i < ranges.size(); ++i) {
    ascending = ascending && ranges[i - 1].second <= ranges[i].first;
    descending = descending && ranges[i].second <= ranges[i - 1].first;
  }
  if (ascending || descending) return false;
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i - 1].second > ranges[i].first) return true;
  }
  return false;
}

void bump_versions(at::TensorList tensors) {
  for (const at::Tensor& t : tensors) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace fusedclip
