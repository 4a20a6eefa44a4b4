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
#include <initializer_list>
#include <optional>
#include <tuple>
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

// Tables of at most kMaxTensors tensors each, in list order (table.cuh); first_tensor is the index
// of tensors[0] in the caller's list.
struct Tables : TableList<FullTable> {
  explicit Tables(const std::vector<at::Tensor>& tensors, int32_t first_tensor = 0) : TableList(first_tensor) {
    for (const at::Tensor& t : tensors) {
      TORCH_CHECK(append_tensor(t.numel() > 0 ? t.data_ptr() : nullptr, t.numel(), dtype_of(t.scalar_type())),
                  "fusedclip: too many elements for one call");
    }
  }
};

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// --- the norm ----------------------------------------------------------------------------------

// Scratch of one norm call: chunk partials, launch partials, then the counters: tickets and the
// non-finite flag (zeroed when the launches use them; the single-launch clip syncs its grid
// instead, and stays one launch).
struct NormScratch {
  at::Tensor memory;
  NormScratch(int64_t num_chunks, int64_t launches, const at::Device& device, NormParams& params,
              bool zero_counters = true) {
    const int64_t doubles = std::max<int64_t>(num_chunks, 1) + launches;
    const int64_t counters = launches + 1;
    memory = at::empty({doubles * 8 + counters * 4}, at::TensorOptions().dtype(at::kByte).device(device));
    auto* base = static_cast<char*>(memory.data_ptr());
    params.chunk_partials = reinterpret_cast<double*>(base);
    params.launch_partials = params.chunk_partials + std::max<int64_t>(num_chunks, 1);
    params.tickets = reinterpret_cast<unsigned int*>(base + doubles * 8);
    params.non_finite = params.tickets + launches;
    if (zero_counters) C10_CUDA_CHECK(cudaMemsetAsync(params.tickets, 0, counters * 4, current_stream()));
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
  NormScratch scratch(tables.num_chunks, static_cast<int64_t>(tables.tables.size()), device, params);
  params.num_launches = static_cast<int32_t>(tables.tables.size());
  for (size_t l = 0; l < tables.tables.size(); ++l) {
    params.launch = static_cast<int32_t>(l);
    C10_CUDA_CHECK(launch_norm(tables.tables[l], params, current_stream()));
  }
}

// --- in-place transforms ---------------------------------------------------------------------

// Runs launch(table) over every table of tensors that check_writable accepted. Tensors sharing
// memory run one at a time in list order, so shared bytes are transformed once per tensor, as
// torch does (each table then starts at its tensor's index: per-tensor coefficients).
template <typename Launch>
void transform_writable(at::TensorList tensors, const Launch& launch) {
  const auto transform_list = [&launch](at::TensorList list, int32_t first_tensor) {
    DenseTensors dense(list, Access::kWrite);
    const Tables tables(dense.tensors, first_tensor);
    for (const FullTable& table : tables.tables) C10_CUDA_CHECK(launch(table));
    dense.copy_back();
  };
  if (any_memory_shared(tensors)) {
    for (size_t i = 0; i < tensors.size(); ++i) transform_list(tensors[i], static_cast<int32_t>(i));
  } else {
    transform_list(tensors, 0);
  }
}

// A one-element float tensor argument: by value when it is on the CPU (reading it is no device
// sync), else its address on the tensors' device.
Coef scalar_arg(const at::Tensor& t, const at::Device& device, const char* op, const char* name) {
  check_scalar(t, op, name);
  if (t.device().is_cpu()) return {nullptr, DType::kFloat64, t.item<double>(), false};
  TORCH_CHECK_TYPE(t.device() == device, "fusedclip.", op, ": ", name, " is on ", t.device(),
                   " but the tensors are on ", device);
  return {t.data_ptr(), dtype_of(t.scalar_type()), 0.0, false};
}

at::TensorOptions acc_options(const at::Tensor& like, bool acc_double) {
  return like.options().dtype(acc_double ? at::kDouble : at::kFloat);
}

// --- the operators -----------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> multi_tensor_norm(at::TensorList tensors, double norm_type, bool per_tensor) {
  check_inputs(tensors, "multi_tensor_norm");
  norm_kind(norm_type);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const DenseTensors dense(tensors, Access::kRead);
  const auto options = acc_options(tensors[0], dense.acc_double);
  NormOutputs out;
  out.statistic = at::empty({}, options);
  out.per_tensor = at::empty({per_tensor ? static_cast<int64_t>(tensors.size()) : 0}, options);
  run_norm(Tables(dense.tensors), norm_params(dense, norm_type, out, 0.0), tensors[0].device());
  return {out.statistic, out.per_tensor};
}

void multi_tensor_scale_(at::TensorList tensors, const at::Tensor& coef) {
  check_writable(tensors, "multi_tensor_scale_");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const Coef value = scalar_arg(coef, tensors[0].device(), "multi_tensor_scale_", "coef");
  if (value.data == nullptr && value.value >= 1.0) return;  // a CPU coef: nothing to write
  bump_versions(tensors);
  transform_writable(tensors, [&](const FullTable& table) { return launch_scale(table, value, current_stream()); });
}

void multi_tensor_clamp_(at::TensorList tensors, double lo, double hi) {
  check_writable(tensors, "multi_tensor_clamp_");
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK_TYPE(!tensors[i].is_complex(), "fusedclip.multi_tensor_clamp_: tensor ", i,
                     " is complex; clamping is not defined for complex values");
  }
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  bump_versions(tensors);
  transform_writable(tensors, [&](const FullTable& table) { return launch_clamp(table, lo, hi, current_stream()); });
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

// The fused clip; with_norms also returns the per-tensor norms of the same read.
std::tuple<at::Tensor, at::Tensor> clip(at::TensorList tensors, double max_norm, double norm_type, bool with_norms,
                                        const char* op) {
  check_writable(tensors, op);
  norm_kind(norm_type);
  const at::Device device = tensors[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const DenseTensors dense(tensors, Access::kRead);
  const Tables tables(dense.tensors);
  NormOutputs out;
  const auto options = acc_options(tensors[0], dense.acc_double);
  out.statistic = at::empty({}, options);
  out.total = at::empty({}, options);
  out.coef = at::empty({}, options);
  if (with_norms) out.per_tensor = at::empty({static_cast<int64_t>(tensors.size())}, options);
  NormParams params = norm_params(dense, norm_type, out, max_norm);
  params.per_tensor_roots = with_norms;
  bump_versions(tensors);

  if (use_single_launch(dense, tables, tensors)) {
    NormParams single = params;
    NormScratch scratch(tables.num_chunks, 1, device, single, /*zero_counters=*/false);
    single.launch = 0;
    single.num_launches = 1;
    const cudaError_t error = launch_clip_single(tables.tables[0], single, current_stream());
    if (error == cudaSuccess) return {out.total, out.per_tensor};
    // Only "no cooperative launch here" falls back to two launches; anything else is an error.
    if (error != cudaErrorNotSupported && error != cudaErrorCooperativeLaunchTooLarge) C10_CUDA_CHECK(error);
    (void)cudaGetLastError();
  }

  run_norm(tables, params, device);
  const Coef coef{out.coef.data_ptr(), dense.acc_double ? DType::kFloat64 : DType::kFloat32, 0.0, false};
  if (dense.direct && !any_memory_shared(tensors)) {
    for (const FullTable& table : tables.tables) C10_CUDA_CHECK(launch_scale(table, coef, current_stream()));
  } else {
    transform_writable(tensors, [&](const FullTable& table) { return launch_scale(table, coef, current_stream()); });
  }
  return {out.total, out.per_tensor};
}

at::Tensor clip_grad_norm_(at::TensorList tensors, double max_norm, double norm_type) {
  return std::get<0>(clip(tensors, max_norm, norm_type, false, "clip_grad_norm_"));
}

std::tuple<at::Tensor, at::Tensor> clip_grad_norm_with_norms_(at::TensorList tensors, double max_norm,
                                                              double norm_type) {
  return clip(tensors, max_norm, norm_type, true, "clip_grad_norm_with_norms_");
}

std::tuple<at::Tensor, at::Tensor> multi_tensor_unscale_norm(at::TensorList tensors, const at::Tensor& inv_scale,
                                                             double norm_type) {
  const char* op = "multi_tensor_unscale_norm";
  const NormKind kind = norm_kind(norm_type);
  check_scalar(inv_scale, op, "inv_scale");
  if (tensors.empty()) {  // reached through a CUDA inv_scale: the statistic of no elements
    const auto options = inv_scale.options().dtype(at::kFloat);
    return {at::full({}, kind == NormKind::kMin ? INFINITY : 0.0, options), at::zeros({}, options)};
  }
  check_inputs(tensors, op);
  const at::Device device = tensors[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const Coef inv = scalar_arg(inv_scale, device, op, "inv_scale");
  const DenseTensors dense(tensors, Access::kRead);
  NormOutputs out;
  out.statistic = at::empty({}, acc_options(tensors[0], dense.acc_double));
  at::Tensor found_inf = at::empty({}, tensors[0].options().dtype(at::kFloat));
  NormParams params = norm_params(dense, norm_type, out, 0.0);
  params.unscale = true;
  params.inv_scale = inv;
  params.found_inf = found_inf.data_ptr<float>();
  run_norm(Tables(dense.tensors), params, device);
  return {out.statistic, found_inf};
}

void multi_tensor_scale_per_tensor_(at::TensorList tensors, const at::Tensor& coefs) {
  const char* op = "multi_tensor_scale_per_tensor_";
  TORCH_CHECK_TYPE(coefs.is_floating_point() && coefs.is_cuda(), "fusedclip.", op,
                   ": coefs must be a float CUDA tensor, got ", coefs.scalar_type(), " on ", coefs.device());
  TORCH_CHECK_VALUE(coefs.dim() == 1 && coefs.numel() == static_cast<int64_t>(tensors.size()), "fusedclip.", op,
                    ": coefs must be 1-dim with one coefficient per tensor (", tensors.size(), "), got shape ",
                    coefs.sizes());
  if (tensors.empty()) return;
  check_writable(tensors, op);
  TORCH_CHECK_TYPE(coefs.device() == tensors[0].device(), "fusedclip.", op, ": coefs is on ", coefs.device(),
                   " but the tensors are on ", tensors[0].device());
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const at::Tensor dense_coefs = coefs.contiguous();
  const Coef coef{dense_coefs.data_ptr(), dtype_of(dense_coefs.scalar_type()), 0.0, /*per_tensor=*/true};
  bump_versions(tensors);  // which tensors are written is known on the device only
  transform_writable(tensors, [&](const FullTable& table) { return launch_scale(table, coef, current_stream()); });
}

// --- AGC -------------------------------------------------------------------------------------

// AGC of one list in one pass (a launch per table, and one more for a table with long rows):
// total and per receive the sums of squares of the gradients before clipping. Units are rows of
// the row-major layout: other layouts go through contiguous temporaries, written back after.
void agc_list(at::TensorList grads, at::TensorList params, double clip_factor, double eps, bool acc_double,
              const at::Tensor& total, const at::Tensor& per) {
  std::vector<at::Tensor> row_major;  // (grad, param) per tensor: the temporaries live until queued
  TableList<FullAgcTable> list;
  bool long_rows = false;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor grad = grads[i].contiguous();
    const at::Tensor param = params[i].contiguous();
    row_major.push_back(grad);
    row_major.push_back(param);
    const int64_t numel = grad.numel();
    const int64_t row_numel = numel == 0 ? 0 : numel / (grad.dim() > 1 ? grad.size(0) : 1);
    long_rows = long_rows || (numel > 0 && agc_geometry(row_numel).items_per_row > 1);
    TORCH_CHECK(list.append_agc(numel > 0 ? grad.data_ptr() : nullptr, numel > 0 ? param.data_ptr() : nullptr,
                                numel, row_numel, dtype_of(grad.scalar_type()), dtype_of(param.scalar_type())),
                "fusedclip: too many elements for one call");
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
  const at::Device device = grads[0].device();
  NormScratch scratch(list.num_chunks, agc.norm.num_launches, device, agc.norm);
  at::Tensor pieces;
  if (long_rows) {
    pieces = at::empty({2 * list.num_chunks}, at::TensorOptions().dtype(at::kDouble).device(device));
    agc.piece_grad_sq = pieces.data_ptr<double>();
    agc.piece_param_sq = agc.piece_grad_sq + list.num_chunks;
  }
  for (size_t l = 0; l < list.tables.size(); ++l) {
    agc.norm.launch = static_cast<int32_t>(l);
    C10_CUDA_CHECK(launch_agc(list.tables[l], agc, current_stream()));
  }
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!row_major[2 * i].is_same(grads[i])) grads[i].copy_(row_major[2 * i]);
  }
}

std::tuple<at::Tensor, at::Tensor> multi_tensor_agc_(at::TensorList grads, at::TensorList params,
                                                     double clip_factor, double eps) {
  check_not_empty(grads, "multi_tensor_agc_");
  check_agc_arguments(grads, params, clip_factor, eps, at::kCUDA);
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const bool acc_double = std::any_of(grads.begin(), grads.end(),
                                      [](const at::Tensor& g) { return g.scalar_type() == at::kDouble; });
  const auto options = acc_options(grads[0], acc_double);
  const auto num_tensors = static_cast<int64_t>(grads.size());
  at::Tensor per = at::empty({num_tensors}, options);
  bump_versions(grads);
  if (!any_memory_shared(grads)) {
    at::Tensor total = at::empty({}, options);
    agc_list(grads, params, clip_factor, eps, acc_double, total, per);
    return {total, per};
  }
  // Gradients that share memory are clipped one tensor at a time in list order, as torch's
  // per-tensor loop clips them: each write-back lands before the next tensor is read, so a later
  // occurrence sees the earlier clips. The total then sums the per-tensor results in order.
  for (int64_t i = 0; i < num_tensors; ++i) {
    agc_list(grads.slice(i, 1), params.slice(i, 1), clip_factor, eps, acc_double, at::empty({}, options),
             per.narrow(0, i, 1));
  }
  return {per.sum(at::kDouble).to(options.dtype()), per};
}

// --- GradientMonitor -------------------------------------------------------------------------

void monitor_update_(const at::Tensor& norms, const at::Tensor& mean, const at::Tensor& var, const at::Tensor& count,
                     const at::Tensor& below, const at::Tensor& explosions, const at::Tensor& exploding,
                     const at::Tensor& vanishing, double alpha, int64_t warmup_steps, double z_threshold,
                     std::optional<double> explode_threshold, double vanish_eps, int64_t vanish_steps) {
  check_monitor_state(norms, mean, var, count, below, explosions, exploding, vanishing, at::kCUDA);
  bump_versions({mean, var, count, below, explosions, exploding, vanishing});
  const c10::cuda::CUDAGuard guard(norms.device());
  MonitorParams params{};
  params.norms = norms.data_ptr();
  params.mean = mean.data_ptr();
  params.var = var.data_ptr();
  params.count = count.data_ptr<int64_t>();
  params.below = below.data_ptr<int64_t>();
  params.explosions = explosions.data_ptr<int64_t>();
  params.exploding = exploding.data_ptr<bool>();
  params.vanishing = vanishing.data_ptr<bool>();
  params.size = norms.size(0);
  params.is_double = norms.scalar_type() == at::kDouble;
  params.has_explode = explode_threshold.has_value();
  params.ema_weight = 1.0 - alpha;
  params.z_squared = z_threshold * z_threshold;
  params.explode_threshold = explode_threshold.value_or(0.0);
  params.vanish_eps = vanish_eps;
  params.warmup_steps = warmup_steps;
  params.vanish_steps = vanish_steps;
  C10_CUDA_CHECK(launch_monitor_update(params, current_stream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedclip, CUDA, m) {
  m.impl("multi_tensor_norm", &multi_tensor_norm);
  m.impl("multi_tensor_scale_", &multi_tensor_scale_);
  m.impl("multi_tensor_clamp_", &multi_tensor_clamp_);
  m.impl("clip_grad_norm_", &clip_grad_norm_);
  m.impl("multi_tensor_agc_", &multi_tensor_agc_);
  m.impl("multi_tensor_scale_per_tensor_", &multi_tensor_scale_per_tensor_);
  m.impl("clip_grad_norm_with_norms_", &clip_grad_norm_with_norms_);
  m.impl("multi_tensor_unscale_norm", &multi_tensor_unscale_norm);
  m.impl("monitor_update_", &monitor_update_);
}

}  // namespace fusedclip::cuda
