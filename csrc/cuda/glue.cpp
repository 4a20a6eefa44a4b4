// The stable-ABI glue that the CUDA operators share (declared and described in csrc/cuda/glue.h):
// the settings of fusedclip._C_cuda, the checks, the current stream, dense real tensors, tables
// and the norm's scratch and launches. The operators themselves (their checks, launches and
// m.impl) are in the .cu files of their kernels.

// The CUDA entries of the C shim (aoti_torch_get_current_cuda_stream) are declared only with
// USE_CUDA; see current_stream for how the library reaches them.
#ifndef USE_CUDA
#define USE_CUDA
#endif

#include "cuda/glue.h"

#include <cuda_runtime.h>
#include <dlfcn.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include <algorithm>
#include <atomic>
#include <utility>
#include <vector>

namespace fusedclip::cuda {

namespace {
std::atomic<int64_t> single_launch_bytes{-1};
}  // namespace

void check_cuda(cudaError_t status, const char* call) {
  if (status == cudaSuccess) return;
  (void)cudaGetLastError();
  fail("CUDA error in ", call, ": ", cudaGetErrorString(status), " (", cudaGetErrorName(status), ")");
}

void set_single_launch_max_bytes(int64_t bytes) { single_launch_bytes.store(bytes); }
int64_t single_launch_max_bytes() { return single_launch_bytes.load(); }

bool kernels_run_on(int device) {
  // No device of that index (no GPU, no driver): the kernels run nowhere, and nothing is set.
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || device < 0 || device >= count) {
    (void)cudaGetLastError();
    return false;
  }
  const torch::stable::accelerator::DeviceGuard guard(device);
  const cudaError_t status = kernel_image_status();
  (void)cudaGetLastError();  // a missing image is an answer here, not an error to leave pending
  return status == cudaSuccess;
}

int cuda_runtime_version() { return CUDART_VERSION; }

// --- checks ----------------------------------------------------------------------------------

DType dtype_of(ScalarType t) {
  switch (t) {
    case ScalarType::Float: case ScalarType::ComplexFloat: return DType::kFloat32;
    case ScalarType::Double: case ScalarType::ComplexDouble: return DType::kFloat64;
    case ScalarType::Half: return DType::kFloat16;
    case ScalarType::BFloat16: return DType::kBFloat16;
    default: fail("unexpected dtype ", dtype_name(t));
  }
}

void check_not_empty(const TensorList& tensors, const char* op) {
  FUSEDCLIP_CHECK_VALUE(!tensors.empty(), op, ": expected at least one tensor");
}

void check_inputs(const TensorList& tensors, const char* op) {
  check_not_empty(tensors, op);
  check_tensors(tensors, op, DeviceType::CUDA);
}

void check_writable(const TensorList& tensors, const char* op) {
  check_not_empty(tensors, op);
  fusedclip::check_writable(tensors, op, DeviceType::CUDA);
}

NormKind norm_kind(double norm_type) {
  check_norm_type(norm_type);
  return fusedclip::norm_kind(norm_type);
}

// --- devices and streams ---------------------------------------------------------------------

namespace {

// The shim's aoti_torch_get_current_cuda_stream, looked up once. It lives in libtorch_cuda, which
// the library does not link: a CPU torch has none to link against, and the library's own
// dependencies (libtorch_cpu, libc10) do not bring it into its lookup scope under a CUDA torch
// either (torch loads libtorch_cuda RTLD_LOCAL, behind torch._C). torch has loaded it by the time a
// CUDA kernel runs, so it is found among the loaded libraries (RTLD_NOLOAD: never loaded here).
using GetCurrentCudaStream = decltype(&aoti_torch_get_current_cuda_stream);

GetCurrentCudaStream get_current_cuda_stream() {
  static const GetCurrentCudaStream function = [] {
    void* symbol = dlsym(RTLD_DEFAULT, "aoti_torch_get_current_cuda_stream");
    if (symbol == nullptr) {
      if (void* library = dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD)) {
        symbol = dlsym(library, "aoti_torch_get_current_cuda_stream");
        dlclose(library);  // drops the reference RTLD_NOLOAD took; torch keeps the library loaded
      }
    }
    return reinterpret_cast<GetCurrentCudaStream>(symbol);
  }();
  if (function == nullptr) {
    fail("the CUDA kernels need a torch built with CUDA (aoti_torch_get_current_cuda_stream of libtorch_cuda.so "
         "was not found)");
  }
  return function;
}

// The current CUDA stream of the device (torch's, as at::cuda::getCurrentCUDAStream gives it).
cudaStream_t current_stream(const Tensor& on_device) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(get_current_cuda_stream()(on_device.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

}  // namespace

DeviceOf::DeviceOf(const Tensor& t) : guard(t.get_device_index()), stream(current_stream(t)) {}

Tensor empty_on(const Tensor& like, std::initializer_list<int64_t> sizes, ScalarType dtype) {
  return torch::stable::new_empty(like, std::vector<int64_t>(sizes), dtype);
}

ScalarType acc_dtype(bool acc_double) { return acc_double ? ScalarType::Double : ScalarType::Float; }

// --- dense real tensors and their tables ------------------------------------------------------

DenseTensors::DenseTensors(const TensorList& inputs, Access access) {
  tensors.reserve(inputs.size());
  for (const Tensor& t : inputs) {
    const ScalarType dtype = t.scalar_type();
    acc_double = acc_double || dtype == ScalarType::Double || dtype == ScalarType::ComplexDouble;
    Tensor real = t;
    if (is_complex(dtype)) {
      real = access == Access::kRead ? aten_unary("aten::abs", "", t) : aten_unary("aten::view_as_real", "", t);
      direct = direct && access == Access::kWrite;
    }
    const int64_t real_numel = real.numel();
    if (real_numel > 0 && !non_overlapping_and_dense(real)) {
      Tensor dense = torch::stable::contiguous(real);
      if (access == Access::kWrite) write_back.emplace_back(real, dense);
      real = dense;
      direct = false;
    }
    numel += real_numel;
    bytes += real_numel * static_cast<int64_t>(real.element_size());
    tensors.push_back(std::move(real));
  }
}

void DenseTensors::copy_back() {
  for (auto& [original, dense] : write_back) torch::stable::copy_(original, dense);
}

Tables::Tables(const TensorList& tensors, int32_t first_tensor) : TableList(first_tensor) {
  for (const Tensor& t : tensors) {
    const int64_t numel = t.numel();
    if (!append_tensor(numel > 0 ? t.data_ptr() : nullptr, numel, dtype_of(t.scalar_type()))) {
      fail("too many elements for one call");
    }
  }
}

// --- the norm ----------------------------------------------------------------------------------

NormScratch::NormScratch(int64_t num_chunks, int64_t launches, const Tensor& like, cudaStream_t stream,
                         NormParams& params, bool zero_counters) {
  const int64_t doubles = std::max<int64_t>(num_chunks, 1) + launches;
  const int64_t counters = launches + 1;
  memory = empty_on(like, {doubles * 8 + counters * 4}, ScalarType::Byte);
  auto* base = static_cast<char*>(memory.data_ptr());
  params.chunk_partials = reinterpret_cast<double*>(base);
  params.launch_partials = params.chunk_partials + std::max<int64_t>(num_chunks, 1);
  params.tickets = reinterpret_cast<unsigned int*>(base + doubles * 8);
  params.non_finite = params.tickets + launches;
  if (zero_counters) FUSEDCLIP_CUDA_CHECK(cudaMemsetAsync(params.tickets, 0, counters * 4, stream));
}

NormParams norm_params(const DenseTensors& dense, double norm_type, const NormOutputs& out, double max_norm) {
  NormParams params{};
  params.kind = norm_kind(norm_type);
  params.p = norm_type;
  params.acc_double = dense.acc_double;
  params.empty = dense.numel == 0;
  params.statistic = out.statistic.data_ptr();
  params.per_tensor = out.per_tensor.defined() && out.per_tensor.numel() > 0 ? out.per_tensor.data_ptr() : nullptr;
  params.total = out.total.defined() ? out.total.data_ptr() : nullptr;
  params.coef = out.coef.defined() ? out.coef.data_ptr() : nullptr;
  params.max_norm = max_norm;
  return params;
}

void run_norm(const Tables& tables, NormParams params, const Tensor& like, cudaStream_t stream) {
  NormScratch scratch(tables.num_chunks, static_cast<int64_t>(tables.tables.size()), like, stream, params);
  params.num_launches = static_cast<int32_t>(tables.tables.size());
  for (size_t l = 0; l < tables.tables.size(); ++l) {
    params.launch = static_cast<int32_t>(l);
    FUSEDCLIP_CUDA_CHECK(launch_norm(tables.tables[l], params, stream));
  }
}

// --- in-place transforms ---------------------------------------------------------------------

Coef scalar_arg(const Tensor& t, const Tensor& like, const char* op, const char* name) {
  check_scalar(t, op, name);
  if (t.is_cpu()) return {nullptr, DType::kFloat64, cpu_value(t), false};
  FUSEDCLIP_CHECK_TYPE(t.device() == like.device(), op, ": ", name, " is on ", device_name(t),
                       " but the tensors are on ", device_name(like));
  return {t.data_ptr(), dtype_of(t.scalar_type()), 0.0, false};
}

}  // namespace fusedclip::cuda
