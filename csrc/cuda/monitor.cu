// monitor_update_: GradientMonitor's per-step update of its per-parameter statistics and flags,
// one thread per entry. Every step is one ATen op of fusedclip.reference.monitor_update_ (the
// definition) in the norms' dtype, each product, sum and quotient rounded on its own (the _rn
// intrinsics, which nvcc never contracts into fused multiply-adds), so the results are bitwise
// those of the reference and of the CPU kernel (csrc/cpu/monitor.cpp).
#include "device.cuh"

namespace fusedclip::cuda {
namespace {

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

}  // namespace

cudaError_t launch_monitor_update(const MonitorParams& params, cudaStream_t stream) {
  if (params.size == 0) return cudaSuccess;
  const int64_t blocks = (params.size + kBlockThreads - 1) / kBlockThreads;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  monitor_kernel<<<static_cast<unsigned int>(blocks), kBlockThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace fusedclip::cuda
