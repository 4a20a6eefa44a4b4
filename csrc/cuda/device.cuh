// Device building blocks shared by the kernels: element loads and conversions, the norm
// statistics, deterministic block reductions, one chunk's statistic, the finish of a launch, and
// the in-place transform of one chunk.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels.cuh"

namespace fusedclip::cuda {

// float32 accumulation for fp16/bf16/fp32, float64 for fp64.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<std::remove_const_t<T>>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// Rounds once, to nearest even, as ATen's conversions do.
template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// f(Type<T>{}) for the element type T of dtype: the one switch from a runtime dtype to the code
// templated on it.
template <typename T> struct Type { using type = T; };

template <typename F>
__device__ __forceinline__ auto with_dtype(DType dtype, const F& f) {
  switch (dtype) {
    case DType::kFloat64: return f(Type<double>{});
    case DType::kFloat32: return f(Type<float>{});
    case DType::kFloat16: return f(Type<__half>{});
    default: return f(Type<__nv_bfloat16>{});
  }
}

// ---------------------------------------------------------------------------------------------
// Norm statistics. max and min propagate nan (fmaxf/fminf would drop it).
// ---------------------------------------------------------------------------------------------

template <typename A> __device__ __forceinline__ A nan_max(A a, A b) { return (isnan(b) || b > a) ? b : a; }
template <typename A> __device__ __forceinline__ A nan_min(A a, A b) { return (isnan(b) || b < a) ? b : a; }

template <NormKind kind, typename A>
__device__ __forceinline__ A identity() {
  if constexpr (kind == NormKind::kMin) return A(INFINITY);
  else return A(0);
}

template <NormKind kind, typename A>
__device__ __forceinline__ A combine(A a, A b) {
  if constexpr (kind == NormKind::kMax) return nan_max(a, b);
  else if constexpr (kind == NormKind::kMin) return nan_min(a, b);
  else return a + b;
}

// The running sum of a thread: the accumulator type, but float64 for a general p, whose terms
// |x|^p are computed and summed in float64 (as the CPU kernels' std::pow and Triton's do); the
// chunk's sum is then rounded to the accumulator type.
template <NormKind kind, typename T>
using sum_t = std::conditional_t<kind == NormKind::kPowerSum, double, acc_t<T>>;

// The contribution of one element x, in the accumulator type A, to the running sum S.
template <NormKind kind, typename S, typename A>
__device__ __forceinline__ S step(S acc, A x, double p) {
  if constexpr (kind == NormKind::kAbsSum) return acc + fabs(x);
  else if constexpr (kind == NormKind::kSquareSum) return fma(x, x, acc);
  else if constexpr (kind == NormKind::kPowerSum) return acc + pow(fabs(static_cast<double>(x)), p);
  else if constexpr (kind == NormKind::kMax) return nan_max(acc, A(fabs(x)));
  else if constexpr (kind == NormKind::kMin) return nan_min(acc, A(fabs(x)));
  else return acc + (x != A(0) ? A(1) : A(0));  // nan != 0: counted, as torch counts it
}

// ---------------------------------------------------------------------------------------------
// Walking the elements of a chunk.
// ---------------------------------------------------------------------------------------------

// kVec elements of 16 bytes: loaded and stored as one 16-byte access (as ATen's aligned_vector).
template <typename E>
struct alignas(16) Vector16 {
  E values[16 / sizeof(E)];
};

// Visits this thread's elements of x[0, n) (the block strides over them) as f(value) in the
// accumulator type; for a non-const T, stores f's result back, rounded once to T. kInFlight
// 16-byte vector loads are in flight per thread where x is 16-byte aligned; element loads
// otherwise and for the tail. n <= kChunkElements.
template <int kInFlight = 4, typename T, typename F>
__device__ __forceinline__ void walk(T* x, int n, const F& f) {
  using E = std::remove_const_t<T>;
  using V = Vector16<E>;
  constexpr bool kWrite = !std::is_const_v<T>;
  constexpr int kVec = 16 / sizeof(T);
  const auto visit = [&f](auto& element) {
    if constexpr (kWrite) element = from_acc<E>(f(to_acc(element)));
    else f(to_acc(element));
  };
  int done = 0;
  if (reinterpret_cast<uintptr_t>(x) % 16 == 0) {
    using VP = std::conditional_t<kWrite, V*, const V*>;
    VP vectors = reinterpret_cast<VP>(x);
    const int num_vectors = n / kVec;
    const int stride = blockDim.x;
    int i = threadIdx.x;
    for (; i + (kInFlight - 1) * stride < num_vectors; i += kInFlight * stride) {
      V v[kInFlight];
#pragma unroll
      for (int k = 0; k < kInFlight; ++k) v[k] = vectors[i + k * stride];
#pragma unroll
      for (int k = 0; k < kInFlight; ++k) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) visit(v[k].values[j]);
        if constexpr (kWrite) vectors[i + k * stride] = v[k];
      }
    }
    for (; i < num_vectors; i += stride) {
      V v = vectors[i];
#pragma unroll
      for (int j = 0; j < kVec; ++j) visit(v.values[j]);
      if constexpr (kWrite) vectors[i] = v;
    }
    done = num_vectors * kVec;
  }
  for (int i = done + threadIdx.x; i < n; i += blockDim.x) visit(x[i]);
}

// This thread's share of the statistic of x[0, n); with kUnscale, of x * inv_scale (the product
// in the accumulator type, as torch's unscale_ computes it), and a poison sum of x * 0, which is
// nan exactly when some x is inf or nan (the check reads x itself, as torch's does).
template <NormKind kind, typename T>
struct ThreadShare {
  sum_t<kind, T> value;
  acc_t<T> poison;
};

template <NormKind kind, bool kUnscale, typename T>
__device__ __forceinline__ ThreadShare<kind, T> thread_share(const T* x, int n, double p, acc_t<T> inv_scale) {
  using A = acc_t<T>;
  ThreadShare<kind, T> share{identity<kind, sum_t<kind, T>>(), A(0)};
  // A general p is bound by float64 pow, not by memory: one load in flight leaves pow the
  // registers it needs without spilling.
  constexpr int kInFlight = kind == NormKind::kPowerSum ? 1 : 4;
  walk<kInFlight>(x, n, [&](A v) {
    if constexpr (kUnscale) {
      share.poison = fma(v, A(0), share.poison);
      v = v * inv_scale;
    }
    share.value = step<kind>(share.value, v, p);
  });
  return share;
}

// ---------------------------------------------------------------------------------------------
// Deterministic reductions: the order of combination is fixed (shuffle trees, then warps in
// order), so results do not depend on timing.
// ---------------------------------------------------------------------------------------------

// The reduction of value over the warp, in lane 0.
template <NormKind kind, typename A>
__device__ __forceinline__ A warp_reduce(A value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    value = combine<kind>(value, __shfl_down_sync(0xffffffffu, value, offset));
  }
  return value;
}

// The sum of value over aligned groups of `group` lanes (a power of two <= 32), in every lane of
// the group, with the same bits in each (a butterfly: a + b and b + a are the same float). Every
// lane of the warp must call it.
template <typename A>
__device__ __forceinline__ A group_sum(A value, int group) {
  for (int mask = group / 2; mask > 0; mask /= 2) value += __shfl_xor_sync(0xffffffffu, value, mask);
  return value;
}

// The reduction of value over the block, returned to every thread. Every thread must call it.
template <NormKind kind, typename A>
__device__ A block_reduce(A value) {
  __shared__ A warp_values[32];
  __shared__ A result;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  value = warp_reduce<kind>(value);
  if (lane == 0) warp_values[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = warp_reduce<kind>(lane < (blockDim.x + 31) / 32 ? warp_values[lane] : identity<kind, A>());
    if (lane == 0) result = value;
  }
  __syncthreads();
  const A reduced = result;
  __syncthreads();  // the next call may overwrite the shared values
  return reduced;
}

// A statistic over a block, and (unscale) whether some element is inf or nan.
struct BlockStatistic {
  double value;
  bool non_finite;
};

// The statistic of x[0, n) over the block, rounded to the accumulator type, as float64, in every
// thread; with kUnscale, of x * inv_scale, and whether some x is inf or nan. Every thread of the
// block must call it.
template <NormKind kind, bool kUnscale = false, typename T>
__device__ BlockStatistic block_statistic(const T* x, int n, double p, double inv_scale = 1.0) {
  using A = acc_t<T>;
  const ThreadShare<kind, T> share = thread_share<kind, kUnscale>(x, n, p, static_cast<A>(inv_scale));
  const A value = static_cast<A>(block_reduce<kind>(share.value));
  bool non_finite = false;
  if constexpr (kUnscale) non_finite = __syncthreads_or(isnan(share.poison)) != 0;
  return {static_cast<double>(value), non_finite};
}

// ---------------------------------------------------------------------------------------------
// Chunks of a table, coefficients.
// ---------------------------------------------------------------------------------------------

struct ChunkView {
  char* data;  // first element of the chunk
  int numel;
  DType dtype;
  int tensor;  // in the table
};

template <int kCapacity>
__device__ __forceinline__ ChunkView chunk_view(const TensorTable<kCapacity>& table, int c) {
  const ChunkSpan span = chunk_span(table, c);
  const DType dtype = table.dtype[span.tensor];
  return {static_cast<char*>(table.data[span.tensor]) + span.offset * element_size(dtype), span.numel, dtype,
          span.tensor};
}

// Coefficient `index` of coef (index 0 for a single one) as float64: a device value of any float
// dtype, or the value given.
__device__ __forceinline__ double read_coef(const Coef& coef, int64_t index) {
  if (coef.data == nullptr) return coef.value;
  return with_dtype(coef.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    return static_cast<double>(to_acc(static_cast<const T*>(coef.data)[index]));
  });
}

// The statistic of a chunk in float64, the same in every thread (see block_statistic). Every
// thread of the block must call it. Not inlined: the same code serves every tier of the table
// (compiled once per kind, not once per kind and tier).
template <NormKind kind, bool kUnscale>
__device__ __noinline__ BlockStatistic chunk_statistic(const ChunkView chunk, const NormParams& params) {
  const double inv_scale = kUnscale ? read_coef(params.inv_scale, 0) : 1.0;
  return with_dtype(chunk.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    return block_statistic<kind, kUnscale>(reinterpret_cast<const T*>(chunk.data), chunk.numel, params.p, inv_scale);
  });
}

// ---------------------------------------------------------------------------------------------
// The finish of a launch (see NormParams).
// ---------------------------------------------------------------------------------------------

// True, in every thread, in the block of the launch that finishes last: every block takes a
// ticket after its writes, and the fence makes them visible before the ticket, so the block that
// draws the last one sees every block's partial. Every thread of the block must call it.
__device__ __forceinline__ bool is_last_block(const NormParams& params) {
  __shared__ bool is_last;
  if (threadIdx.x == 0) {
    __threadfence();
    is_last = atomicAdd(params.tickets + params.launch, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (is_last) __threadfence();
  return is_last;
}

// The statistic, and the total norm and the coefficient of csrc/numerics.h when asked, in the
// norm's dtype A.
template <NormKind kind, typename A>
__device__ void write_outputs(A statistic, const NormParams& params) {
  *static_cast<A*>(params.statistic) = statistic;
  const A total = fusedclip::root_of_statistic<kind>(statistic, params.p, params.empty);
  if (params.total != nullptr) *static_cast<A*>(params.total) = total;
  if (params.coef != nullptr) *static_cast<A*>(params.coef) = fusedclip::clip_coefficient(total, params.max_norm);
}

// Tensor `index`'s statistic rounded to A, or its norm (the root of that, 0 for no elements).
template <NormKind kind, typename A>
__device__ __forceinline__ void store_per_tensor_as(const NormParams& params, int64_t index, double statistic,
                                                    bool empty) {
  A value = static_cast<A>(statistic);
  if (params.per_tensor_roots) value = fusedclip::root_of_statistic<kind>(value, params.p, empty);
  static_cast<A*>(params.per_tensor)[index] = value;
}

template <NormKind kind>
__device__ __forceinline__ void store_per_tensor(const NormParams& params, int64_t index, double statistic,
                                                 bool empty) {
  if (params.acc_double) store_per_tensor_as<kind, double>(params, index, statistic, empty);
  else store_per_tensor_as<kind, float>(params, index, statistic, empty);
}

// Tensors of at most this many chunks are combined by one thread each; larger ones by a warp.
constexpr int kSerialChunks = 16;

// The per-tensor statistics of a launch from its chunk partials, in parallel and each in a fixed
// order: a thread per tensor of at most kSerialChunks chunks (its chunks in order), then a warp
// per larger tensor (lane l combines chunks l, l + 32, ... in order, then a shuffle tree), so an
// embedding of thousands of chunks takes a hundred loads per lane, not thousands in one thread.
template <NormKind kind, int kCapacity>
__device__ void finish_per_tensor(const TensorTable<kCapacity>& table, const NormParams& params,
                                  const double* partials) {
  for (int t = threadIdx.x; t < table.num_tensors; t += blockDim.x) {
    const int begin = table.chunk_start[t], end = table.chunk_start[t + 1];
    if (end - begin > kSerialChunks) continue;
    double value = identity<kind, double>();
#pragma unroll 4
    for (int c = begin; c < end; ++c) value = combine<kind>(value, __ldcg(partials + c));
    store_per_tensor<kind>(params, table.first_tensor + t, value, begin == end);
  }
  const int lane = threadIdx.x % 32;
  for (int t = threadIdx.x / 32; t < table.num_tensors; t += blockDim.x / 32) {
    const int begin = table.chunk_start[t], end = table.chunk_start[t + 1];
    if (end - begin <= kSerialChunks) continue;  // the same in every lane
    double value = identity<kind, double>();
#pragma unroll 4
    for (int c = begin + lane; c < end; c += 32) value = combine<kind>(value, __ldcg(partials + c));
    value = warp_reduce<kind>(value);
    if (lane == 0) store_per_tensor<kind>(params, table.first_tensor + t, value, false);
  }
}

// The finish of a launch, run by one block once every chunk partial of the launch is written:
// chunk partials in order into the launch's partial and the per-tensor statistics; in the last
// launch, launch partials in order into the outputs. Every thread of the block must call it.
template <NormKind kind, int kCapacity>
__device__ void finish_launch(const TensorTable<kCapacity>& table, const NormParams& params) {
  const double* partials = params.chunk_partials + table.first_chunk;
  double value = identity<kind, double>();
#pragma unroll 4
  for (int i = threadIdx.x; i < table.num_chunks; i += blockDim.x) {
    value = combine<kind>(value, __ldcg(partials + i));  // L2: written by other blocks
  }
  const double launch_value = block_reduce<kind, double>(value);
  if (params.per_tensor != nullptr) finish_per_tensor<kind>(table, params, partials);
  if (threadIdx.x != 0) return;
  params.launch_partials[params.launch] = launch_value;
  if (params.launch != params.num_launches - 1) return;
  double statistic = identity<kind, double>();
  for (int l = 0; l < params.num_launches; ++l) {
    statistic = combine<kind>(statistic, __ldcg(params.launch_partials + l));
  }
  if (params.acc_double) write_outputs<kind, double>(statistic, params);
  else write_outputs<kind, float>(static_cast<float>(statistic), params);
  if (params.unscale) *params.found_inf = __ldcg(params.non_finite) != 0 ? 1.0f : 0.0f;
}

// ---------------------------------------------------------------------------------------------
// In-place element-wise transforms of a chunk.
// ---------------------------------------------------------------------------------------------

// x * coef in the accumulator type: float32 (the coefficient rounded to float32), float64 for
// float64 tensors.
struct ScaleOp {
  float coef_f;
  double coef_d;
  __device__ __forceinline__ float operator()(float x) const { return x * coef_f; }
  __device__ __forceinline__ double operator()(double x) const { return x * coef_d; }
};

// The ScaleOp of a coefficient, its float32 form rounded from the float64 one, as the CPU kernels
// round theirs.
__device__ __forceinline__ ScaleOp scale_op(double coef) { return {static_cast<float>(coef), coef}; }

// min(max(x, lo), hi), nan kept; the bounds rounded to float32 for all but float64 tensors.
struct ClampOp {
  float lo_f, hi_f;
  double lo_d, hi_d;
  __device__ __forceinline__ float operator()(float x) const {
    return isnan(x) ? x : fminf(fmaxf(x, lo_f), hi_f);
  }
  __device__ __forceinline__ double operator()(double x) const {
    return isnan(x) ? x : fmin(fmax(x, lo_d), hi_d);
  }
};

// x = op(x) over the elements of data[0, n) of dtype.
template <typename Op>
__device__ void transform(char* data, int n, DType dtype, const Op& op) {
  with_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    walk(reinterpret_cast<T*>(data), n, op);
  });
}

// launch(std::integral_constant<NormKind, k>{}) for the runtime kind k: the one switch from a
// norm kind to the kernel templated on it.
template <typename Launch>
cudaError_t launch_for_kind(NormKind kind, const Launch& launch) {
  switch (kind) {
    case NormKind::kAbsSum: return launch(std::integral_constant<NormKind, NormKind::kAbsSum>{});
    case NormKind::kSquareSum: return launch(std::integral_constant<NormKind, NormKind::kSquareSum>{});
    case NormKind::kPowerSum: return launch(std::integral_constant<NormKind, NormKind::kPowerSum>{});
    case NormKind::kMax: return launch(std::integral_constant<NormKind, NormKind::kMax>{});
    case NormKind::kMin: return launch(std::integral_constant<NormKind, NormKind::kMin>{});
    case NormKind::kCount: return launch(std::integral_constant<NormKind, NormKind::kCount>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace fusedclip::cuda
