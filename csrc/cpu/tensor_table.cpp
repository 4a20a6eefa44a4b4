#include "tensor_table.h"

#include <algorithm>

namespace fusedclip::cpu {

TensorTable::TensorTable(at::TensorList tensors, Access access, const char* op) {
  check_tensors(tensors, op, at::kCPU);
  num_tensors_ = static_cast<int64_t>(tensors.size());
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

}  // namespace fusedclip::cpu
