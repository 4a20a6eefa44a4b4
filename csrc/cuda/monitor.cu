// monitor_update_: GradientMonitor's per-step update of its per-parameter statistics and flags,
// one thread per entry. Every step is one ATen op of fusedclip.reference.monitor_update_ (the
// definition) in the norms' dtype, each product, sum and quotient rounded on its own (the _rn
// intrinsics, which nvcc never contracts into fused multiply-adds), so the results are bitwise
// those of the reference and of the CPU kernel (csrc/cpu/monitor.cpp). The kernel, its launcher,
// and the operator's stable-ABI glue and registration.
#include <optional>

#include "device.cuh"
#include "glue.h"

namespace fusedclip::cuda {
namespace {

// monitor_update_ (fusedclip.reference.monitor_update_): one entry per thread.
struct MonitorParams {
  const void* norms;         // float32, or float64 when is_double; mean and var alike
  void* mean;
  void* var;
  int64_t* count;
  int64_t* below;
  int64_t* explosions;
  bool* exploding;
  bool* vanishing;
  int64_t size;
  bool is_double;
  bool has_explode;
  double ema_weight;         // 1 - alpha, in float64 (the kernel rounds it to the norms' dtype)
  double z_squared;          // z_threshold^2, in float64
  double explode_threshold;
  double vanish_eps;
  int64_t warmup_steps;
  int64_t vanish_steps;
};

// a op b rounded once to nearest even: the _rn intrinsics, which nvcc never contracts into fused
// multiply-adds (a plain a * b + c may become one, with one rounding instead of two).
enum class Op { kAdd, kSub, kMul, kDiv };

template <Op op> __device__ __forceinline__ float rn(float a, float b) {
  return op == Op::kAdd ? __fadd_rn(a, b) : op == Op::kSub ? __fsub_rn(a, b) : op == Op::kMul ? __fmul_rn(a, b) : __fdiv_rn(a, b);
}
template <Op op> __device__ __forceinline__ double rn(double a, double b) {
  return op == Op::kAdd ? __dadd_rn(a, b) : op == Op::kSub ? __dsub_rn(a, b) : op == Op::kMul ? __dmul_rn(a, b) : __ddiv_rn(a, b);
}

template <typename T>
__device__ void update_entry(const MonitorParams& m, int64_t i) {
  // Python float arguments enter the reference's ops as scalars cast to the norms' dtype.
  const T ema_weight = static_cast<T>(m.ema_weight);
  const T z_squared = static_cast<T>(m.z_squared);
  const T var_eps = static_cast<T>(1e-12);
  const T n = static_cast<const T*>(m.norms)[i];
  T* mean = static_cast<T*>(m.mean) + i;
  T* var = static_cast<T*>(m.var) + i;
  const T mu = *mean;
  const T sigma2 = *var;
  const int64_t count = m.count[i];
  const bool finite = isfinite(n);
  const bool warm = count >= m.warmup_steps;
  const T deviation = finite ? rn<Op::kSub>(n, mu) : T(0);
  const T square = rn<Op::kMul>(deviation, deviation);
  const bool spike = deviation > T(0) && square > rn<Op::kMul>(z_squared, rn<Op::kAdd>(sigma2, var_eps));
  bool explodes = !finite || (warm && spike);
  if (m.has_explode) explodes = explodes || n > static_cast<T>(m.explode_threshold);
  T weight = warm ? ema_weight : rn<Op::kDiv>(T(1), static_cast<T>(count + 1));
  weight = finite ? weight : T(0);
  const T keep = rn<Op::kSub>(T(1), weight);
  const T factor = warm ? rn<Op::kMul>(keep, keep) : keep;
  *mean = rn<Op::kAdd>(mu, rn<Op::kMul>(weight, deviation));
  *var = rn<Op::kAdd>(sigma2, rn<Op::kMul>(weight, rn<Op::kSub>(rn<Op::kMul>(factor, square), sigma2)));
  m.count[i] = count + (finite ? 1 : 0);
  const int64_t below = n < static_cast<T>(m.vanish_eps) ? m.below[i] + 1 : 0;
  m.below[i] = below;
  m.explosions[i] += explodes ? 1 : 0;
  m.exploding[i] = explodes;
  m.vanishing[i] = below >= m.vanish_steps;
}

__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm) monitor_kernel(const MonitorParams params) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= params.size) return;
  if (params.is_double) update_entry<double>(params, i);
  else update_entry<float>(params, i);
}

cudaError_t launch_monitor_update(const MonitorParams& params, cudaStream_t stream) {
  if (params.size == 0) return cudaSuccess;
  const int64_t blocks = (params.size + kBlockThreads - 1) / kBlockThreads;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  monitor_kernel<<<static_cast<unsigned int>(blocks), kBlockThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

// --- the operator ------------------------------------------------------------------------------

void monitor_update_(Tensor norms, Tensor mean, Tensor var, Tensor count, Tensor below, Tensor explosions,
                     Tensor exploding, Tensor vanishing, double alpha, int64_t warmup_steps, double z_threshold,
                     std::optional<double> explode_threshold, double vanish_eps, int64_t vanish_steps) {
  check_monitor_state(norms, mean, var, count, below, explosions, exploding, vanishing, DeviceType::CUDA);
  const DeviceOf device(norms);
  MonitorParams params{};
  params.norms = norms.data_ptr();
  params.mean = mean.data_ptr();
  params.var = var.data_ptr();
  params.count = static_cast<int64_t*>(count.data_ptr());
  params.below = static_cast<int64_t*>(below.data_ptr());
  params.explosions = static_cast<int64_t*>(explosions.data_ptr());
  params.exploding = static_cast<bool*>(exploding.data_ptr());
  params.vanishing = static_cast<bool*>(vanishing.data_ptr());
  params.size = norms.size(0);
  params.is_double = norms.scalar_type() == ScalarType::Double;
  params.has_explode = explode_threshold.has_value();
  params.ema_weight = 1.0 - alpha;
  params.z_squared = z_threshold * z_threshold;
  params.explode_threshold = explode_threshold.value_or(0.0);
  params.vanish_eps = vanish_eps;
  params.warmup_steps = warmup_steps;
  params.vanish_steps = vanish_steps;
  FUSEDCLIP_CUDA_CHECK(launch_monitor_update(params, device.stream));
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fusedclip, CUDA, m) {
  m.impl("monitor_update_", TORCH_BOX(&monitor_update_));
}

}  // namespace fusedclip::cuda
