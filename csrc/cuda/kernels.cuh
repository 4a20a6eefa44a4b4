// The interface between the CUDA kernels (csrc/cuda/*.cu) and their ATen glue (csrc/cuda/*.cpp).
//
// Plain C++ and the CUDA runtime only: the .cu files include nothing of torch, so nvcc compiles
// them on a machine with a CPU-only torch (tests/test_cuda_compile.py does, for sm_80 and sm_90).
//
// A launch sees its tensors as a TensorTable passed by value as the kernel argument (up to the
// 32 KB kernel-argument limit of CUDA 12.1+ on sm_70+, 4 KB before): no device table to allocate
// and copy, and nothing to keep alive for a CUDA graph, which captures kernel arguments by value
// (a device table copied from pinned host memory would be read again, from memory since freed, at
// every replay). A table holds kMaxTensors tensors (about 1,500 with 32 KB); longer lists take
// several launches, combined by the last one (see NormParams).
//
// Each tensor is cut into chunks of kChunkElements; one block reduces or transforms one chunk.
// Chunk boundaries depend only on the tensors' sizes, and chunk partials are combined in chunk
// order in float64, so norms are bitwise reproducible run to run and for any grid.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../numerics.h"

namespace fusedclip::cuda {

// 64K elements: 256 KB of float32 per block, as torch's multi-tensor apply; a multiple of every
// vector width, so a chunk is 16-byte aligned wherever its tensor is.
constexpr int64_t kChunkElements = int64_t{1} << 16;
constexpr int kBlockThreads = 512;

#if CUDART_VERSION >= 12010
constexpr int kKernelParamBytes = 32764;  // the CUDA 12.1+ limit on sm_70 and newer
#else
constexpr int kKernelParamBytes = 4096;
#endif
// What the kernels take besides the table (NormParams or an op's scalars), with room to spare.
constexpr int kParamBytesBesidesTable = 512;

enum class DType : uint8_t { kFloat32, kFloat64, kFloat16, kBFloat16 };

// The statistic before the root: sum |x| (p = 1), sum x^2 (p = 2), sum |x|^p (other p),
// max |x| (inf), min |x| (-inf), count of x != 0 (p = 0).
using fusedclip::NormKind;  // csrc/numerics.h

// Bytes per tensor: data pointer, size, first chunk, dtype.
constexpr int kBytesPerTensor = sizeof(void*) + sizeof(int64_t) + sizeof(int32_t) + sizeof(uint8_t);
constexpr int kMaxTensors = (kKernelParamBytes - kParamBytesBesidesTable - 64) / kBytesPerTensor;

// The tensors of one launch, dense and real (the glue makes contiguous copies of the others and
// real views of complex ones). Tensor i owns chunks [chunk_start[i], chunk_start[i + 1]) of this
// launch; zero-size tensors own none but keep their slot, so per-tensor results need no index map.
struct TensorTable {
  int32_t num_tensors;
  int32_t num_chunks;
  int32_t first_tensor;  // index of tensor 0 in the caller's list (per-tensor outputs)
  int32_t first_chunk;   // index of chunk 0 among the chunks of every launch (chunk partials)
  void* data[kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t chunk_start[kMaxTensors + 1];
  DType dtype[kMaxTensors];
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
  void* statistic;           // 0-dim output
  void* per_tensor;          // one per tensor of the call, or null
  void* total;               // 0-dim total norm, or null
  void* coef;                // 0-dim clip coefficient min(max_norm / (total + 1e-6), 1), or null
  double max_norm;
};

// The coefficient of a scale: read from device memory (any float dtype) or given by value.
struct Coef {
  const void* data;          // device scalar, or null to use value
  DType dtype;
  double value;
};

static_assert(sizeof(TensorTable) + kParamBytesBesidesTable <= kKernelParamBytes,
              "the tensor table does not fit the kernel argument space");
static_assert(sizeof(NormParams) + sizeof(Coef) <= kParamBytesBesidesTable,
              "the scalar arguments do not fit beside the table");

// Launchers: each enqueues on stream and returns the launch's error (cudaSuccess when it started).
cudaError_t launch_norm(const TensorTable& table, const NormParams& params, cudaStream_t stream);
// tensors *= coef in float32 (float64 for float64 tensors); every block returns at once when
// coef >= 1.
cudaError_t launch_scale(const TensorTable& table, const Coef& coef, cudaStream_t stream);
// tensors = min(max(tensors, lo), hi); nan stays nan.
cudaError_t launch_clamp(const TensorTable& table, double lo, double hi, cudaStream_t stream);

// cudaSuccess when this build holds machine code or PTX that the current device can run; a GPU
// older than the build's architectures gives an error (no kernel image).
cudaError_t kernel_image_status();

// The single-launch clip: a persistent cooperative kernel that computes the norm (params as for
// launch_norm, with one launch, total and coef set), syncs the grid, finishes the norm in block 0,
// syncs again and scales, walking the chunks in reverse so that what the norm read last, still in
// L2, is scaled first. The table must hold every tensor of the call and must point into the
// tensors themselves. Returns cudaErrorNotSupported where the device has no cooperative launch.
cudaError_t launch_clip_single(const TensorTable& table, const NormParams& params,
                               cudaStream_t stream);

}  // namespace fusedclip::cuda
