// The stable-ABI glue that the CUDA operators share (defined in csrc/cuda/glue.cpp): the checks,
// dense real tensors of the others (complex through |z| to read, as (re, im) pairs to write;
// non-dense through a contiguous copy, copied back after a write), the tensor tables, the current
// stream and device, the norm's scratch and launches, the in-place transform runner, and the
// settings that fusedclip._C_cuda exposes to Python (csrc/cuda/module.cpp). Each operator's own
// glue and its m.impl live in the .cu file of its kernels (csrc/cuda/*.cu), in a
// STABLE_TORCH_LIBRARY_IMPL(fusedclip, CUDA, m) block of its own.
//
// Only torch's stable ABI (csrc/stable.h: the C shim and its header-only wrappers) and the CUDA
// runtime: no ATen or c10 C++ symbol, so one build loads under every torch from 2.10 on. nvcc
// compiles this header in every .cu file (a CPU-only torch's headers carry the stable ABI too).
// The schemas are defined by the Python layer (fusedclip/operators.py) before the library loads;
// the Python layer also bumps the version counters of the tensors a kernel writes. No host sync:
// the norm, the total and the coefficient stay in device memory.
#pragma once

#include <cuda_runtime.h>
#include <torch/csrc/stable/accelerator.h>

#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

#include "../stable.h"
#include "../tensor_checks.h"
#include "kernels.cuh"

namespace fusedclip::cuda {

// --- settings (fusedclip._C_cuda's functions, csrc/cuda/module.cpp) ---------------------------

// The fused clip_grad_norm_ runs as one cooperative launch (csrc/cuda/clip_single.cu) when its
// grads take at most this many bytes, and as two launches (norm, then scale) above. -1, the
// default, means the device's L2 size: grads that fit in L2 are then read from L2 by the scale.
// 0 never uses the single launch.
void set_single_launch_max_bytes(int64_t bytes);
int64_t single_launch_max_bytes();

// Whether this build's kernels run on CUDA device `device` (its architectures include the
// device's, or PTX the driver can compile for it). False where there is no such device (no GPU,
// no driver). Sets no device and leaves no error behind.
bool kernels_run_on(int device);

// The CUDA runtime version this library was compiled with (CUDART_VERSION, e.g. 13000); the
// runtime is linked statically, so it is also the version that runs.
int cuda_runtime_version();

// --- errors and checks -----------------------------------------------------------------------

// A CUDA runtime call that failed: a RuntimeError naming the call and the error, with the error
// cleared (as C10_CUDA_CHECK does), so that it does not surface again in a later, unrelated check.
void check_cuda(cudaError_t status, const char* call);

#define FUSEDCLIP_CUDA_CHECK(call) ::fusedclip::cuda::check_cuda((call), #call)

// The kernels' dtype of a float or complex tensor (complex: of its real and imaginary parts).
DType dtype_of(ScalarType t);

// The shared checks (csrc/tensor_checks.h), for a non-empty list of CUDA tensors on one device.
void check_not_empty(const TensorList& tensors, const char* op);
void check_inputs(const TensorList& tensors, const char* op);
void check_writable(const TensorList& tensors, const char* op);

// check_norm_type, then the statistic that norm_type names (csrc/numerics.h).
NormKind norm_kind(double norm_type);

// --- devices and streams ---------------------------------------------------------------------

// Makes the tensors' device current while an operator runs (allocations, launches), as
// c10::cuda::CUDAGuard did, and holds the device's current CUDA stream (torch's, as
// at::cuda::getCurrentCUDAStream gives it).
struct DeviceOf {
  torch::stable::accelerator::DeviceGuard guard;
  cudaStream_t stream;
  explicit DeviceOf(const Tensor& t);
};

// A new tensor of sizes and dtype on like's device.
Tensor empty_on(const Tensor& like, std::initializer_list<int64_t> sizes, ScalarType dtype);

ScalarType acc_dtype(bool acc_double);

// --- dense real tensors and their tables ------------------------------------------------------

enum class Access { kRead, kWrite };

// One dense real tensor per input (zero-size ones kept, so table slots match list indices).
struct DenseTensors {
  TensorList tensors;
  std::vector<std::pair<Tensor, Tensor>> write_back;  // (original, dense copy)
  bool direct = true;       // every tensor is an input itself: no temporaries
  bool acc_double = false;  // some input is float64 or complex128
  int64_t numel = 0;
  int64_t bytes = 0;

  DenseTensors(const TensorList& inputs, Access access);
  void copy_back();
};

// Tables of at most kMaxTensors tensors each, in list order (table.cuh); first_tensor is the index
// of tensors[0] in the caller's list.
struct Tables : TableList<FullTable> {
  explicit Tables(const TensorList& tensors, int32_t first_tensor = 0);
};

// --- the norm ----------------------------------------------------------------------------------

// Scratch of one norm call: chunk partials, launch partials, then the counters: tickets and the
// non-finite flag (zeroed when the launches use them; the single-launch clip syncs its grid
// instead, and stays one launch).
struct NormScratch {
  Tensor memory;
  NormScratch(int64_t num_chunks, int64_t launches, const Tensor& like, cudaStream_t stream, NormParams& params,
              bool zero_counters = true);
};

// Outputs of a norm: the statistic, per-tensor statistics, and (for the fused clip) the total
// norm and the coefficient, all in the accumulation dtype.
struct NormOutputs {
  Tensor statistic, per_tensor, total, coef;
};

NormParams norm_params(const DenseTensors& dense, double norm_type, const NormOutputs& out, double max_norm);

// The norm of the tables: one launch_norm per table, after zeroing the scratch's counters.
void run_norm(const Tables& tables, NormParams params, const Tensor& like, cudaStream_t stream);

// --- in-place transforms ---------------------------------------------------------------------

// Runs launch(table) over every table of tensors that check_writable accepted. Tensors sharing
// memory run one at a time in list order, so shared bytes are transformed once per tensor, as
// torch does (each table then starts at its tensor's index: per-tensor coefficients).
template <typename Launch>
void transform_writable(const TensorList& tensors, const Launch& launch) {
  const auto transform_list = [&launch](const TensorList& list, int32_t first_tensor) {
    DenseTensors dense(list, Access::kWrite);
    const Tables tables(dense.tensors, first_tensor);
    for (const FullTable& table : tables.tables) FUSEDCLIP_CUDA_CHECK(launch(table));
    dense.copy_back();
  };
  if (any_memory_shared(tensors)) {
    for (size_t i = 0; i < tensors.size(); ++i) transform_list(TensorList{tensors[i]}, static_cast<int32_t>(i));
  } else {
    transform_list(tensors, 0);
  }
}

// A one-element float tensor argument: by value when it is on the CPU (reading it is no device
// sync), else its address on the device of like (the tensors').
Coef scalar_arg(const Tensor& t, const Tensor& like, const char* op, const char* name);

}  // namespace fusedclip::cuda
