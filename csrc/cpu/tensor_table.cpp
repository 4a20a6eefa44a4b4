#include "tensor_table.h"

#include <algorithm>

namespace fusedclip::cpu {

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case ScalarType::Float: return DType::kFloat32;
    case ScalarType::Double: return DType::kFloat64;
    case ScalarType::Half: return DType::kFloat16;
    case ScalarType::BFloat16: return DType::kBFloat16;
    default: fail("unexpected dtype ", dtype_name(t.scalar_type()));
  }
}

TensorTable::TensorTable(const TensorList& tensors, Access access, const char* op) {
  check_tensors(tensors, op, DeviceType::CPU);
  num_tensors_ = static_cast<int64_t>(tensors.size());
  segments_.reserve(tensors.size() + 16);
  chunk_begin_.reserve(tensors.size() + 16);
  for (int64_t i = 0; i < num_tensors_; ++i) {
    const Tensor& t = tensors[i];
    const ScalarType dtype = t.scalar_type();
    if (dtype == ScalarType::Double || dtype == ScalarType::ComplexDouble) accumulate_dtype_ = ScalarType::Double;
    const int64_t numel = t.numel();
    if (numel == 0) continue;
    const bool complex = is_complex(dtype);
    if (!complex && non_overlapping_and_dense(t)) {
      // The common case, without a refcount touched. Any dense layout (contiguous, transposed,
      // channels-last) is one block of memory starting at data_ptr, since strides are never
      // negative; element order does not matter to these kernels.
      append(t.mutable_data_ptr(), numel, static_cast<int64_t>(t.element_size()), dtype_of(t), i);
      continue;
    }
    Tensor real = t;
    if (complex) {
      // |z| for norms; (re, im) pairs for scaling, which multiplies both by the same real coef.
      real = access == Access::kRead ? aten_unary("aten::abs", "", t) : aten_unary("aten::view_as_real", "", t);
      keep_alive_.push_back(real);
    }
    if (!non_overlapping_and_dense(real)) {
      Tensor dense = torch::stable::contiguous(real);
      keep_alive_.push_back(dense);
      if (access == Access::kWrite) write_back_.emplace_back(real, dense);
      real = dense;
    }
    append(real.mutable_data_ptr(), real.numel(), static_cast<int64_t>(real.element_size()), dtype_of(real), i);
  }
  chunk_begin_.push_back(static_cast<int64_t>(segments_.size()));
}

void TensorTable::append(void* data, int64_t n, int64_t element_size, DType dtype, int64_t tensor_index) {
  char* bytes = static_cast<char*>(data);
  int64_t offset = 0;
  while (offset < n) {
    if (numel_ % kChunkElements == 0) {
      chunk_begin_.push_back(static_cast<int64_t>(segments_.size()));
    }
    const int64_t room = kChunkElements - numel_ % kChunkElements;
    const int64_t len = std::min(n - offset, room);
    segments_.push_back({bytes + offset * element_size, len, tensor_index, dtype});
    offset += len;
    numel_ += len;
  }
}

void TensorTable::write_back() {
  for (auto& [original, dense] : write_back_) {
    torch::stable::copy_(original, dense);
  }
}

}  // namespace fusedclip::cpu
