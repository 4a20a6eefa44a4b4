// CPU kernel of monitor_update_ (schema in fusedclip/operators.py): GradientMonitor's per-step
// update of its per-parameter statistics and flags, in one loop over the entries. It replaces
// about thirty ATen elementwise ops on vectors of one entry per parameter, each of which costs
// more in dispatch than its arithmetic at a few thousand entries.
//
// Every step below is one ATen op of fusedclip.reference.monitor_update_ (the definition), done
// in the norms' dtype with each product and sum rounded on its own, so the results are bitwise
// those of the reference. Contraction into fused multiply-adds would change roundings, hence
// the pragmas.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "../tensor_checks.h"

#include <cmath>
#include <cstdint>
#include <optional>

namespace fusedclip::cpu {
namespace {

template <typename T>
void update(const Tensor& norms, const Tensor& mean, const Tensor& var, const Tensor& count,
            const Tensor& below, const Tensor& explosions, const Tensor& exploding,
            const Tensor& vanishing, double alpha, int64_t warmup_steps, double z_threshold,
            std::optional<double> explode_threshold, double vanish_eps, int64_t vanish_steps) {
  // Python float arguments enter the reference's ops as scalars cast to the norms' dtype.
  const T ema_weight = static_cast<T>(1.0 - alpha);
  const T z_squared = static_cast<T>(z_threshold * z_threshold);
  const T var_eps = static_cast<T>(1e-12);
  const T vanish = static_cast<T>(vanish_eps);
  const bool has_explode = explode_threshold.has_value();
  const T explode = has_explode ? static_cast<T>(*explode_threshold) : T(0);
  const auto* n_ptr = static_cast<const T*>(norms.const_data_ptr());
  auto* mean_ptr = static_cast<T*>(mean.mutable_data_ptr());
  auto* var_ptr = static_cast<T*>(var.mutable_data_ptr());
  auto* count_ptr = static_cast<int64_t*>(count.mutable_data_ptr());
  auto* below_ptr = static_cast<int64_t*>(below.mutable_data_ptr());
  auto* explosions_ptr = static_cast<int64_t*>(explosions.mutable_data_ptr());
  auto* exploding_ptr = static_cast<bool*>(exploding.mutable_data_ptr());
  auto* vanishing_ptr = static_cast<bool*>(vanishing.mutable_data_ptr());
  const int64_t size = norms.numel();
  for (int64_t i = 0; i < size; ++i) {
    const T n = n_ptr[i];
    const T mu = mean_ptr[i];
    const T sigma2 = var_ptr[i];
    const bool finite = std::isfinite(n);
    const bool warm = count_ptr[i] >= warmup_steps;
    const T deviation = finite ? T(n - mu) : T(0);
    const T square = deviation * deviation;
    const T spread = sigma2 + var_eps;
    const bool spike = deviation > T(0) && square > T(z_squared * spread);
    bool explodes = !finite || (warm && spike);
    if (has_explode) {
      explodes = explodes || n > explode;
    }
    T weight = warm ? ema_weight : T(T(1) / static_cast<T>(count_ptr[i] + 1));
    weight = finite ? weight : T(0);
    const T keep = T(1) - weight;
    const T factor = warm ? T(keep * keep) : keep;
    const T step_mean = weight * deviation;
    mean_ptr[i] = mu + step_mean;
    const T scaled = factor * square;
    const T difference = scaled - sigma2;
    const T step_var = weight * difference;
    var_ptr[i] = sigma2 + step_var;
    count_ptr[i] += finite;
    below_ptr[i] = n < vanish ? below_ptr[i] + 1 : 0;
    explosions_ptr[i] += explodes;
    exploding_ptr[i] = explodes;
    vanishing_ptr[i] = below_ptr[i] >= vanish_steps;
  }
}

void monitor_update_(Tensor norms, Tensor mean, Tensor var, Tensor count, Tensor below, Tensor explosions,
                     Tensor exploding, Tensor vanishing, double alpha, int64_t warmup_steps,
                     double z_threshold, std::optional<double> explode_threshold, double vanish_eps,
                     int64_t vanish_steps) {
  check_monitor_state(norms, mean, var, count, below, explosions, exploding, vanishing, DeviceType::CPU);
  if (norms.scalar_type() == ScalarType::Double) {
    update<double>(norms, mean, var, count, below, explosions, exploding, vanishing, alpha, warmup_steps,
                   z_threshold, explode_threshold, vanish_eps, vanish_steps);
  } else {
    update<float>(norms, mean, var, count, below, explosions, exploding, vanishing, alpha, warmup_steps,
                  z_threshold, explode_threshold, vanish_eps, vanish_steps);
  }
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fusedclip, CPU, m) {
  m.impl("monitor_update_", TORCH_BOX(&monitor_update_));
}

}  // namespace fusedclip::cpu
