// The CUDA kernels of the fusedclip operators: the stable-ABI glue of csrc/cuda/*.cu (which take
// raw pointers). Checks the tensors, makes dense real tensors of the others (complex through |z| to
// read, as (re, im) pairs to write; non-dense through a contiguous copy, copied back after a
// write), builds the tensor tables and launches on the current stream. No host sync: the norm,
// the total and the coefficient stay in device memory.
//
// Only torch's stable ABI (csrc/stable.h: the C shim and its header-only wrappers) and the CUDA
// runtime: no ATen or c10 C++ symbol, so one build loads under every torch from 2.10 on. The
// schemas are defined by the Python layer (fusedclip/operators.py) before this library loads; this
// file registers the CUDA kernels of those schemas. The Python layer also bumps the version
// counters of the tensors a kernel writes.

// The CUDA entries of the C shim (aoti_torch_get_current_cuda_stream) are declared only with
// USE_CUDA; see current_stream for how the library reaches them.
#ifndef USE_CUDA
#define USE_CUDA
#endif

#include <cuda_runtime.h>
#include <dlfcn.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda/kernels.cuh"
#include "cuda/ops.h"
#include "stable.h"
#include "tensor_checks.h"

namespace fusedclip::cuda {

namespace {
std::atomic<int64_t> single_launch_bytes{-1};

// A CUDA runtime call that failed: a RuntimeError naming the call and the error, with the error
// cleared (as C10_CUDA_CHECK does), so that it does not surface again in a later, unrelated check.
void check_cuda(cudaError_t status, const char* call) {
  if (status == cudaSuccess) return;
  (void)cudaGetLastError();
  fail("CUDA error in ", call, ": ", cudaGetErrorString(status), " (", cudaGetErrorName(status), ")");
}

#define FUSEDCLIP_CUDA_CHECK(call) ::fusedclip::cuda::check_cuda((call), #call)
}  // namespace

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

namespace {

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

// The shared checks (csrc/tensor_checks.h), for a non-empty list of CUDA tensors on one device.
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

// Makes the tensors' device current while an operator runs (allocations, launches), as
// c10::cuda::CUDAGuard did.
struct DeviceOf {
  torch::stable::accelerator::DeviceGuard guard;
  cudaStream_t stream;
  explicit DeviceOf(const Tensor& t) : guard(t.get_device_index()), stream(current_stream(t)) {}
};

// A new tensor of sizes and dtype on like's device.
Tensor empty_on(const Tensor& like, std::initializer_list<int64_t> sizes, ScalarType dtype) {
  return torch::stable::new_empty(like, std::vector<int64_t>(sizes), dtype);
}

ScalarType acc_dtype(bool acc_double) { return acc_double ? ScalarType::Double : ScalarType::Float; }

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

  DenseTensors(const TensorList& inputs, Access access) {
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

  void copy_back() {
    for (auto& [original, dense] : write_back) torch::stable::copy_(original, dense);
  }
};

// Tables of at most kMaxTensors tensors each, in list order (table.cuh); first_tensor is the index
// of tensors[0] in the caller's list.
struct Tables : TableList<FullTable> {
  explicit Tables(const TensorList& tensors, int32_t first_tensor = 0) : TableList(first_tensor) {
    for (const Tensor& t : tensors) {
      const int64_t numel = t.numel();
      if (!append_tensor(numel > 0 ? t.data_ptr() : nullptr, numel, dtype_of(t.scalar_type()))) {
        fail("too many elements for one call");
      }
    }
  }
};

// --- the norm ----------------------------------------------------------------------------------

// Scratch of one norm call: chunk partials, launch partials, then the counters: tickets and the
// non-finite flag (zeroed when the launches use them; the single-launch clip syncs its grid
// instead, and stays one launch).
struct NormScratch {
  Tensor memory;
  NormScratch(int64_t num_chunks, int64_t launches, const Tensor& like, cudaStream_t stream, NormParams& params,
              bool zero_counters = true) {
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
};

// Outputs of a norm: the statistic, per-tensor statistics, and (for the fused clip) the total
// norm and the coefficient, all in the accumulation dtype.
struct NormOutputs {
  Tensor statistic, per_tensor, total, coef;
};

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
Coef scalar_arg(const Tensor& t, const Tensor& like, const char* op, const char* name) {
  check_scalar(t, op, name);
  if (t.is_cpu()) return {nullptr, DType::kFloat64, cpu_value(t), false};
  FUSEDCLIP_CHECK_TYPE(t.device() == like.device(), op, ": ", name, " is on ", device_name(t),
                       " but the tensors are on ", device_name(like));
  return {t.data_ptr(), dtype_of(t.scalar_type()), 0.0, false};
}

// --- the operators -----------------------------------------------------------------------------

std::tuple<Tensor, Tensor> multi_tensor_norm(TensorList tensors, double norm_type, bool per_tensor) {
  check_inputs(tensors, "multi_tensor_norm");
  norm_kind(norm_type);
  const DeviceOf device(tensors[0]);
  const DenseTensors dense(tensors, Access::kRead);
  const ScalarType acc = acc_dtype(dense.acc_double);
  NormOutputs out;
  out.statistic = empty_on(tensors[0], {}, acc);
  out.per_tensor = empty_on(tensors[0], {per_tensor ? static_cast<int64_t>(tensors.size()) : 0}, acc);
  run_norm(Tables(dense.tensors), norm_params(dense, norm_type, out, 0.0), tensors[0], device.stream);
  return {out.statistic, out.per_tensor};
}

void multi_tensor_scale_(TensorList tensors, Tensor coef) {
  check_writable(tensors, "multi_tensor_scale_");
  const Coef value = scalar_arg(coef, tensors[0], "multi_tensor_scale_", "coef");
  if (value.data == nullptr && value.value >= 1.0) return;  // a CPU coef: nothing to write
  const DeviceOf device(tensors[0]);
  transform_writable(tensors, [&](const FullTable& table) { return launch_scale(table, value, device.stream); });
}

void multi_tensor_clamp_(TensorList tensors, double lo, double hi) {
  check_writable(tensors, "multi_tensor_clamp_");
  for (size_t i = 0; i < tensors.size(); ++i) {
    FUSEDCLIP_CHECK_TYPE(!is_complex(tensors[i].scalar_type()), "multi_tensor_clamp_: tensor ", i,
                         " is complex; clamping is not defined for complex values");
  }
  const DeviceOf device(tensors[0]);
  transform_writable(tensors, [&](const FullTable& table) { return launch_clamp(table, lo, hi, device.stream); });
}

// The device's L2 size in bytes, queried once per device (an attribute read, no sync).
int64_t l2_bytes(int device) {
  static std::atomic<int64_t> cached[64];
  if (device < 0 || device >= 64) return 0;
  if (cached[device].load() == 0) {
    int bytes = 0;
    FUSEDCLIP_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrL2CacheSize, device));
    cached[device].store(std::max(bytes, 1));
  }
  return cached[device].load();
}

bool use_single_launch(const DenseTensors& dense, const Tables& tables, const TensorList& tensors) {
  int64_t limit = single_launch_max_bytes();
  if (limit < 0) limit = l2_bytes(tensors[0].get_device_index());
  return dense.bytes <= limit && tables.tables.size() == 1 && dense.direct && !any_memory_shared(tensors);
}

// The fused clip; with_norms also returns the per-tensor norms of the same read.
std::tuple<Tensor, Tensor> clip(const TensorList& tensors, double max_norm, double norm_type, bool with_norms,
                                const char* op) {
  check_writable(tensors, op);
  norm_kind(norm_type);
  const Tensor& like = tensors[0];
  const DeviceOf device(like);
  const DenseTensors dense(tensors, Access::kRead);
  const Tables tables(dense.tensors);
  NormOutputs out;
  const ScalarType acc = acc_dtype(dense.acc_double);
  out.statistic = empty_on(like, {}, acc);
  out.total = empty_on(like, {}, acc);
  out.coef = empty_on(like, {}, acc);
  // The second result: the per-tensor norms, or an undefined tensor (clip_grad_norm_ returns the
  // total only).
  if (with_norms) out.per_tensor = empty_on(like, {static_cast<int64_t>(tensors.size())}, acc);
  NormParams params = norm_params(dense, norm_type, out, max_norm);
  params.per_tensor_roots = with_norms;

  if (use_single_launch(dense, tables, tensors)) {
    NormParams single = params;
    NormScratch scratch(tables.num_chunks, 1, like, device.stream, single, /*zero_counters=*/false);
    single.launch = 0;
    single.num_launches = 1;
    const cudaError_t error = launch_clip_single(tables.tables[0], single, device.stream);
    if (error == cudaSuccess) return {out.total, out.per_tensor};
    // Only "no cooperative launch here" falls back to two launches; anything else is an error.
    if (error != cudaErrorNotSupported && error != cudaErrorCooperativeLaunchTooLarge) {
      check_cuda(error, "launch_clip_single");
    }
    (void)cudaGetLastError();
  }

  run_norm(tables, params, like, device.stream);
  const Coef coef{out.coef.data_ptr(), dense.acc_double ? DType::kFloat64 : DType::kFloat32, 0.0, false};
  if (dense.direct && !any_memory_shared(tensors)) {
    for (const FullTable& table : tables.tables) FUSEDCLIP_CUDA_CHECK(launch_scale(table, coef, device.stream));
  } else {
    transform_writable(tensors, [&](const FullTable& table) { return launch_scale(table, coef, device.stream); });
  }
  return {out.total, out.per_tensor};
}

Tensor clip_grad_norm_(TensorList tensors, double max_norm, double norm_type) {
  return std::get<0>(clip(tensors, max_norm, norm_type, false, "clip_grad_norm_"));
}

std::tuple<Tensor, Tensor> clip_grad_norm_with_norms_(TensorList tensors, double max_norm, double norm_type) {
  return clip(tensors, max_norm, norm_type, true, "clip_grad_norm_with_norms_");
}

std::tuple<Tensor, Tensor> multi_tensor_unscale_norm(TensorList tensors, Tensor inv_scale, double norm_type) {
  const char* op = "multi_tensor_unscale_norm";
  const NormKind kind = norm_kind(norm_type);
  check_scalar(inv_scale, op, "inv_scale");
  if (tensors.empty()) {  // reached through a CUDA inv_scale: the statistic of no elements
    return {torch::stable::full({}, kind == NormKind::kMin ? INFINITY : 0.0, ScalarType::Float, std::nullopt,
                                inv_scale.device()),
            torch::stable::new_zeros(inv_scale, {}, ScalarType::Float)};
  }
  check_inputs(tensors, op);
  const Tensor& like = tensors[0];
  const Coef inv = scalar_arg(inv_scale, like, op, "inv_scale");
  const DeviceOf device(like);
  const DenseTensors dense(tensors, Access::kRead);
  NormOutputs out;
  out.statistic = empty_on(like, {}, acc_dtype(dense.acc_double));
  Tensor found_inf = empty_on(like, {}, ScalarType::Float);
  NormParams params = norm_params(dense, norm_type, out, 0.0);
  params.unscale = true;
  params.inv_scale = inv;
  params.found_inf = static_cast<float*>(found_inf.data_ptr());
  run_norm(Tables(dense.tensors), params, like, device.stream);
  return {out.statistic, found_inf};
}

void multi_tensor_scale_per_tensor_(TensorList tensors, Tensor coefs) {
  const char* op = "multi_tensor_scale_per_tensor_";
  FUSEDCLIP_CHECK_TYPE(is_floating(coefs.scalar_type()) && coefs.is_cuda(), op,
                       ": coefs must be a float CUDA tensor, got ", dtype_name(coefs.scalar_type()), " on ",
                       device_name(coefs));
  FUSEDCLIP_CHECK_VALUE(coefs.dim() == 1 && coefs.numel() == static_cast<int64_t>(tensors.size()), op,
                        ": coefs must be 1-dim with one coefficient per tensor (", tensors.size(), "), got shape ",
                        shape_name(coefs));
  if (tensors.empty()) return;
  check_writable(tensors, op);
  FUSEDCLIP_CHECK_TYPE(coefs.device() == tensors[0].device(), op, ": coefs is on ", device_name(coefs),
                       " but the tensors are on ", device_name(tensors[0]));
  const DeviceOf device(tensors[0]);
  const Tensor dense_coefs = torch::stable::contiguous(coefs);
  const Coef coef{dense_coefs.data_ptr(), dtype_of(dense_coefs.scalar_type()), 0.0, /*per_tensor=*/true};
  transform_writable(tensors, [&](const FullTable& table) { return launch_scale(table, coef, device.stream); });
}

// --- AGC -------------------------------------------------------------------------------------

// AGC of one list in one pass (a launch per table, and one more for a table with long rows):
// total and per receive the sums of squares of the gradients before clipping. Units are rows of
// the row-major layout: other layouts go through contiguous temporaries, written back after.
void agc_list(const TensorList& grads, const TensorList& params, double clip_factor, double eps, bool acc_double,
              const Tensor& total, const Tensor& per, cudaStream_t stream) {
  TensorList row_major;  // (grad, param) per tensor: the temporaries live until queued
  TableList<FullAgcTable> list;
  bool long_rows = false;
  for (size_t i = 0; i < grads.size(); ++i) {
    const Tensor grad = torch::stable::contiguous(grads[i]);
    const Tensor param = torch::stable::contiguous(params[i]);
    row_major.push_back(grad);
    row_major.push_back(param);
    const int64_t numel = grad.numel();
    const int64_t row_numel = numel == 0 ? 0 : numel / (grad.dim() > 1 ? grad.size(0) : 1);
    long_rows = long_rows || (numel > 0 && agc_geometry(row_numel).items_per_row > 1);
    if (!list.append_agc(numel > 0 ? grad.data_ptr() : nullptr, numel > 0 ? param.data_ptr() : nullptr, numel,
                         row_numel, dtype_of(grad.scalar_type()), dtype_of(param.scalar_type()))) {
      fail("too many elements for one call");
    }
  }
  AgcParams agc{};
  agc.norm.kind = NormKind::kSquareSum;
  agc.norm.p = 2.0;
  agc.norm.acc_double = acc_double;
  agc.norm.statistic = total.data_ptr();
  agc.norm.per_tensor = per.data_ptr();
  agc.norm.num_launches = static_cast<int32_t>(list.tables.size());
  agc.clip_factor = clip_factor;
  agc.eps = eps;
  const Tensor& like = grads[0];
  NormScratch scratch(list.num_chunks, agc.norm.num_launches, like, stream, agc.norm);
  Tensor pieces;
  if (long_rows) {
    pieces = empty_on(like, {2 * list.num_chunks}, ScalarType::Double);
    agc.piece_grad_sq = static_cast<double*>(pieces.data_ptr());
    agc.piece_param_sq = agc.piece_grad_sq + list.num_chunks;
  }
  for (size_t l = 0; l < list.tables.size(); ++l) {
    agc.norm.launch = static_cast<int32_t>(l);
    FUSEDCLIP_CUDA_CHECK(launch_agc(list.tables[l], agc, stream));
  }
  // A grad that contiguous() returned as it is (the same data) was written in place; a copy is
  // written back.
  for (size_t i = 0; i < grads.size(); ++i) {
    Tensor grad = grads[i];
    if (grad.numel() > 0 && row_major[2 * i].data_ptr() != grad.data_ptr()) {
      torch::stable::copy_(grad, row_major[2 * i]);
    }
  }
}

std::tuple<Tensor, Tensor> multi_tensor_agc_(TensorList grads, TensorList params, double clip_factor, double eps) {
  check_not_empty(grads, "multi_tensor_agc_");
  check_agc_arguments(grads, params, clip_factor, eps, DeviceType::CUDA);
  const DeviceOf device(grads[0]);
  const bool acc_double = std::any_of(grads.begin(), grads.end(),
                                      [](const Tensor& g) { return g.scalar_type() == ScalarType::Double; });
  const ScalarType acc = acc_dtype(acc_double);
  const auto num_tensors = static_cast<int64_t>(grads.size());
  Tensor per = empty_on(grads[0], {num_tensors}, acc);
  if (!any_memory_shared(grads)) {
    Tensor total = empty_on(grads[0], {}, acc);
    agc_list(grads, params, clip_factor, eps, acc_double, total, per, device.stream);
    return {total, per};
  }
  // Gradients that share memory are clipped one tensor at a time in list order, as torch's
  // per-tensor loop clips them: each write-back lands before the next tensor is read, so a later
  // occurrence sees the earlier clips. The total then sums the per-tensor results in order.
  for (int64_t i = 0; i < num_tensors; ++i) {
    const auto at = static_cast<size_t>(i);
    agc_list(TensorList{grads[at]}, TensorList{params[at]}, clip_factor, eps, acc_double, empty_on(grads[0], {}, acc),
             torch::stable::narrow(per, 0, i, 1), device.stream);
  }
  return {torch::stable::to(torch::stable::sum(per, std::nullopt, false, ScalarType::Double), acc), per};
}

// --- GradientMonitor -------------------------------------------------------------------------

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
  m.impl("multi_tensor_norm", TORCH_BOX(&multi_tensor_norm));
  m.impl("multi_tensor_scale_", TORCH_BOX(&multi_tensor_scale_));
  m.impl("multi_tensor_clamp_", TORCH_BOX(&multi_tensor_clamp_));
  m.impl("clip_grad_norm_", TORCH_BOX(&clip_grad_norm_));
  m.impl("multi_tensor_agc_", TORCH_BOX(&multi_tensor_agc_));
  m.impl("multi_tensor_scale_per_tensor_", TORCH_BOX(&multi_tensor_scale_per_tensor_));
  m.impl("clip_grad_norm_with_norms_", TORCH_BOX(&clip_grad_norm_with_norms_));
  m.impl("multi_tensor_unscale_norm", TORCH_BOX(&multi_tensor_unscale_norm));
  m.impl("monitor_update_", TORCH_BOX(&monitor_update_));
}

}  // namespace fusedclip::cuda
