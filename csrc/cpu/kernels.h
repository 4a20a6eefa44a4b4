// The building blocks of the CPU kernels, shared by every operator file in csrc/cpu/: one
// at::parallel_for over the chunks of a TensorTable, vectorized with at::vec, float32 accumulation
// (float64 for float64 tensors) per segment, and segment partials combined in a fixed order in
// float64.
#pragma once

#include "vec_config.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../numerics.h"
#include "tensor_table.h"

namespace fusedclip::cpu {

using at::vec::Vectorized;

// ---------------------------------------------------------------------------------------------
// Loading and storing blocks of four accumulator-type vectors.
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// A block is four vectors of the accumulator type: four independent accumulators keep the FMA
// and add pipelines busy. Half and BFloat16 load two vectors and widen each to two float vectors.
template <typename scalar_t>
struct Block {
  using acc_t = acc_type<scalar_t>;
  using AccVec = Vectorized<acc_t>;
  static constexpr int64_t kSize = 4 * AccVec::size();

  static void load(const scalar_t* p, AccVec (&v)[4]) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      for (int k = 0; k < 4; ++k) v[k] = AccVec::loadu(p + k * AccVec::size());
    } else {
      using LowVec = Vectorized<scalar_t>;
      std::tie(v[0], v[1]) = at::vec::convert_to_float<scalar_t>(LowVec::loadu(p));
      std::tie(v[2], v[3]) = at::vec::convert_to_float<scalar_t>(LowVec::loadu(p + LowVec::size()));
    }
  }

  static void store(scalar_t* p, const AccVec (&v)[4]) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      for (int k = 0; k < 4; ++k) v[k].store(p + k * AccVec::size());
    } else {
      using LowVec = Vectorized<scalar_t>;
      at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
      at::vec::convert_from_float<scalar_t>(v[2], v[3]).store(p + LowVec::size());
    }
  }
};

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

// ---------------------------------------------------------------------------------------------
// Norm statistics. Each reduction gives the identity, the vector and scalar steps, and the
// combination of two partials; max and min propagate nan (IEEE maximum/minimum), which plain
// max/min instructions do not.
// ---------------------------------------------------------------------------------------------

using fusedclip::NormKind;  // csrc/numerics.h

template <typename T>
T nan_max(T a, T b) { return (std::isnan(b) || b > a) ? b : a; }
template <typename T>
T nan_min(T a, T b) { return (std::isnan(b) || b < a) ? b : a; }

template <NormKind kind, typename T>
T identity() {
  return kind == NormKind::kMin ? std::numeric_limits<T>::infinity() : T(0);
}

template <NormKind kind, typename T>
T combine(T a, T b) {
  if constexpr (kind == NormKind::kMax) return nan_max(a, b);
  else if constexpr (kind == NormKind::kMin) return nan_min(a, b);
  else return a + b;
}

// The contribution of one element, already widened to the accumulator type.
template <NormKind kind, typename T>
T scalar_step(T acc, T x) {
  if constexpr (kind == NormKind::kAbsSum) return acc + std::abs(x);
  else if constexpr (kind == NormKind::kSquareSum) return acc + x * x;
  else if constexpr (kind == NormKind::kMax) return nan_max(acc, std::abs(x));
  else if constexpr (kind == NormKind::kMin) return nan_min(acc, std::abs(x));
  else return acc + (x != T(0) ? T(1) : T(0));  // nan != 0: counted, as torch counts it
}

template <NormKind kind, typename T>
Vectorized<T> vector_step(const Vectorized<T>& acc, const Vectorized<T>& x) {
  if constexpr (kind == NormKind::kAbsSum) return acc + x.abs();
  else if constexpr (kind == NormKind::kSquareSum) return at::vec::fmadd(x, x, acc);
  else if constexpr (kind == NormKind::kMax) return at::vec::maximum(acc, x.abs());
  else if constexpr (kind == NormKind::kMin) return at::vec::minimum(acc, x.abs());
  else return acc + x.ne(Vectorized<T>(T(0)));  // ne gives 1 or 0 per lane; unordered counts
}

// Two vector partials into one, lane by lane.
template <NormKind kind, typename T>
Vectorized<T> vector_combine(const Vectorized<T>& a, const Vectorized<T>& b) {
  if constexpr (kind == NormKind::kMax) return at::vec::maximum(a, b);
  else if constexpr (kind == NormKind::kMin) return at::vec::minimum(a, b);
  else return a + b;
}

// The statistic of one segment. kPowerSum (any p other than 0, 1, 2, +-inf) runs a scalar loop:
// std::pow has no at::vec form that links without Sleef. It returns in the accumulator type,
// as the fast kinds do, so every kind's statistic has the same rounding.
template <NormKind kind, typename scalar_t>
acc_type<scalar_t> segment_statistic(const scalar_t* x, int64_t n, double p) {
  using acc_t = acc_type<scalar_t>;
  using B = Block<scalar_t>;
  acc_t result = identity<kind, acc_t>();
  int64_t i = 0;
  if constexpr (kind != NormKind::kPowerSum) {
    if (n >= B::kSize) {
      typename B::AccVec acc[4], v[4];
      for (int k = 0; k < 4; ++k) acc[k] = typename B::AccVec(identity<kind, acc_t>());
      for (; i + B::kSize <= n; i += B::kSize) {
        B::load(x + i, v);
        for (int k = 0; k < 4; ++k) acc[k] = vector_step<kind>(acc[k], v[k]);
      }
      const auto folded = vector_combine<kind>(vector_combine<kind>(acc[0], acc[1]),
                                               vector_combine<kind>(acc[2], acc[3]));
      alignas(64) acc_t lanes[B::AccVec::size()];
      folded.store(lanes);
      for (int64_t l = 0; l < B::AccVec::size(); ++l) result = combine<kind>(result, lanes[l]);
    }
  }
  if constexpr (kind == NormKind::kPowerSum) {
    // One scalar running sum over a whole segment: float64, or 32K float32 additions would
    // lose about 1e-5 relative.
    double sum = 0;
    for (; i < n; ++i) sum += std::pow(std::abs(static_cast<double>(x[i])), p);
    return static_cast<acc_t>(sum);
  }
  for (; i < n; ++i) {
    result = scalar_step<kind>(result, static_cast<acc_t>(x[i]));
  }
  return result;
}

template <NormKind kind>
double dispatch_segment_statistic(const Segment& s, double p) {
  switch (s.dtype) {
    case at::kFloat:
      return segment_statistic<kind>(static_cast<const float*>(s.data), s.numel, p);
    case at::kDouble:
      return segment_statistic<kind>(static_cast<const double*>(s.data), s.numel, p);
    case at::kHalf:
      return segment_statistic<kind>(static_cast<const at::Half*>(s.data), s.numel, p);
    case at::kBFloat16:
      return segment_statistic<kind>(static_cast<const at::BFloat16*>(s.data), s.numel, p);
    default:
      TORCH_CHECK(false, "fusedclip: unexpected dtype ", s.dtype);
  }
}

// Fills the statistic of every segment (in parallel over chunks), then reduces them in segment
// order into the total and, when asked, per tensor.
template <NormKind kind>
std::tuple<at::Tensor, at::Tensor> reduce_table(const TensorTable& table, double p,
                                                bool per_tensor) {
  const auto& segments = table.segments();
  std::vector<double> partial(segments.size());
  at::parallel_for(0, table.num_chunks(), 1, [&](int64_t begin, int64_t end) {
    for_each_segment(table, begin, end, table.memory_descending(), [&](int64_t s) {
      partial[s] = dispatch_segment_statistic<kind>(segments[s], p);
    });
  });

  const auto options = at::TensorOptions().dtype(table.accumulate_dtype());
  double total = identity<kind, double>();
  for (double value : partial) total = combine<kind>(total, value);
  at::Tensor total_tensor = at::scalar_tensor(total, options);

  at::Tensor per_tensor_result = at::empty({per_tensor ? table.num_tensors() : 0}, options);
  if (per_tensor) {
    std::vector<double> per(table.num_tensors(), identity<kind, double>());
    for (size_t s = 0; s < segments.size(); ++s) {
      per[segments[s].tensor] = combine<kind>(per[segments[s].tensor], partial[s]);
    }
    at::Tensor as_double = at::from_blob(per.data(), {table.num_tensors()}, at::kDouble);
    per_tensor_result.copy_(as_double);
  }
  return {total_tensor, per_tensor_result};
}

inline std::tuple<at::Tensor, at::Tensor> norm_statistic(const TensorTable& table, double norm_type,
                                                  bool per_tensor) {
  switch (fusedclip::norm_kind(norm_type)) {
    case NormKind::kSquareSum: return reduce_table<NormKind::kSquareSum>(table, norm_type, per_tensor);
    case NormKind::kAbsSum: return reduce_table<NormKind::kAbsSum>(table, norm_type, per_tensor);
    case NormKind::kCount: return reduce_table<NormKind::kCount>(table, norm_type, per_tensor);
    case NormKind::kMax: return reduce_table<NormKind::kMax>(table, norm_type, per_tensor);
    case NormKind::kMin: return reduce_table<NormKind::kMin>(table, norm_type, per_tensor);
    case NormKind::kPowerSum: break;
  }
  return reduce_table<NormKind::kPowerSum>(table, norm_type, per_tensor);
}


// ---------------------------------------------------------------------------------------------
// Element-wise in-place kernels: scale and clamp.
// ---------------------------------------------------------------------------------------------

// Applies op in place to every element of a segment. op has vec() for accumulator-type vectors and
// scalar() for the tail; Half and BFloat16 are widened to float and rounded once on the store.
template <typename scalar_t, typename Op>
void transform_segment(const Segment& s, const Op& op) {
  using B = Block<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  scalar_t* x = static_cast<scalar_t*>(s.data);
  typename B::AccVec v[4];
  int64_t i = 0;
  for (; i + B::kSize <= s.numel; i += B::kSize) {
    B::load(x + i, v);
    for (int k = 0; k < 4; ++k) v[k] = op.vec(v[k]);
    B::store(x + i, v);
  }
  for (; i < s.numel; ++i) {
    x[i] = static_cast<scalar_t>(op.scalar(static_cast<acc_t>(x[i])));
  }
}

template <typename Op>
void dispatch_transform_segment(const Segment& segment, const Op& op) {
  switch (segment.dtype) {
    case at::kFloat: transform_segment<float>(segment, op); break;
    case at::kDouble: transform_segment<double>(segment, op); break;
    case at::kHalf: transform_segment<at::Half>(segment, op); break;
    case at::kBFloat16: transform_segment<at::BFloat16>(segment, op); break;
    default: TORCH_CHECK(false, "fusedclip: unexpected dtype ", segment.dtype);
  }
}

// Runs op over every segment of the table, in parallel over chunks.
//
// Each thread walks its segments in the order opposite to the norm pass's (which had the same
// split over threads), so the last few MB that pass read, still in the last-level cache, are the
// first this pass touches.
template <typename Op>
void transform_table(const TensorTable& table, const Op& op) {
  const auto& segments = table.segments();
  at::parallel_for(0, table.num_chunks(), 1, [&](int64_t begin, int64_t end) {
    for_each_segment(table, begin, end, !table.memory_descending(), [&](int64_t s) {
      dispatch_transform_segment(segments[s], op);
    });
  });
}

// x * coef, with coef in the accumulator type (float32 unless the tensor is float64).
struct ScaleOp {
  double coef;
  template <typename T>
  Vectorized<T> vec(const Vectorized<T>& v) const { return v * Vectorized<T>(static_cast<T>(coef)); }
  template <typename T>
  T scalar(T v) const { return v * static_cast<T>(coef); }
};

// min(max(x, lo), hi); nan stays nan (the vector form is ATen's clamp, which keeps nan too).
struct ClampOp {
  double lo, hi;
  template <typename T>
  Vectorized<T> vec(const Vectorized<T>& v) const {
    return at::vec::clamp(v, Vectorized<T>(static_cast<T>(lo)), Vectorized<T>(static_cast<T>(hi)));
  }
  template <typename T>
  T scalar(T v) const {
    return std::isnan(v) ? v : std::min(std::max(v, static_cast<T>(lo)), static_cast<T>(hi));
  }
};


// Runs op in place over tensors that check_writable accepted. A read table that points into the
// tensors themselves (no temporaries) serves the writes too. Tensors that share memory run one at
// a time in list order, so shared bytes are transformed once per tensor, as torch does.
template <typename Op>
void transform_writable(at::TensorList tensors, const Op& op, const char* op_name,
                        const TensorTable* read_table = nullptr) {
  bump_versions(tensors);
  const auto transform_list = [&op, op_name](at::TensorList list) {
    TensorTable table(list, Access::kWrite, op_name);
    transform_table(table, op);
    table.write_back();
  };
  if (any_memory_shared(tensors)) {
    for (const at::Tensor& t : tensors) transform_list(t);
  } else if (read_table != nullptr && read_table->direct()) {
    transform_table(*read_table, op);
  } else {
    transform_list(tensors);
  }
}

inline void scale_writable(at::TensorList tensors, double coef, const char* op_name,
                           const TensorTable* read_table = nullptr) {
  if (coef >= 1.0) return;  // multiplying by 1 changes nothing; a nan coef still writes
  transform_writable(tensors, ScaleOp{coef}, op_name, read_table);
}

// The total norm from its statistic: the p-th root for finite p other than 0 and 1, taken in
// float64 and rounded once (the correctly rounded sqrt; ATen's float32 sqrt of a scalar is not
// always). The same ATen ops as fusedclip/numerics.py's total_norm_from_statistic, so both paths
// give the same bits.
inline at::Tensor total_norm_from_statistic(const at::Tensor& statistic, double norm_type, bool empty) {
  if (empty) return at::zeros_like(statistic);
  const NormKind kind = fusedclip::norm_kind(norm_type);
  if (kind != NormKind::kSquareSum && kind != NormKind::kPowerSum) return statistic;
  const at::Tensor wide = statistic.to(at::kDouble);
  return (kind == NormKind::kSquareSum ? wide.sqrt() : wide.pow(1.0 / norm_type)).to(statistic.scalar_type());
}

// The statistic of x * inv_scale over the table (csrc/cpu/unscale_norm.cpp), with found_inf.
std::tuple<at::Tensor, at::Tensor> unscaled_statistic(const TensorTable& table, double norm_type, double inv_scale);

// The total norm, again, when its sum of |x|^p overflowed the accumulator while every |x| is
// finite: largest * (sum |x / largest|^p)^(1/p), as fusedclip/reference.py's
// rescaled_if_overflowed (the rule is fusedclip.numerics.rescaled_norm). A second read of the
// tensors, only after an overflow; the total as it was otherwise.
inline at::Tensor rescaled_if_overflowed(const TensorTable& table, const at::Tensor& total, double norm_type) {
  if (!fusedclip::sum_may_overflow(fusedclip::norm_kind(norm_type)) || !std::isinf(total.item<double>())) {
    return total;
  }
  const double largest = std::get<0>(norm_statistic(table, INFINITY, false)).item<double>();
  if (!std::isfinite(largest) || largest == 0) return total;
  const double inv_scale = total.scalar_type() == at::kDouble ? 1.0 / largest : static_cast<float>(1.0 / largest);
  const double scaled = std::get<0>(unscaled_statistic(table, norm_type, inv_scale)).item<double>();
  return at::scalar_tensor(fusedclip::rescaled_norm(largest, scaled, norm_type),
                           at::TensorOptions().dtype(total.scalar_type()));
}

// torch's clip coefficient (csrc/numerics.h's rule), in the norm's dtype (float32 or float64),
// read from a CPU scalar.
inline double clip_coefficient(const at::Tensor& total, double max_norm) {
  if (total.scalar_type() == at::kDouble) return fusedclip::clip_coefficient(total.item<double>(), max_norm);
  return fusedclip::clip_coefficient(total.item<float>(), max_norm);
}

}  // namespace fusedclip::cpu
