#include "tensor_table.h"

#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <c10/core/InferenceMode.h>

namespace fusedclip::cpu {
namespace {

bool is_supported_real(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_input(const at::Tensor& t, int64_t index) {
  TORCH_CHECK_TYPE(t.defined(), "fusedclip: tensor ", index, " is undefined");
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, "fusedclip: tensor ", index,
                   " has layout ", t.layout(), "; only dense (strided) tensors are supported");
  TORCH_CHECK_TYPE(t.device().is_cpu(), "fusedclip: the CPU kernels take CPU tensors, but tensor ",
                   index, " is on ", t.device());
  TORCH_CHECK_TYPE(is_supported_real(t.scalar_type()) || t.scalar_type() == at::kComplexFloat ||
                       t.scalar_type() == at::kComplexDouble,
                   "fusedclip: tensor ", index, " has dtype ", t.scalar_type(),
                   "; expected float32, float64, float16, bfloat16 or complex");
}

}  // namespace

TensorTable::TensorTable(at::TensorList tensors, Access access) {
  num_tensors_ = static_cast<int64_t>(tensors.size());
  for (int64_t i = 0; i < num_tensors_; ++i) {
    check_input(tensors[i], i);
  }
  segments_.reserve(tensors.size() + 16);
  chunk_begin_.reserve(tensors.size() + 16);
  for (int64_t i = 0; i < num_tensors_; ++i) {
    const at::Tensor& t = tensors[i];
    const at::ScalarType dtype = t.scalar_type();
    if (dtype == at::kDouble || dtype == at::kComplexDouble) accumulate_dtype_ = at::kDouble;
    if (t.numel() == 0) continue;
    if (!t.is_complex() && t.is_non_overlapping_and_dense()) {
      // The common case, without a refcount touched. Any dense layout (contiguous, transposed,
      // channels-last) is one block of memory starting at data_ptr, since strides are never
      // negative; element order does not matter to these kernels.
      append(t, i);
      continue;
    }
    at::Tensor real = t;
    if (t.is_complex()) {
      // |z| for norms; (re, im) pairs for scaling, which multiplies both by the same real coef.
      real = access == Access::kRead ? at::abs(t) : at::view_as_real(t);
      keep_alive_.push_back(real);
    }
    if (!real.is_non_overlapping_and_dense()) {
      at::Tensor dense = real.contiguous();
      keep_alive_.push_back(dense);
      if (access == Access::kWrite) write_back_.emplace_back(real, dense);
      real = dense;
    }
    append(real, i);
  }
  chunk_begin_.push_back(static_cast<int64_t>(segments_.size()));
}

void TensorTable::append(const at::Tensor& dense, int64_t tensor_index) {
  char* data = static_cast<char*>(dense.data_ptr());
  const int64_t element_size = dense.element_size();
  const int64_t n = dense.numel();
  int64_t offset = 0;
  while (offset < n) {
    if (numel_ % kChunkElements == 0) {
      chunk_begin_.push_back(static_cast<int64_t>(segments_.size()));
    }
    const int64_t room = kChunkElements - numel_ % kChunkElements;
    const int64_t len = std::min(n - offset, room);
    segments_.push_back({data + offset * element_size, len, tensor_index, dense.scalar_type()});
    offset += len;
    numel_ += len;
  }
}

void TensorTable::write_back() {
  for (auto& [original, dense] : write_back_) {
    original.copy_(dense);
  }
}

void check_writable(at::TensorList tensors, const char* op_name) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_input(tensors[i], static_cast<int64_t>(i));
    TORCH_CHECK_VALUE(at::has_internal_overlap(tensors[i]) != at::MemOverlap::Yes, "fusedclip.",
                      op_name, ": tensor ", i,
                      " has internally overlapping memory (an expanded tensor) and cannot be "
                      "modified in place; clone it first");
    TORCH_CHECK_VALUE(!tensors[i].is_inference() || c10::InferenceMode::is_enabled(), "fusedclip.",
                      op_name, ": tensor ", i,
                      " is an inference tensor, which cannot be modified in place outside "
                      "torch.inference_mode()");
  }
}

void check_scalar(const at::Tensor& t, const char* op_name, const char* arg_name) {
  TORCH_CHECK_VALUE(t.numel() == 1, "fusedclip.", op_name, ": ", arg_name,
                    " must be a one-element float tensor, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.is_floating_point(), "fusedclip.", op_name, ": ", arg_name,
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

}  // namespace fusedclip::cpu
