#include "tensor_checks.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace fusedclip {

void check_tensors(const TensorList& tensors, const char* op, DeviceType device_type) {
  const char* expected_device = device_type == DeviceType::CUDA ? "CUDA" : "CPU";
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i];
    FUSEDCLIP_CHECK_TYPE(t.defined(), op, ": tensor ", i, " is undefined");
    FUSEDCLIP_CHECK_TYPE(t.layout() == torch::headeronly::Layout::Strided, op, ": tensor ", i,
                         " is not a dense (strided) tensor; only dense tensors are supported");
    FUSEDCLIP_CHECK_TYPE(t.device().type() == device_type, op, ": the ", expected_device, " kernels take ",
                         expected_device, " tensors, but tensor ", i, " is on ", device_name(t));
    FUSEDCLIP_CHECK_TYPE(t.device() == tensors[0].device(), op, ": all tensors must be on one device, but tensor 0 is on ",
                         device_name(tensors[0]), " and tensor ", i, " on ", device_name(t));
    const ScalarType s = t.scalar_type();
    FUSEDCLIP_CHECK_TYPE(is_floating(s) || is_complex(s), op, ": tensor ", i, " has dtype ", dtype_name(s),
                         "; expected float32, float64, float16, bfloat16 or complex");
  }
}

bool non_overlapping(const Tensor& t) {
  // As torch's in-place ops decide it: memory overlaps where a dimension of more than one element
  // has stride 0 (an expanded tensor). Other overlapping strides are too rare to pay a sort for;
  // the kernels write such a tensor through a dense copy (see cpu/tensor_table.h), as torch does.
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.stride(d) == 0 && t.size(d) > 1) return false;
  }
  return true;
}

bool non_overlapping_and_dense(const Tensor& t) {
  // Sorted by stride, the dimensions of more than one element must each step over exactly the
  // block of the ones before: 1, then size * stride of the previous.
  const int64_t dims = t.dim();
  if (dims == 0) return true;
  if (dims == 1) return t.size(0) < 2 || t.stride(0) == 1;
  if (t.is_contiguous()) return true;
  std::vector<std::pair<int64_t, int64_t>> by_stride;  // (stride, size) of dims of size > 1
  by_stride.reserve(static_cast<size_t>(dims));
  for (int64_t d = 0; d < dims; ++d) {
    if (t.size(d) == 0) return true;  // no elements: nothing to overlap
    if (t.size(d) > 1) by_stride.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(by_stride.begin(), by_stride.end());
  int64_t expected = 1;
  for (const auto& [stride, size] : by_stride) {
    if (stride != expected) return false;
    expected *= size;
  }
  return true;
}

void check_writable(const TensorList& tensors, const char* op, DeviceType device_type) {
  check_tensors(tensors, op, device_type);
  for (size_t i = 0; i < tensors.size(); ++i) {
    FUSEDCLIP_CHECK_VALUE(non_overlapping(tensors[i]), op, ": tensor ", i,
                          " has internally overlapping memory (an expanded tensor) and cannot be "
                          "modified in place; clone it first");
  }
}

void check_agc_arguments(const TensorList& grads, const TensorList& params, double clip_factor, double eps,
                         DeviceType device_type) {
  const char* op = "multi_tensor_agc_";
  FUSEDCLIP_CHECK_VALUE(grads.size() == params.size(), op, ": got ", grads.size(), " gradients but ", params.size(),
                        " parameters");
  FUSEDCLIP_CHECK_VALUE(clip_factor >= 0, op, ": clip_factor must be >= 0, got ", clip_factor);
  FUSEDCLIP_CHECK_VALUE(eps >= 0, op, ": eps must be >= 0, got ", eps);
  check_writable(grads, op, device_type);
  for (size_t i = 0; i < grads.size(); ++i) {
    const Tensor& p = params[i];
    FUSEDCLIP_CHECK_TYPE(p.defined() && p.layout() == torch::headeronly::Layout::Strided &&
                             p.device() == grads[i].device(),
                         op, ": parameter ", i, " must be a dense tensor on its gradient's device (",
                         device_name(grads[i]), ")");
    FUSEDCLIP_CHECK_TYPE(is_floating(p.scalar_type()), op, ": parameter ", i, " has dtype ",
                         dtype_name(p.scalar_type()), "; expected float32, float64, float16 or bfloat16");
    FUSEDCLIP_CHECK_TYPE(!is_complex(grads[i].scalar_type()), op, ": gradient ", i,
                         " is complex; AGC is defined for real tensors");
    bool same_shape = p.dim() == grads[i].dim();
    for (int64_t d = 0; same_shape && d < p.dim(); ++d) same_shape = p.size(d) == grads[i].size(d);
    FUSEDCLIP_CHECK_VALUE(same_shape, op, ": parameter ", i, " and its gradient have different shapes");
  }
}

void check_monitor_state(const Tensor& norms, const Tensor& mean, const Tensor& var, const Tensor& count,
                         const Tensor& below, const Tensor& explosions, const Tensor& exploding,
                         const Tensor& vanishing, DeviceType device_type) {
  const ScalarType dtype = norms.scalar_type();
  FUSEDCLIP_CHECK_TYPE(norms.device().type() == device_type && (dtype == ScalarType::Float || dtype == ScalarType::Double),
                       "monitor_update_: norms must be a float32 or float64 ",
                       device_type == DeviceType::CUDA ? "CUDA" : "CPU", " tensor, got ", dtype_name(dtype), " on ",
                       device_name(norms));
  FUSEDCLIP_CHECK_VALUE(norms.dim() == 1, "monitor_update_: norms must be 1-dim, got ", norms.dim(), " dimensions");
  const int64_t size = norms.size(0);
  struct State {
    const Tensor& tensor;
    const char* name;
    ScalarType dtype;
  };
  for (const State& s : {State{norms, "norms", dtype}, State{mean, "mean", dtype}, State{var, "var", dtype},
                         State{count, "count", ScalarType::Long}, State{below, "below", ScalarType::Long},
                         State{explosions, "explosions", ScalarType::Long},
                         State{exploding, "exploding", ScalarType::Bool},
                         State{vanishing, "vanishing", ScalarType::Bool}}) {
    FUSEDCLIP_CHECK_TYPE(s.tensor.device() == norms.device() && s.tensor.scalar_type() == s.dtype, "monitor_update_: ",
                         s.name, " must be a ", dtype_name(s.dtype), " tensor on ", device_name(norms), ", got ",
                         dtype_name(s.tensor.scalar_type()), " on ", device_name(s.tensor));
    FUSEDCLIP_CHECK_VALUE(s.tensor.dim() == 1 && s.tensor.size(0) == size && s.tensor.is_contiguous(),
                          "monitor_update_: ", s.name, " must be a contiguous 1-dim tensor of size ", size);
  }
}

void check_norm_type(double norm_type) {
  FUSEDCLIP_CHECK_VALUE(!std::isnan(norm_type), "norm_type must not be nan");
}

void check_scalar(const Tensor& t, const char* op, const char* arg_name) {
  FUSEDCLIP_CHECK_VALUE(t.numel() == 1, op, ": ", arg_name, " must be a one-element float tensor, got ", t.numel(),
                        " elements");
  FUSEDCLIP_CHECK_TYPE(is_floating(t.scalar_type()), op, ": ", arg_name, " must be a one-element float tensor, got ",
                       dtype_name(t.scalar_type()));
}

bool any_memory_shared(const TensorList& tensors) {
  // The byte range each tensor can touch: [first element, one past its farthest element].
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  ranges.reserve(tensors.size());
  for (const Tensor& t : tensors) {
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

}  // namespace fusedclip
