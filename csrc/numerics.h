// The numeric rules that the CPU and CUDA kernels share, in one place (C++'s side; Python's are
// in fusedclip/numerics.py). Plain C++, no torch: the .cu files include it too.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define FUSEDCLIP_HOST_DEVICE __host__ __device__
#else
#define FUSEDCLIP_HOST_DEVICE
#endif

namespace fusedclip {

// The statistic a norm type reduces, with the values of fusedclip.numerics.NormKind.
enum class NormKind : int32_t {
  kSquareSum = 0,  // p = 2: sum of x^2
  kAbsSum = 1,     // p = 1: sum of |x|
  kPowerSum = 2,   // any other finite p: sum of |x|^p
  kMax = 3,        // inf: max |x|
  kMin = 4,        // -inf: min |x|
  kCount = 5,      // p = 0: the count of nonzero elements
};

// p -> the statistic it reduces (norm_type must not be nan: the callers check it first).
inline NormKind norm_kind(double norm_type) {
  if (norm_type == 2.0) return NormKind::kSquareSum;
  if (norm_type == 1.0) return NormKind::kAbsSum;
  if (norm_type == 0.0) return NormKind::kCount;
  if (std::isinf(norm_type)) return norm_type > 0 ? NormKind::kMax : NormKind::kMin;
  return NormKind::kPowerSum;
}

// torch's: the clip coefficient is max_norm / (norm + kClipEps), clamped to 1.
constexpr double kClipEps = 1e-6;

// The norm from its statistic: the p-th root for finite p other than 0 and 1 (0 for no elements),
// taken in float64 and rounded once to A, as the CPU kernels take it.
template <NormKind kind, typename A>
FUSEDCLIP_HOST_DEVICE A root_of_statistic(A statistic, double p, bool empty) {
  if (empty) return A(0);
  if constexpr (kind == NormKind::kSquareSum) return static_cast<A>(sqrt(static_cast<double>(statistic)));
  else if constexpr (kind == NormKind::kPowerSum) return static_cast<A>(pow(static_cast<double>(statistic), 1.0 / p));
  else return statistic;
}

// Whether a norm's statistic is a sum of |x|^p (fusedclip.numerics.SUM_KINDS), which can leave
// its accumulator's range while every |x| is finite.
FUSEDCLIP_HOST_DEVICE inline bool is_sum_kind(NormKind kind) {
  return kind == NormKind::kSquareSum || kind == NormKind::kAbsSum || kind == NormKind::kPowerSum;
}

// Whether a norm taken from its sum may be wrong only because the sum left its accumulator's
// range, and is taken again of x / pivot (rescaled_norm): a norm of inf or 0, from a sum that
// overflowed or underflowed to 0 (for p < 0, the other way round). Both are also true norms: an
// inf or nan element keeps its inf or nan, and a norm of 0 stays where the pivot is 0 (every
// element 0 for p > 0, one of them for p < 0).
inline bool norm_out_of_range(double norm, double p) {
  return is_sum_kind(norm_kind(p)) && (std::isinf(norm) || norm == 0);
}

// The norm type whose norm is the pivot: max|x| for p > 0, min|x| for p < 0. Each |x / pivot|^p is
// then at most 1 and the pivot's own is 1, so their sum lies in [1, n] and cannot leave the range.
inline double pivot_norm_type(double p) { return p > 0 ? INFINITY : -INFINITY; }

// The norm from the pivot (finite, nonzero) and the statistic of x / pivot:
// pivot * statistic^(1/p), in float64 (fusedclip.numerics.rescaled_norm).
FUSEDCLIP_HOST_DEVICE inline double rescaled_norm(double pivot, double scaled_statistic, double p) {
  if (p == 1.0) return pivot * scaled_statistic;
  if (p == 2.0) return pivot * sqrt(scaled_statistic);
  return pivot * pow(scaled_statistic, 1.0 / p);
}

// min(max_norm * (1 / (total + kClipEps)), 1) with the operations and roundings of torch's
// ((total + 1e-6).reciprocal() * max_norm).clamp(max=1.0), in the norm's type A; nan kept.
template <typename A>
FUSEDCLIP_HOST_DEVICE A clip_coefficient(A total, double max_norm) {
  const A coef = static_cast<A>(max_norm) * (A(1) / (total + static_cast<A>(kClipEps)));
  return (coef != coef || coef < A(1)) ? coef : A(1);
}

// AGC (timm's adaptive_clip_grad) of one unit from the sums of squares of its gradient and its
// parameter: W* = clip_factor * max(||param||, eps); when not ||grad|| < W*, the unit is scaled by
// W* / max(||grad||, 1e-6). In float64, with std::max's rule (a nan first argument is kept), so a
// nan norm fails the comparison and scales by nan, as timm's torch.where does. Returns whether the
// unit is scaled, and the factor in *coef when it is.
FUSEDCLIP_HOST_DEVICE inline bool agc_scales(double grad_sq, double param_sq, double clip_factor, double eps,
                                             double* coef) {
  const double param_norm = sqrt(param_sq);
  const double max_norm = clip_factor * (param_norm < eps ? eps : param_norm);
  const double grad_norm = sqrt(grad_sq);
  if (grad_norm < max_norm) return false;
  *coef = max_norm / (grad_norm < 1e-6 ? 1e-6 : grad_norm);
  return true;
}

}  // namespace fusedclip
