// A list of tensors laid out as one virtual flat vector, cut into fixed-size chunks.
//
// The CPU kernels run one parallel_for over chunks of this vector, so 10,000 small tensors cost a
// few hundred tasks, not 10,000 dispatches. A chunk may hold pieces of several tensors and a
// tensor may span several chunks: each piece is a Segment (csrc/cpu/segment_kernels.h). Chunk
// boundaries depend only on the tensors' sizes, never on the thread count, so partials reduced in
// segment order give bitwise identical results run to run.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "../tensor_checks.h"
#include "segment_kernels.h"

namespace fusedclip::cpu {

// 32K elements: 128 KB of float32, large enough to amortise a task, small enough to balance two
// to a hundred threads over a 100M-element model.
constexpr int64_t kChunkElements = int64_t{1} << 15;

// How a table will be used: kRead makes a real view of complex tensors through their absolute
// values (a temporary); kWrite views complex tensors as (re, im) pairs and copies non-dense
// tensors to dense temporaries that write_back() copies into the originals.
enum class Access { kRead, kWrite };

// The kernels' dtype of a real floating-point tensor (or dtype).
DType dtype_of(const Tensor& t);
DType dtype_of(ScalarType dtype);

class TensorTable {
 public:
  // Of tensors already checked, from their metadata as checked_meta read it with_data (one entry
  // per tensor): no accessor is asked again but of complex and non-dense tensors.
  TensorTable(TensorListArg& tensors, const TensorMetaList& meta, Access access);
  // The same, with tensor_at(i) the stable tensor i (a const Tensor&), asked only for a complex
  // or non-dense one.
  template <typename TensorAt>
  TensorTable(const TensorMetaList& meta, Access access, const TensorAt& tensor_at) {
    start(meta.size());
    for (size_t i = 0; i < meta.size(); ++i) {
      if (!add_direct(meta[i], static_cast<int64_t>(i))) add_through(tensor_at(i), access, static_cast<int64_t>(i));
    }
    chunk_begin_.push_back(static_cast<int64_t>(segments_.size()));
  }

  const std::vector<Segment>& segments() const { return segments_; }
  int64_t num_chunks() const { return static_cast<int64_t>(chunk_begin_.size()) - 1; }
  // Segments of chunk c are [chunk_begin(c), chunk_begin(c + 1)).
  int64_t chunk_begin(int64_t c) const { return chunk_begin_[c]; }
  int64_t numel() const { return numel_; }
  int64_t num_tensors() const { return num_tensors_; }
  // float64 when any tensor is float64 (or complex128), else float32.
  ScalarType accumulate_dtype() const { return accumulate_dtype_; }

  // True when the last segment lies below the first in memory: tensors allocated in reverse list
  // order, as backward allocates grads.
  bool memory_descending() const {
    return segments_.size() > 1 && segments_.back().data < segments_.front().data;
  }

  // True when every segment points into the tensors themselves (no temporaries), so a kRead
  // table can also serve in-place writes.
  bool direct() const { return keep_alive_.empty(); }

  // Copies the dense temporaries of non-dense tensors back into them (kWrite tables only).
  void write_back();

 private:
  void start(size_t num_tensors);
  // Appends tensor i when it is real and dense (or empty): false when it needs its stable tensor.
  bool add_direct(const TensorMeta& meta, int64_t tensor_index);
  // Appends a complex or non-dense tensor through a temporary.
  void add_through(const Tensor& t, Access access, int64_t tensor_index);
  void append(void* data, int64_t numel, int64_t element_size, DType dtype, int64_t tensor_index);

  std::vector<Segment> segments_;
  std::vector<int64_t> chunk_begin_;
  std::vector<Tensor> keep_alive_;                       // temporaries the segments point into
  std::vector<std::pair<Tensor, Tensor>> write_back_;    // (original, dense copy)
  int64_t numel_ = 0;
  int64_t num_tensors_ = 0;
  ScalarType accumulate_dtype_ = ScalarType::Float;
};

}  // namespace fusedclip::cpu
