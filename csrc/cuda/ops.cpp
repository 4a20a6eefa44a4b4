// The CUDA kernels of the fusedclip operators: the ATen glue of csrc/cuda/*.cu (which take raw
// pointers). Checks the tensors, makes dense real tensors of the others (complex through |z| to
// read, as (re, im) pairs to write; non-dense through a contiguous copy, copied back after a
// write), builds the tensor tables and launches on the current stream. No host sync: the norm,
// the total and the coefficient stay in device memory.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <utility>
#include <vector>

#include "cuda/kernels.cuh"
#include "cuda/ops.h"
#include "tensor_checks.h"

namespace fusedclip::cuda {

namespace {
std::atomic<int64_t> single_launch_bytes{-1};
}  // namespace

void set_single_launch_max_bytes(int64_t bytes) { single_launch_bytes.store(bytes); }
int64_t single_launch_max_bytes() { return single_launch_bytes.load(); }

bool kernels_run_on(int device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const cudaError_t status = kernel_image_status();
  (void)cudaGetLastError();  // a missing image is an answer here, not an error to leave pending
  return status == cudaSuccess;
}

namespace {

// --- checks ----------------------------------------------------------------------------------

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: case at::kComplexFloat: return DType::kFloat32;
    case at::kDouble: case at::kComplexDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "fusedclip: unexpected dtype ", t);
  }
}

// The shared checks (csrc/tensor_checks.h), for a non-empty list of CUDA tensors on one device.
void check_not_empty(at::TensorList tensors, const char* op) {
  TORCH_CHECK_VALUE(!tensors.empty(), "fusedclip.", op, ": expected at least one tensor");
}

void check_inputs(at::TensorList tensors, const char* op) {
  check_not_empty(tensors, op);
  check_tensors(tensors, op, at::kCUDA);
}

void check_writable(at::TensorList tensors, const char* op) {
  check_not_empty(tensors, op);
  fusedclip::check_writable(tensors, op, at::kCUDA);
}

NormKind norm_kind(double norm_type) {
  check_norm_type(norm_type);
  return fusedclip::norm_kind(norm_type);
}

// --- dense real tensors and their tables ------------------------------------------------------

enum class Access { kRead, kWrite };

// One dense real tensor per input (zero-size ones kept, so table slots match list indices).
struct DenseTensors {
  std::vector<at::Tensor> tensors;
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;  // (original, dense copy)
  bool direct = true;       // every tensor is an input itself: no temporaries
  bool acc_double = false;  // some input is float64 or complex128
  int64_t numel = 0;
  int64_t bytes = 0;

  DenseTensors(at::TensorList inputs, Access access) {
    tensors.reserve(inputs.size());
    for (const at::Tensor& t : inputs) {
      acc_double = acc_double || t.scalar_type() == at::kDouble || t.scalar_type() == at::kComplexDouble;
      at::Tensor real = t;
      if (t.is_complex()) {
        real = access == Access::kRead ? at::abs(t) : at::view_as_real(t);
        direct = direct && access == Access::kWrite;
      }
      if (real.numel() > 0 && !real.is_non_overlapping_and_dense()) {
        at::Tensor dense = real.contiguous();
        if (access == Access::kWrite) write_back.emplace_back(real, dense);
        real = dense;
        direct = false;
      }
      numel += real.numel();
      bytes += real.numel() * real.element_size();
      tensors.push_back(std::move(real));
    }
  }

  void copy_back() {
    for (auto& [original, dense] : write_back) original.copy_(dense);
  }
};

// Tables of at most kMaxTensors tensors each, in list order; chunk numbering runs on across them.
struct Tables {
  std::vector<TensorTable> tables;
  int64_t num_chunks = 0;

  explicit Tables(const std::vector<at::Tensor>& tensors) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (tables.empty() || tables.back().num_tensors == kMaxTensors) {
        tables.emplace_back();
        TensorTable& fresh = tables.back();
        fresh.first_tensor = static_cast<int32_t>(i);
        fresh.first_chunk = static_cast<int32_t>(num_chunks);
      }
      TensorTable& table = tables.back();
      const at::Tensor& t = tensors[i];
      const int n = table.num_tensors++;
      const int64_t chunks = (t.numel() + kChunkElements - 1) / kChunkElements;
      TORCH_CHECK(num_chunks + chunks < INT32_MAX, "fusedclip: too many elements for one call");
      table.data[n] = t.numel() > 0 ? t.data_ptr() : nullptr;
      table.numel[n] = t.numel();
      table.dtype[n] = dtype_of(t.scalar_type());
      table.chunk_start[n] = table.num_chunks;
      table.num_chunks += static_cast<int32_t>(chunks);
      table.chunk_start[n + 1] = table.num_chunks;
      num_chunks += chunks;
    }
  }
};

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// --- the norm ----------------------------------------------------------------------------------

// Scratch of one norm call: chunk partials, launch partials, tickets (zeroed when the launches
// use them; the single-launch clip syncs its grid instead, and stays one launch).
struct NormScratch {
  at::Tensor memory;
  NormScratch(const Tables& tables, const at::Device& device, NormParams& params, bool zero_tickets = true) {
    const int64_t launches = static_cast<int64_t>(tables.tables.size());
    const int64_t doubles = std::max<int64_t>(tables.num_chunks, 1) + launches;
    memory = at::empty({doubles * 8 + launches * 4}, at::TensorOptions().dtype(at::kByte).device(device));
    auto* base = static_cast<char*>(memory.data_ptr());
    params.chunk_partials = reinterpret_cast<double*>(base);
    params.launch_partials = params.chunk_partials + std::max<int64_t>(tables.num_chunks, 1);
    params.tickets = reinterpret_cast<unsigned int*>(base + doubles * 8);
    if (zero_tickets) C10_CUDA_CHECK(cudaMemsetAsync(params.tickets, 0, launches * 4, current_stream()));
  }
};

// Outputs of a norm: the statistic, per-tensor statistics, and (for the fused clip) the total
// norm and the coefficient, all in the accumulation dtype.
struct NormOutputs {
  at::Tensor statistic, per_tensor, total, coef;
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

void run_norm(const Tables& tables, NormParams params, const at::Device& device) {
  NormScratch scratch(tables, device, params);
  params.num_launches = static_cast<int32_t>(tables.tables.size());
  for (size_t l = 0; l < tables.tables.size(); ++l) {
    params.launch = static_cast<int32_t>(l);
    C10_CUDA_CHECK(launch_norm(tables.tables[l], params, current_stream()));
  }
}

// --- in-place transforms ---------------------------------------------------------------------

// Runs launch(table) over every table of tensors that check_writable accepted. Tensors sharing
// memory run one at a time in list order, so shared bytes are transformed once per tensor, as
// torch does.
template <typename Launch>
void transform_writable(at::TensorList tensors, const Launch& launch) {
  const auto transform_list = [&launch](at::TensorList list) {
    DenseTensors dense(list, Access::kWrite);
    const Tables tables(dense.tensors);
    for (const TensorTable& table : tables.tables) C10_CUDA_CHECK(launch(table));
    dense.copy_back();
  };
  if (any_memory_shared(tensors)) {
    for (const at::Tensor& t : tensors) transform_list(t);
  } else {
    transform_list(tensors);
  }
}

Coef coef_of(const at::Tensor& coef, const at::Device& device) {
  check_scalar(coef, "multi_tensor_scale_", "coef");
  if (coef.device().is_cpu()) return {nullptr, DType::kFloat64, coef.item<double>()};  // no device sync
  TORCH_CHECK_TYPE(coef.device() == device, "fusedclip.multi_tensor_scale_: coef is on ", coef.device(),
                   " but the tensors are on ", device);
  return {coef.data_ptr(), dtype_of(coef.scalar_type()), 0.0};
}

// --- the operators -----------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> multi_tensor_norm(at::TensorList tensors, double norm_type, bool per_tensor) {
  check_inputs(tensors, "multi_tensor_norm");
  norm_kind(norm_type);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const DenseTensors dense(tensors, Access::kRead);
  const auto options = tensors[0].options().dtype(dense.acc_double ? at::kDouble : at::kFloat);
  NormOutputs out;
  out.statistic = at::empty({}, options);
  out.per_tensor = at::empty({per_tensor ? static_cast<int64_t>(tensors.size()) : 0}, options);
  run_norm(Tables(dense.tensors), norm_params(dense, norm_type, out, 0.0), tensors[0].device());
  return {out.statistic, out.per_tensor};
}

void multi_tensor_scale_(at::TensorList tensors, const at::Tensor& coef) {
  check_writable(tensors, "multi_tensor_scale_");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const Coef value = coef_of(coef, tensors[0].device());
  if (value.data == nullptr && value.value >= 1.0) return;  // a CPU coef: nothing to write
  bump_versions(tensors);
  transform_writable(tensors, [&](const TensorTable& table) { return launch_scale(table, value, current_stream()); });
}

void multi_tensor_clamp_(at::TensorList tensors, double lo, double hi) {
  check_writable(tensors, "multi_tensor_clamp_");
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK_TYPE(!tensors[i].is_complex(), "fusedclip.multi_tensor_clamp_: tensor ", i,
                     " is complex; clamping is not defined for complex values");
  }
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  bump_versions(tensors);
  transform_writable(tensors, [&](const TensorTable& table) { return launch_clamp(table, lo, hi, current_stream()); });
}

// The device's L2 size in bytes, queried once per device (an attribute read, no sync).
int64_t l2_bytes(int device) {
  static std::atomic<int64_t> cached[64];
  if (device < 0 || device >= 64) return 0;
  if (cached[device].load() == 0) {
    int bytes = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrL2CacheSize, device));
    cached[device].store(std::max(bytes, 1));
  }
  return cached[device].load();
}

bool use_single_launch(const DenseTensors& dense, const Tables& tables, at::TensorList tensors) {
  int64_t limit = single_launch_max_bytes();
  if (limit < 0) limit = l2_bytes(tensors[0].device().index());
  return dense.bytes <= limit && tables.tables.size() == 1 && dense.direct && !any_memory_shared(tensors);
}

at::Tensor clip_grad_norm_(at::TensorList tensors, double max_norm, double norm_type) {
  check_writable(tensors, "clip_grad_norm_");
  norm_kind(norm_type);
  const at::Device device = tensors[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const DenseTensors dense(tensors, Access::kRead);
  const Tables tables(dense.tensors);
  NormOutputs out;
  const auto options = tensors[0].options().dtype(dense.acc_double ? at::kDouble : at::kFloat);
  out.statistic = at::empty({}, options);
  out.total = at::empty({}, options);
  out.coef = at::empty({}, options);
  const NormParams params = norm_params(dense, norm_type, out, max_norm);
  bump_versions(tensors);

  if (use_single_launch(dense, tables, tensors)) {
    NormParams single = params;
    NormScratch scratch(tables, device, single, /*zero_tickets=*/false);
    single.launch = 0;
    single.num_launches = 1;
    const cudaError_t error = launch_clip_single(tables.tables[0], single, current_stream());
    if (error == cudaSuccess) return out.total;
    // Only "no cooperative launch here" falls back to two launches; anything else is an error.
    if (error != cudaErrorNotSupported && error != cudaErrorCooperativeLaunchTooLarge) C10_CUDA_CHECK(error);
    (void)cudaGetLastError();
  }

  run_norm(tables, params, device);
  const Coef coef{out.coef.data_ptr(), dense.acc_double ? DType::kFloat64 : DType::kFloat32, 0.0};
  if (dense.direct && !any_memory_shared(tensors)) {
    for (const TensorTable& table : tables.tables) C10_CUDA_CHECK(launch_scale(table, coef, current_stream()));
  } else {
    transform_writable(tensors, [&](const TensorTable& table) { return launch_scale(table, coef, current_stream()); });
  }
  return out.total;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedclip, CUDA, m) {
  m.impl("multi_tensor_norm", &multi_tensor_norm);
  m.impl("multi_tensor_scale_", &multi_tensor_scale_);
  m.impl("multi_tensor_clamp_", &multi_tensor_clamp_);
  m.impl("clip_grad_norm_", &clip_grad_norm_);
}

}  // namespace fusedclip::cuda
