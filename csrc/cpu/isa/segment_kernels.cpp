// The per-segment kernels that the CPU operators share (declared in csrc/cpu/segment_kernels.h),
// for one instruction set: setup.py compiles this file once per instruction set (see isa_object.h).
//
// Each kernel keeps four vector accumulators (the FMA and add pipelines stay busy), folds them
// lane by lane, then adds the scalar tail: the same order for a given segment, whatever the thread
// count. The order depends on the vector width, so each instruction set rounds a float32 sum in
// its own (fixed) way.
#include "isa_object.h"

namespace FUSEDCLIP_ISA_NAMESPACE {

#include "vec.h"

namespace {

// --- the reductions ---------------------------------------------------------------------------------
// Max and min propagate nan (IEEE maximum/minimum), which plain max/min instructions do not.

inline float absolute(float x) { return __builtin_fabsf(x); }
inline double absolute(double x) { return __builtin_fabs(x); }

template <typename T>
T nan_max(T a, T b) { return (__builtin_isnan(b) || b > a) ? b : a; }
template <typename T>
T nan_min(T a, T b) { return (__builtin_isnan(b) || b < a) ? b : a; }

template <NormKind kind, typename T>
T identity() {
  return kind == NormKind::kMin ? T(__builtin_inf()) : T(0);
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
  if constexpr (kind == NormKind::kAbsSum) return acc + absolute(x);
  else if constexpr (kind == NormKind::kSquareSum) return acc + x * x;
  else if constexpr (kind == NormKind::kMax) return nan_max(acc, absolute(x));
  else if constexpr (kind == NormKind::kMin) return nan_min(acc, absolute(x));
  else return acc + (x != T(0) ? T(1) : T(0));  // nan != 0: counted, as torch counts it
}

template <NormKind kind, typename V>
V vector_combine(const V& a, const V& b) {
  if constexpr (kind == NormKind::kMax) return ((b > a) | (b != b)) ? b : a;
  else if constexpr (kind == NormKind::kMin) return ((b < a) | (b != b)) ? b : a;
  else return a + b;
}

template <NormKind kind, typename V>
V vector_step(const V& acc, const V& x) {
  if constexpr (kind == NormKind::kAbsSum) return acc + vabs(x);
  else if constexpr (kind == NormKind::kSquareSum) return acc + x * x;  // contracted into an FMA
  else if constexpr (kind == NormKind::kMax || kind == NormKind::kMin) return vector_combine<kind>(acc, vabs(x));
  else return acc + ((x != V{}) ? splat<V>(1.0f) : V{});  // nan != 0: counted
}

// The statistic of n elements at x. kPowerSum (p other than 0, 1, 2, +-inf) runs a scalar float64
// loop (std::pow has no vector form here), rounded to the accumulator type as the other kinds are.
// With inv_scale, of x * inv_scale, and *non_finite set when some x is inf or nan (the check reads x
// itself, as torch's unscale_ does: a finite x whose product overflows is not counted; x * 0 is nan
// exactly when x is inf or nan, so one running sum of x * 0 per lane is the whole check).
template <NormKind kind, DType dtype, bool unscale>
double statistic_of(const void* data, int64_t n, double p, double inv_scale_value, bool* non_finite) {
  using T = Traits<dtype>;
  using acc_t = typename T::acc;
  using V = typename Vec<acc_t>::type;
  constexpr int64_t kLanes = Vec<acc_t>::kLanes;
  constexpr int64_t kBlock = 4 * kLanes;
  const auto* x = static_cast<const typename T::storage*>(data);
  const acc_t inv_scale = static_cast<acc_t>(inv_scale_value);
  int64_t i = 0;
  bool found = false;
  if constexpr (kind == NormKind::kPowerSum) {
    double sum = 0;
    for (; i < n; ++i) {
      const acc_t value = T::widen(x[i]);
      if constexpr (unscale) found |= !__builtin_isfinite(value);
      sum += __builtin_pow(absolute(static_cast<double>(unscale ? value * inv_scale : value)), p);
    }
    if constexpr (unscale) *non_finite |= found;
    return static_cast<acc_t>(sum);
  }
  acc_t result = identity<kind, acc_t>();
  if (n >= kBlock) {
    V acc[4], poison[4];
    const V inv = splat<V>(inv_scale);
    for (int k = 0; k < 4; ++k) {
      acc[k] = splat<V>(identity<kind, acc_t>());
      poison[k] = V{};
    }
    for (; i + kBlock <= n; i += kBlock) {
      for (int k = 0; k < 4; ++k) {
        const V v = T::load(x + i + k * kLanes);
        if constexpr (unscale) {
          poison[k] += v * V{};
          acc[k] = vector_step<kind>(acc[k], v * inv);
        } else {
          acc[k] = vector_step<kind>(acc[k], v);
        }
      }
    }
    const V folded = vector_combine<kind>(vector_combine<kind>(acc[0], acc[1]), vector_combine<kind>(acc[2], acc[3]));
    for (int64_t l = 0; l < kLanes; ++l) result = combine<kind>(result, folded[l]);
    if constexpr (unscale) {
      const V poisoned = (poison[0] + poison[1]) + (poison[2] + poison[3]);
      for (int64_t l = 0; l < kLanes; ++l) found |= __builtin_isnan(poisoned[l]);
    }
  }
  for (; i < n; ++i) {
    const acc_t value = T::widen(x[i]);
    if constexpr (unscale) {
      found |= !__builtin_isfinite(value);
      result = scalar_step<kind>(result, value * inv_scale);
    } else {
      result = scalar_step<kind>(result, value);
    }
  }
  if constexpr (unscale) *non_finite |= found;
  return result;
}

template <NormKind kind, bool unscale>
double statistic_of_segment(const Segment& s, double p, double inv_scale, bool* non_finite) {
  switch (s.dtype) {
    case DType::kFloat32: return statistic_of<kind, DType::kFloat32, unscale>(s.data, s.numel, p, inv_scale, non_finite);
    case DType::kFloat64: return statistic_of<kind, DType::kFloat64, unscale>(s.data, s.numel, p, inv_scale, non_finite);
    case DType::kFloat16: return statistic_of<kind, DType::kFloat16, unscale>(s.data, s.numel, p, inv_scale, non_finite);
    case DType::kBFloat16: break;
  }
  return statistic_of<kind, DType::kBFloat16, unscale>(s.data, s.numel, p, inv_scale, non_finite);
}

template <bool unscale>
double statistic_of_kind(NormKind kind, const Segment& s, double p, double inv_scale, bool* non_finite) {
  switch (kind) {
    case NormKind::kSquareSum: return statistic_of_segment<NormKind::kSquareSum, unscale>(s, p, inv_scale, non_finite);
    case NormKind::kAbsSum: return statistic_of_segment<NormKind::kAbsSum, unscale>(s, p, inv_scale, non_finite);
    case NormKind::kCount: return statistic_of_segment<NormKind::kCount, unscale>(s, p, inv_scale, non_finite);
    case NormKind::kMax: return statistic_of_segment<NormKind::kMax, unscale>(s, p, inv_scale, non_finite);
    case NormKind::kMin: return statistic_of_segment<NormKind::kMin, unscale>(s, p, inv_scale, non_finite);
    case NormKind::kPowerSum: break;
  }
  return statistic_of_segment<NormKind::kPowerSum, unscale>(s, p, inv_scale, non_finite);
}

// --- in-place element-wise kernels ------------------------------------------------------------------

// x * coef, coef in the accumulator type.
struct ScaleOp {
  double coef;
  template <typename V>
  V vec(const V& v) const { return v * static_cast<std::remove_reference_t<decltype(v[0])>>(coef); }
  template <typename T>
  T scalar(T v) const { return v * static_cast<T>(coef); }
};

// min(max(x, lo), hi); nan fails both comparisons and stays nan.
struct ClampOp {
  double lo, hi;
  template <typename V>
  V vec(const V& v) const {
    using T = std::remove_const_t<std::remove_reference_t<decltype(v[0])>>;
    const V low = splat<V>(static_cast<T>(lo)), high = splat<V>(static_cast<T>(hi));
    const V raised = (v < low) ? low : v;
    return (raised > high) ? high : raised;
  }
  template <typename T>
  T scalar(T v) const {
    const T raised = v < static_cast<T>(lo) ? static_cast<T>(lo) : v;
    return raised > static_cast<T>(hi) ? static_cast<T>(hi) : raised;
  }
};

// op in place over n elements at data; float16 and bfloat16 widened to float32 and rounded once.
template <DType dtype, typename Op>
void transform(void* data, int64_t n, const Op& op) {
  using T = Traits<dtype>;
  using acc_t = typename T::acc;
  constexpr int64_t kLanes = Vec<acc_t>::kLanes;
  constexpr int64_t kBlock = 4 * kLanes;
  auto* x = static_cast<typename T::storage*>(data);
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    for (int k = 0; k < 4; k += 2) {  // in pairs: bfloat16 packs two vectors at once
      T::store2(x + i + k * kLanes, op.vec(T::load(x + i + k * kLanes)), op.vec(T::load(x + i + (k + 1) * kLanes)));
    }
  }
  for (; i < n; ++i) x[i] = T::narrow(op.scalar(T::widen(x[i])));
}

template <typename Op>
void transform_segment(const Segment& s, const Op& op) {
  switch (s.dtype) {
    case DType::kFloat32: transform<DType::kFloat32>(s.data, s.numel, op); return;
    case DType::kFloat64: transform<DType::kFloat64>(s.data, s.numel, op); return;
    case DType::kFloat16: transform<DType::kFloat16>(s.data, s.numel, op); return;
    case DType::kBFloat16: transform<DType::kBFloat16>(s.data, s.numel, op); return;
  }
}

}  // namespace

double statistic(NormKind kind, const Segment& s, double p) {
  return statistic_of_kind<false>(kind, s, p, 1.0, nullptr);
}

double unscaled_statistic(NormKind kind, const Segment& s, double p, double inv_scale, bool* non_finite) {
  return statistic_of_kind<true>(kind, s, p, inv_scale, non_finite);
}

void scale(const Segment& s, double coef) { transform_segment(s, ScaleOp{coef}); }
void clamp(const Segment& s, double lo, double hi) { transform_segment(s, ClampOp{lo, hi}); }

}  // namespace FUSEDCLIP_ISA_NAMESPACE
