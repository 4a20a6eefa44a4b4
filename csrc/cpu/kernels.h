// The building blocks of the CPU operators, shared by every operator file in csrc/cpu/: one
// parallel_for over the chunks of a TensorTable, each segment run by the vector kernels of the
// instruction set chosen at load (segment_kernels.h), segment partials combined in a fixed order
// in float64.
#pragma once

#include <cmath>
#include <tuple>
#include <vector>

#include "../numerics.h"
#include "../stable.h"
#include "segment_kernels.h"
#include "tensor_table.h"

namespace fusedclip::cpu {

// Calls fn(s) for the segments of chunks [begin, end), last to first when backwards. The order
// never changes a result (each segment has its own partial); it decides the memory stream the
// hardware prefetcher sees. Grads allocated by backward lie last parameter first, so the norm
// pass walks such tables backwards to read memory upwards (a third faster on 10,000 small grads).
template <typename Fn>
void for_each_segment(const TensorTable& table, int64_t begin, int64_t end, bool backwards, const Fn& fn) {
  if (backwards) {
    for (int64_t s = table.chunk_begin(end) - 1; s >= table.chunk_begin(begin); --s) fn(s);
  } else {
    for (int64_t s = table.chunk_begin(begin); s < table.chunk_begin(end); ++s) fn(s);
  }
}

// Tables of fewer chunks than this run on the calling thread: 4 chunks are 128K elements (512 KB of
// float32), which one core reads from cache in about 10 us, about what waking the other threads of
// a parallel region costs on an idle machine; on a loaded one that wake-up can take a scheduler
// time slice (1,000 grads of 64 elements, two chunks: 0.3 ms on one thread, 4 to 15 ms on two on
// a loaded 2-core machine). Chunk boundaries, and so every result, do not depend on it.
constexpr int64_t kMinParallelChunks = 4;

// fn(begin, end) over chunks [0, num_chunks), in parallel on torch's intra-op threads when there
// are kMinParallelChunks or more, else on the calling thread.
template <typename Fn>
void parallel_over_chunks(int64_t num_chunks, const Fn& fn) {
  if (num_chunks < kMinParallelChunks) {
    if (num_chunks > 0) fn(int64_t{0}, num_chunks);
    return;
  }
  torch::stable::parallel_for(0, num_chunks, 1, fn);
}

// tensor_at for the tables of a list argument: its stable tensors, made when first asked.
inline auto tensor_of(TensorListArg& list) {
  return [&list](size_t i) -> const Tensor& { return list.tensors()[i]; };
}

// TORCH_BOX's check of a boxed kernel's arity against its schema's, for the kernels that take
// their Tensor[] argument as a TensorListArg and so are boxed by hand.
inline void check_arity(uint64_t num_args, uint64_t kernel_args, uint64_t num_outputs, uint64_t kernel_outputs) {
  STD_TORCH_CHECK(num_args == kernel_args, "Registered schema has ", num_args, " args, but the kernel to box has ",
                  kernel_args);
  STD_TORCH_CHECK(num_outputs == kernel_outputs, "Registered schema has ", num_outputs,
                  " outputs, but the kernel to box has ", kernel_outputs);
}

inline double identity_of(NormKind kind) { return kind == NormKind::kMin ? INFINITY : 0.0; }

inline double combine(NormKind kind, double a, double b) {
  if (kind == NormKind::kMax) return (std::isnan(b) || b > a) ? b : a;
  if (kind == NormKind::kMin) return (std::isnan(b) || b < a) ? b : a;
  return a + b;
}

// The statistic of the norm over the table (a 0-dim tensor of the table's accumulate dtype) and,
// when per_tensor, one per tensor (a 1-dim tensor, else an empty one): every segment's statistic
// in parallel over chunks, then reduced in segment order.
std::tuple<Tensor, Tensor> norm_statistic(const TensorTable& table, double norm_type, bool per_tensor);

// The statistic of x * inv_scale over the table, and found_inf (a 0-dim float32 tensor: 1 when
// any x is inf or nan); csrc/cpu/unscale_norm.cpp.
std::tuple<Tensor, Tensor> unscaled_statistic(const TensorTable& table, double norm_type, double inv_scale);

// The total norm from its statistic (csrc/numerics.h's root, in float64 rounded once to the
// statistic's dtype), as a 0-dim tensor of that dtype.
Tensor total_norm_from_statistic(const Tensor& statistic, double norm_type, bool empty);

// The total norm, again, when its sum of |x|^p left the accumulator's range while the true norm
// fits (csrc/numerics.h's norm_out_of_range): pivot * (sum |x / pivot|^p)^(1/p), pivot = max|x|
// for p > 0, min|x| for p < 0, as fusedclip/reference.py's rescaled_if_overflowed. A second and a
// third read of the tensors, only then; the total as it was otherwise.
Tensor rescaled_if_overflowed(const TensorTable& table, const Tensor& total, double norm_type);

// torch's clip coefficient (csrc/numerics.h's rule) in the norm's dtype (float32 or float64).
double clip_coefficient(const Tensor& total, double max_norm);

// Runs kernel(segment) over every segment of the table, in parallel over chunks. Each thread
// walks its segments in the order opposite to the norm pass's (which had the same split over
// threads), so the last few MB that pass read, still in the last-level cache, are the first this
// pass touches.
template <typename Kernel>
void transform_table(const TensorTable& table, const Kernel& kernel) {
  const auto& segments = table.segments();
  parallel_over_chunks(table.num_chunks(), [&](int64_t begin, int64_t end) {
    for_each_segment(table, begin, end, !table.memory_descending(), [&](int64_t s) { kernel(segments[s]); });
  });
}

// Runs kernel in place over tensors that check_writable accepted, from their metadata as
// checked_meta read it with_data; tensor_at(i) is the stable tensor i (a const Tensor&), asked only
// for a complex or non-dense one. A read table that points into the tensors themselves (no
// temporaries) serves the writes too. Tensors that share memory run one at a time in list order,
// so shared bytes are transformed once per tensor, as torch does.
template <typename Kernel, typename TensorAt>
void transform_checked(const TensorMetaList& meta, const TensorAt& tensor_at, const Kernel& kernel,
                       const TensorTable* read_table = nullptr) {
  if (any_memory_shared(meta)) {
    for (size_t i = 0; i < meta.size(); ++i) {
      TensorTable table(TensorMetaList{meta[i]}, Access::kWrite, [&tensor_at, i](size_t) -> const Tensor& {
        return tensor_at(i);
      });
      transform_table(table, kernel);
      table.write_back();
    }
  } else if (read_table != nullptr && read_table->direct()) {
    transform_table(*read_table, kernel);
  } else {
    TensorTable table(meta, Access::kWrite, tensor_at);
    transform_table(table, kernel);
    table.write_back();
  }
}

// tensors *= coef; nothing is written when coef >= 1 (multiplying by 1 changes nothing; a nan
// coef still writes).
template <typename TensorAt>
void scale_checked(const TensorMetaList& meta, const TensorAt& tensor_at, double coef,
                   const TensorTable* read_table = nullptr) {
  if (coef >= 1.0) return;
  ScaleKernel* const scale = scale_kernel.chosen();
  transform_checked(meta, tensor_at, [scale, coef](const Segment& s) { scale(s, coef); }, read_table);
}

}  // namespace fusedclip::cpu
