#include "tensor_table.h"

#include <algorithm>

namespace fusedclip::cpu {

DType dtype_of(ScalarType dtype) {
  switch (dtype) {
    case ScalarType::Float: return DType::kFloat32;
    case ScalarType::Double: return DType::kFloat64;
    case ScalarType::Half: return DType::kFloat16;
    case ScalarType::BFloat16: return DType::kBFloat16;
    default: fail("unexpected dtype ", dtype_name(dtype));
  }
}

DType dtype_of(const Tensor& t) { return dtype_of(t.scalar_type()); }

TensorTable::TensorTable(TensorListArg& tensors, const TensorMetaList& meta, Access access)
    : TensorTable(meta, access, [&tensors](size_t i) -> const Tensor& { return tensors.tensors()[i]; }) {}

void TensorTable::start(size_t num_tensors) {
  num_tensors_ = static_cast<int64_t>(num_tensors);
  segments_.reserve(num_tensors + 16);
  chunk_begin_.reserve(num_tensors + 16);
}

bool TensorTable::add_direct(const TensorMeta& m, int64_t i) {
  if (m.dtype == ScalarType::Double || m.dtype == ScalarType::ComplexDouble) accumulate_dtype_ = ScalarType::Double;
  if (m.numel == 0) return true;
  if (is_complex(m.dtype) || !non_overlapping_and_dense(m)) return false;
  // The common case, without a refcount touched or an accessor asked. Any dense layout
  // (contiguous, transposed, channels-last) is one block of memory starting at the data pointer,
  // since strides are never negative; element order does not matter to these kernels.
  append(m.data, m.numel, m.element_size, dtype_of(m.dtype), i);
  return true;
}

void TensorTable::add_through(const Tensor& t, Access access, int64_t i) {
  Tensor real = t;
  if (is_complex(t.scalar_type())) {
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
