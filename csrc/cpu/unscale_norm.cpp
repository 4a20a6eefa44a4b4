// CPU kernel of fusedclip::multi_tensor_unscale_norm: the norm statistic of x * inv_scale and
// whether any x is non-finite, in one read of the tensors. With it a GradScaler's unscale_ and the
// clipping norm share one pass; the scale by inv_scale * coef is then one multi_tensor_scale_.
#include "kernels.h"

#include <torch/library.h>

#include <cmath>
#include <utility>
#include <vector>

namespace fusedclip::cpu {
namespace {

// The statistic of one segment of x * inv_scale (the product rounded to the accumulator type, as
// torch's unscale_ computes it) and whether any x is inf or nan. The check reads x itself, not the
// product, as torch's check does: a finite x whose product overflows is not counted. x * 0 is nan
// exactly when x is inf or nan, so one running sum of x * 0 per lane is the whole check.
template <NormKind kind, typename scalar_t>
std::pair<acc_type<scalar_t>, bool> unscaled_segment_statistic(const scalar_t* x, int64_t n, double p,
                                                               acc_type<scalar_t> inv_scale) {
  using acc_t = acc_type<scalar_t>;
  using B = Block<scalar_t>;
  acc_t result = identity<kind, acc_t>();
  bool non_finite = false;
  int64_t i = 0;
  if constexpr (kind == NormKind::kPowerSum) {
    double sum = 0;  // float64 running sum, as segment_statistic does for general p
    for (; i < n; ++i) {
      const acc_t value = static_cast<acc_t>(x[i]);
      non_finite |= !std::isfinite(value);
      sum += std::pow(std::abs(static_cast<double>(value * inv_scale)), p);
    }
    return {static_cast<acc_t>(sum), non_finite};
  } else {
    if (n >= B::kSize) {
      using AccVec = typename B::AccVec;
      const AccVec inv(inv_scale), zero(acc_t(0));
      AccVec acc[4], poison[4], v[4];
      for (int k = 0; k < 4; ++k) {
        acc[k] = AccVec(identity<kind, acc_t>());
        poison[k] = zero;
      }
      for (; i + B::kSize <= n; i += B::kSize) {
        B::load(x + i, v);
        for (int k = 0; k < 4; ++k) {
          poison[k] = at::vec::fmadd(v[k], zero, poison[k]);
          acc[k] = vector_step<kind>(acc[k], v[k] * inv);
        }
      }
      const AccVec folded = vector_combine<kind>(vector_combine<kind>(acc[0], acc[1]),
                                                 vector_combine<kind>(acc[2], acc[3]));
      const AccVec poisoned = (poison[0] + poison[1]) + (poison[2] + poison[3]);
      alignas(64) acc_t lanes[AccVec::size()];
      alignas(64) acc_t poison_lanes[AccVec::size()];
      folded.store(lanes);
      poisoned.store(poison_lanes);
      for (int64_t l = 0; l < AccVec::size(); ++l) {
        result = combine<kind>(result, lanes[l]);
        non_finite |= std::isnan(poison_lanes[l]);
      }
    }
    for (; i < n; ++i) {
      const acc_t value = static_cast<acc_t>(x[i]);
      non_finite |= !std::isfinite(value);
      result = scalar_step<kind>(result, value * inv_scale);
    }
    return {result, non_finite};
  }
}

template <NormKind kind>
std::pair<double, bool> dispatch_unscaled_segment(const Segment& s, double p, double inv_scale) {
  switch (s.dtype) {
    case at::kFloat:
      return unscaled_segment_statistic<kind>(static_cast<const float*>(s.data), s.numel, p,
                                              static_cast<float>(inv_scale));
    case at::kDouble:
      return unscaled_segment_statistic<kind>(static_cast<const double*>(s.data), s.numel, p, inv_scale);
    case at::kHalf:
      return unscaled_segment_statistic<kind>(static_cast<const at::Half*>(s.data), s.numel, p,
                                              static_cast<float>(inv_scale));
    case at::kBFloat16:
      return unscaled_segment_statistic<kind>(static_cast<const at::BFloat16*>(s.data), s.numel, p,
                                              static_cast<float>(inv_scale));
    default:
      TORCH_CHECK(false, "fusedclip: unexpected dtype ", s.dtype);
  }
}

// As reduce_table: segment statistics in parallel over chunks, combined in segment order.
template <NormKind kind>
std::tuple<at::Tensor, at::Tensor> reduce_unscaled(const TensorTable& table, double p, double inv_scale) {
  const auto& segments = table.segments();
  std::vector<double> partial(segments.size());
  std::vector<char> non_finite(segments.size());
  at::parallel_for(0, table.num_chunks(), 1, [&](int64_t begin, int64_t end) {
    for_each_segment(table, begin, end, table.memory_descending(), [&](int64_t s) {
      std::tie(partial[s], non_finite[s]) = dispatch_unscaled_segment<kind>(segments[s], p, inv_scale);
    });
  });
  double total = identity<kind, double>();
  bool found = false;
  for (size_t s = 0; s < segments.size(); ++s) {
    total = combine<kind>(total, partial[s]);
    found |= non_finite[s] != 0;
  }
  return {at::scalar_tensor(total, at::TensorOptions().dtype(table.accumulate_dtype())),
          at::scalar_tensor(found ? 1.0 : 0.0, at::TensorOptions().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor> multi_tensor_unscale_norm(at::TensorList tensors,
                                                             const at::Tensor& inv_scale,
                                                             double norm_type) {
  check_norm_type(norm_type);
  check_scalar(inv_scale, "multi_tensor_unscale_norm", "inv_scale");
  const double inv = inv_scale.item<double>();  // a CPU tensor: reading it is no device sync
  const TensorTable table(tensors, Access::kRead, "multi_tensor_unscale_norm");
  return unscaled_statistic(table, norm_type, inv);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> unscaled_statistic(const TensorTable& table, double norm_type, double inv) {
  if (norm_type == 2.0) return reduce_unscaled<NormKind::kSquareSum>(table, norm_type, inv);
  if (norm_type == 1.0) return reduce_unscaled<NormKind::kAbsSum>(table, norm_type, inv);
  if (norm_type == 0.0) return reduce_unscaled<NormKind::kCount>(table, norm_type, inv);
  if (std::isinf(norm_type) && norm_type > 0) return reduce_unscaled<NormKind::kMax>(table, norm_type, inv);
  if (std::isinf(norm_type)) return reduce_unscaled<NormKind::kMin>(table, norm_type, inv);
  return reduce_unscaled<NormKind::kPowerSum>(table, norm_type, inv);
}

TORCH_LIBRARY_IMPL(fusedclip, CPU, m) {
  m.impl("multi_tensor_unscale_norm", &multi_tensor_unscale_norm);
}

}  // namespace fusedclip::cpu
