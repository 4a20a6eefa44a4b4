// Device building blocks shared by the kernels: element loads and conversions, the norm
// statistics, deterministic block reductions, one chunk's partial, the finish of a launch, and the
// in-place transform of one chunk.
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
template <typename T> using acc_t = typename AccOf<T>::type;

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

// The contribution of one element, in the accumulator type.
template <NormKind kind, typename A>
__device__ __forceinline__ A step(A acc, A x, A p) {
  if constexpr (kind == NormKind::kAbsSum) return acc + fabs(x);
  else if constexpr (kind == NormKind::kSquareSum) return fma(x, x, acc);
  else if constexpr (kind == NormKind::kPowerSum) return acc + pow(fabs(x), p);
  else if constexpr (kind == NormKind::kMax) return nan_max(acc, A(fabs(x)));
  else if constexpr (kind == NormKind::kMin) return nan_min(acc, A(fabs(x)));
  else return acc + (x != A(0) ? A(1) : A(0));  // nan != 0: counted, as torch counts it
}

// This thread's share of the statistic of x[0, n): 16-byte vector loads when x is 16-byte
// aligned (four in flight per thread), element loads for the rest.
template <NormKind kind, typename T>
__device__ acc_t<T> thread_statistic(const T* x, int n, acc_t<T> p) {
  using A = acc_t<T>;
  constexpr int kVec = 16 / sizeof(T);
  A acc = identity<kind, A>();
  int done = 0;
  if (reinterpret_cast<uintptr_t>(x) % 16 == 0) {
    const uint4* vectors = reinterpret_cast<const uint4*>(x);
    const int num_vectors = n / kVec;
    const int stride = blockDim.x;
    int i = threadIdx.x;
    for (; i + 3 * stride < num_vectors; i += 4 * stride) {
      uint4 raw[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) raw[k] = vectors[i + k * stride];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const T* values = reinterpret_cast<const T*>(&raw[k]);
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc = step<kind>(acc, to_acc(values[j]), p);
      }
    }
    for (; i < num_vectors; i += stride) {
      const uint4 raw = vectors[i];
      const T* values = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc = step<kind>(acc, to_acc(values[j]), p);
    }
    done = num_vectors * kVec;
  }
  for (int i = done + threadIdx.x; i < n; i += blockDim.x) acc = step<kind>(acc, to_acc(x[i]), p);
  return acc;
}

// The reduction of value over the block, returned to every thread. The order of combination is
// fixed (shuffles, then warps in order), so the result does not depend on timing.
template <NormKind kind, typename A>
__device__ A block_reduce(A value) {
  __shared__ A warp_values[32];
  __shared__ A result;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    value = combine<kind>(value, __shfl_down_sync(0xffffffffu, value, offset));
  }
  if (lane == 0) warp_values[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < (blockDim.x + 31) / 32 ? warp_values[lane] : identity<kind, A>();
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      value = combine<kind>(value, __shfl_down_sync(0xffffffffu, value, offset));
    }
    if (lane == 0) result = value;
  }
  __syncthreads();
  const A reduced = result;
  __syncthreads();  // the next call may overwrite the shared values
  return reduced;
}

// ---------------------------------------------------------------------------------------------
// Chunks of a table.
// ---------------------------------------------------------------------------------------------

// The tensor that owns chunk c: the last tensor whose first chunk is <= c (zero-size tensors,
// which own no chunk, share their first chunk with the next tensor and lose to it).
__device__ __forceinline__ int tensor_of_chunk(const TensorTable& table, int c) {
  int lo = 0, hi = table.num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.chunk_start[mid] <= c) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

struct ChunkView {
  char* data;  // first element of the chunk
  int numel;
  DType dtype;
};

__device__ __forceinline__ ChunkView chunk_view(const TensorTable& table, int c) {
  const int t = tensor_of_chunk(table, c);
  const int64_t offset = static_cast<int64_t>(c - table.chunk_start[t]) * kChunkElements;
  const int64_t remaining = table.numel[t] - offset;
  const int element_size = table.dtype[t] == DType::kFloat64 ? 8 : table.dtype[t] == DType::kFloat32 ? 4 : 2;
  return {static_cast<char*>(table.data[t]) + offset * element_size,
          static_cast<int>(remaining < kChunkElements ? remaining : kChunkElements), table.dtype[t]};
}

// The statistic of chunk c in float64, the same in every thread. Every thread of the block must
// call it.
template <NormKind kind>
__device__ double chunk_partial(const TensorTable& table, int c, double p) {
  const ChunkView chunk = chunk_view(table, c);
  switch (chunk.dtype) {
    case DType::kFloat64:
      return block_reduce<kind, double>(
          thread_statistic<kind>(reinterpret_cast<const double*>(chunk.data), chunk.numel, p));
    case DType::kFloat32:
      return block_reduce<kind, float>(thread_statistic<kind>(
          reinterpret_cast<const float*>(chunk.data), chunk.numel, static_cast<float>(p)));
    case DType::kFloat16:
      return block_reduce<kind, float>(thread_statistic<kind>(
          reinterpret_cast<const __half*>(chunk.data), chunk.numel, static_cast<float>(p)));
    default:
      return block_reduce<kind, float>(thread_statistic<kind>(
          reinterpret_cast<const __nv_bfloat16*>(chunk.data), chunk.numel, static_cast<float>(p)));
  }
}

// The total norm from its statistic and torch's coefficient on it, in the norm's dtype A:
// The norm and the clip coefficient of csrc/numerics.h, written by the last block.
template <NormKind kind, typename A>
__device__ void write_total_and_coef(A statistic, const NormParams& params) {
  const A total = fusedclip::root_of_statistic<kind>(statistic, params.p, params.empty);
  if (params.total != nullptr) *static_cast<A*>(params.total) = total;
  if (params.coef != nullptr) *static_cast<A*>(params.coef) = fusedclip::clip_coefficient(total, params.max_norm);
}

template <typename A>
__device__ __forceinline__ void store_as(void* out, int64_t i, double value) {
  static_cast<A*>(out)[i] = static_cast<A>(value);
}

// The finish of a launch, run by one block after every chunk partial of the launch is written
// (see NormParams): chunk partials in order into the launch's partial and the per-tensor
// statistics; in the last launch, launch partials in order into the outputs.
template <NormKind kind>
__device__ void finish_launch(const TensorTable& table, const NormParams& params) {
  const double* partials = params.chunk_partials + table.first_chunk;
  double value = identity<kind, double>();
  for (int i = threadIdx.x; i < table.num_chunks; i += blockDim.x) {
    value = combine<kind>(value, __ldcg(partials + i));  // L2: written by other blocks
  }
  const double launch_value = block_reduce<kind, double>(value);
  if (params.per_tensor != nullptr) {
    for (int t = threadIdx.x; t < table.num_tensors; t += blockDim.x) {
      double per = identity<kind, double>();
      for (int c = table.chunk_start[t]; c < table.chunk_start[t + 1]; ++c) {
        per = combine<kind>(per, __ldcg(partials + c));
      }
      if (params.acc_double) store_as<double>(params.per_tensor, table.first_tensor + t, per);
      else store_as<float>(params.per_tensor, table.first_tensor + t, per);
    }
  }
  if (threadIdx.x != 0) return;
  params.launch_partials[params.launch] = launch_value;
  if (params.launch != params.num_launches - 1) return;
  double statistic = identity<kind, double>();
  for (int l = 0; l < params.num_launches; ++l) {
    statistic = combine<kind>(statistic, __ldcg(params.launch_partials + l));
  }
  if (params.acc_double) {
    store_as<double>(params.statistic, 0, statistic);
    write_total_and_coef<kind, double>(statistic, params);
  } else {
    store_as<float>(params.statistic, 0, statistic);
    write_total_and_coef<kind, float>(static_cast<float>(statistic), params);
  }
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

template <typename T, typename Op>
__device__ void transform_elements(T* x, int n, const Op& op) {
  constexpr int kVec = 16 / sizeof(T);
  int done = 0;
  if (reinterpret_cast<uintptr_t>(x) % 16 == 0) {
    uint4* vectors = reinterpret_cast<uint4*>(x);
    const int num_vectors = n / kVec;
    for (int i = threadIdx.x; i < num_vectors; i += blockDim.x) {
      uint4 raw = vectors[i];
      T* values = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int j = 0; j < kVec; ++j) values[j] = from_acc<T>(op(to_acc(values[j])));
      vectors[i] = raw;
    }
    done = num_vectors * kVec;
  }
  for (int i = done + threadIdx.x; i < n; i += blockDim.x) x[i] = from_acc<T>(op(to_acc(x[i])));
}

template <typename Op>
__device__ void transform_chunk(const TensorTable& table, int c, const Op& op) {
  const ChunkView chunk = chunk_view(table, c);
  switch (chunk.dtype) {
    case DType::kFloat64: transform_elements(reinterpret_cast<double*>(chunk.data), chunk.numel, op); break;
    case DType::kFloat32: transform_elements(reinterpret_cast<float*>(chunk.data), chunk.numel, op); break;
    case DType::kFloat16: transform_elements(reinterpret_cast<__half*>(chunk.data), chunk.numel, op); break;
    default: transform_elements(reinterpret_cast<__nv_bfloat16*>(chunk.data), chunk.numel, op); break;
  }
}

// The scale's coefficient as float64: a device scalar of any float dtype, or the value given.
__device__ __forceinline__ double read_coef(const Coef& coef) {
  if (coef.data == nullptr) return coef.value;
  switch (coef.dtype) {
    case DType::kFloat64: return __ldcg(static_cast<const double*>(coef.data));
    case DType::kFloat32: return __ldcg(static_cast<const float*>(coef.data));
    case DType::kFloat16: return __half2float(*static_cast<const __half*>(coef.data));
    default: return __bfloat162float(*static_cast<const __nv_bfloat16*>(coef.data));
  }
}

// The ScaleOp of a coefficient, its float32 form rounded from the float64 one, as the CPU kernels
// round theirs.
__device__ __forceinline__ ScaleOp scale_op(double coef) { return {static_cast<float>(coef), coef}; }

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
