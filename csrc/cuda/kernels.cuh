// What the CUDA kernels of several files share (csrc/cuda/*.cu, and the shared glue of
// csrc/cuda/glue.h): the block size, the tables' capacities and tiers, the norm's and the scale's
// parameters, and the launchers that run beyond their own file (launch_norm, launch_scale,
// kernel_image_status). What only one operator uses (its parameters, its launchers) stays in its
// .cu file.
//
// Plain C++ and the CUDA runtime only, nothing of torch: the host test of the tables
// (tests/cuda_table_test.cpp) builds it with g++ alone.
//
// A launch sees its tensors as a table (table.cuh) passed by value as the kernel argument (up to
// the 32 KB kernel-argument limit of CUDA 12.1+ on sm_70+, 4 KB before): no device table to
// allocate and copy, and nothing to keep alive for a CUDA graph, which captures kernel arguments
// by value (a device table copied from pinned host memory would be read again, from memory since
// freed, at every replay). The glue builds tables of the full capacity (FullTable, about 1,500
// tensors with 32 KB); longer lists take several launches, combined by the last one (see
// NormParams). The launchers pass the smallest tier (kSmallTier, kMediumTier, full) that holds a
// table's tensors (with_smallest_tier), so a launch of five tensors passes under 1 KB of
// arguments, not 32 KB.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../numerics.h"
#include "table.cuh"

namespace fusedclip::cuda {

constexpr int kBlockThreads = 512;
// Every kernel fits this many blocks of kBlockThreads per SM (at most 64 registers per thread on
// sm_80/sm_90): __launch_bounds__ asks ptxas for it, scripts/check_cuda.py checks it.
constexpr int kMinBlocksPerSm = 2;

#if CUDART_VERSION >= 12010
constexpr int kKernelParamBytes = 32764;  // the CUDA 12.1+ limit on sm_70 and newer
#else
constexpr int kKernelParamBytes = 4096;
#endif
// What the kernels take besides the table (NormParams, agc.cu's AgcParams or an op's scalars),
// with room to spare.
constexpr int kParamBytesBesidesTable = 512;

// The statistic before the root: sum |x| (p = 1), sum x^2 (p = 2), sum |x|^p (other p),
// max |x| (inf), min |x| (-inf), count of x != 0 (p = 0).
using fusedclip::NormKind;  // csrc/numerics.h

// Bytes per tensor: data pointer, size, first chunk, dtype (AGC: and parameter pointer, row
// size, first item, parameter dtype).
constexpr int kBytesPerTensor = sizeof(void*) + sizeof(int64_t) + sizeof(int32_t) + sizeof(uint8_t);
constexpr int kBytesPerAgcTensor =
    kBytesPerTensor + sizeof(void*) + sizeof(int64_t) + sizeof(int32_t) + sizeof(uint8_t);
constexpr int kMaxTensors = (kKernelParamBytes - kParamBytesBesidesTable - 64) / kBytesPerTensor;
constexpr int kMaxAgcTensors = (kKernelParamBytes - kParamBytesBesidesTable - 128) / kBytesPerAgcTensor;

using FullTable = TensorTable<kMaxTensors>;
using FullAgcTable = AgcTable<kMaxAgcTensors>;

// The capacities a launch's table is passed in besides the full one, smallest first.
constexpr int kSmallTier = 32;
constexpr int kMediumTier = 256;

// The coefficient of a scale: read from device memory (any float dtype) or given by value.
struct Coef {
  const void* data;          // device scalar (or, per_tensor, one per tensor of the call), or null
  DType dtype;
  double value;              // when data is null
  bool per_tensor;           // data[first_tensor + t] scales tensor t of a table
};

// The norm of one launch of a call that may take several. Every block writes its chunk's partial;
// the last block of the launch to finish (a ticket counter) reduces the launch's partials in chunk
// order into launch_partials[launch] and the per-tensor statistics of its tensors; in the last
// launch it then reduces launch_partials in order and writes the statistic, and the total norm
// and clip coefficient when asked. Launches on one stream run in order, so the last launch's
// finisher sees every earlier launch's result.
struct NormParams {
  NormKind kind;
  double p;                  // for kPowerSum
  double* chunk_partials;    // one per chunk of the whole call
  double* launch_partials;   // one per launch
  unsigned int* tickets;     // one per launch, zero before the first launch
  int32_t launch;
  int32_t num_launches;
  bool acc_double;           // the outputs are float64 (else float32)
  bool empty;                // the call has no elements at all: the total norm is 0
  bool per_tensor_roots;     // per_tensor holds norms (roots; 0 for no elements), not statistics
  bool unscale;              // the statistic of x * inv_scale, and found_inf (unscale_norm)
  void* statistic;           // 0-dim output
  void* per_tensor;          // one per tensor of the call, or null
  void* total;               // 0-dim total norm, or null
  void* coef;                // 0-dim clip coefficient min(max_norm / (total + 1e-6), 1), or null
  double max_norm;
  Coef inv_scale;            // unscale: the factor (a device scalar or a value)
  unsigned int* non_finite;  // unscale: nonzero once a block saw inf or nan; zero before the first launch
  float* found_inf;          // unscale: 0-dim output, 1 when some x is inf or nan, else 0
};

static_assert(sizeof(FullTable) + kParamBytesBesidesTable <= kKernelParamBytes,
              "the tensor table does not fit the kernel argument space");
static_assert(sizeof(FullAgcTable) + kParamBytesBesidesTable <= kKernelParamBytes,
              "the AGC table does not fit the kernel argument space");
static_assert(sizeof(NormParams) + sizeof(Coef) <= kParamBytesBesidesTable,
              "the scalar arguments do not fit beside the table");
static_assert(kSmallTier < kMediumTier, "the tiers grow");

// f(table) for the smallest tier that holds full's tensors: a copy of full's first slots in a
// table of that capacity, or full itself (tiers not below full's capacity are skipped). Host code;
// the kernels are instantiated per tier.
template <typename Full, typename F>
cudaError_t with_smallest_tier(const Full& full, const F& f) {
  const int n = tensors_of(full).num_tensors;
  if constexpr (kSmallTier < Full::kCapacity) {
    if (n <= kSmallTier) {
      typename Full::template WithCapacity<kSmallTier> small{};
      copy_prefix(small, full);
      return f(small);
    }
  }
  if constexpr (kMediumTier < Full::kCapacity) {
    if (n <= kMediumTier) {
      typename Full::template WithCapacity<kMediumTier> medium{};
      copy_prefix(medium, full);
      return f(medium);
    }
  }
  return f(full);
}

// Launchers used beyond their own file: each enqueues on stream and returns the launch's error
// (cudaSuccess when it started). A launcher only its own file calls is declared there.

// The norm of one table (params.unscale: of x * inv_scale, and found_inf); norm.cu. The glue's
// run_norm runs it for the norm operators and the fused clip's two-launch path.
cudaError_t launch_norm(const FullTable& table, const NormParams& params, cudaStream_t stream);
// tensors *= coef in float32 (float64 for float64 tensors); every block returns at once when its
// coef >= 1; elementwise.cu. The fused clip's two-launch path scales with it.
cudaError_t launch_scale(const FullTable& table, const Coef& coef, cudaStream_t stream);

// cudaSuccess when this build holds machine code or PTX that the current device can run; a GPU
// older than the build's architectures gives an error (no kernel image); elementwise.cu, for the
// glue's kernels_run_on.
cudaError_t kernel_image_status();

}  // namespace fusedclip::cuda
