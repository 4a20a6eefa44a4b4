#include "tensor_checks.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace fusedclip {
namespace {

// The shim's codes of the dtypes, device types and layout the checks compare with: functions of
// libtorch in the stable ABI, asked once. (scalar_type(), device() and layout() of a stable
// tensor map the code they read through a chain of these calls each time.)
struct ShimCodes {
  int32_t float32, float64, float16, bfloat16, complex64, complex128;
  int32_t cpu, cuda;
  int32_t strided;
};

const ShimCodes& shim_codes() {
  static const ShimCodes codes{aoti_torch_dtype_float32(),    aoti_torch_dtype_float64(),
                               aoti_torch_dtype_float16(),    aoti_torch_dtype_bfloat16(),
                               aoti_torch_dtype_complex64(),  aoti_torch_dtype_complex128(),
                               aoti_torch_device_type_cpu(),  aoti_torch_device_type_cuda(),
                               aoti_torch_layout_strided()};
  return codes;
}

// The dtype and element size of a shim dtype code that check_tensors accepts (float32, float64,
// float16, bfloat16, complex64, complex128); false for any other.
bool accepted_dtype(int32_t code, ScalarType* dtype, int64_t* element_size) {
  const ShimCodes& c = shim_codes();
  if (code == c.float32) { *dtype = ScalarType::Float; *element_size = 4; return true; }
  if (code == c.float64) { *dtype = ScalarType::Double; *element_size = 8; return true; }
  if (code == c.bfloat16) { *dtype = ScalarType::BFloat16; *element_size = 2; return true; }
  if (code == c.float16) { *dtype = ScalarType::Half; *element_size = 2; return true; }
  if (code == c.complex64) { *dtype = ScalarType::ComplexFloat; *element_size = 8; return true; }
  if (code == c.complex128) { *dtype = ScalarType::ComplexDouble; *element_size = 16; return true; }
  return false;
}

constexpr AOTITorchError kOk = AOTI_TORCH_SUCCESS;

// Whether a shape is row-major (size-1 dimensions skipped) or has no elements: the common case
// of both rules below, decided without a sort.
bool row_major_or_empty(const int64_t* sizes, const int64_t* strides, int64_t dims) {
  int64_t expected = 1;
  bool row_major = true;
  for (int64_t d = dims - 1; d >= 0; --d) {
    if (sizes[d] == 0) return true;
    if (sizes[d] == 1) continue;
    row_major = row_major && strides[d] == expected;
    expected *= sizes[d];
  }
  return row_major;
}

// The (stride, size) of a shape's dimensions of more than one element, sorted by stride (a zero
// stride first: strides are never negative); up to 16 without a heap allocation.
class DimsByStride {
 public:
  DimsByStride(const int64_t* sizes, const int64_t* strides, int64_t dims) {
    if (dims > kInline) {
      heap_.resize(static_cast<size_t>(dims));
      data_ = heap_.data();
    }
    for (int64_t d = 0; d < dims; ++d) {
      if (sizes[d] > 1) data_[count_++] = {strides[d], sizes[d]};
    }
    std::sort(data_, data_ + count_);
  }
  DimsByStride(const DimsByStride&) = delete;
  DimsByStride& operator=(const DimsByStride&) = delete;

  size_t size() const { return count_; }
  const std::pair<int64_t, int64_t>& operator[](size_t k) const { return data_[k]; }
  const std::pair<int64_t, int64_t>* begin() const { return data_; }
  const std::pair<int64_t, int64_t>* end() const { return data_ + count_; }

 private:
  static constexpr int64_t kInline = 16;
  std::pair<int64_t, int64_t> inline_[kInline];
  std::vector<std::pair<int64_t, int64_t>> heap_;
  std::pair<int64_t, int64_t>* data_ = inline_;
  size_t count_ = 0;
};

// non_overlapping_and_dense's rule on a shape. Sorted by stride, the dimensions of more than one
// element must each step over exactly the block of the ones before: 1, then size * stride of the
// previous. A tensor with no elements is dense. (A contiguous tensor passes the sorted test too:
// the shortcut on is_contiguous() changes no answer.)
bool dense_layout(const int64_t* sizes, const int64_t* strides, int64_t dims) {
  if (row_major_or_empty(sizes, strides, dims)) return true;
  int64_t expected = 1;
  for (const auto& [stride, size] : DimsByStride(sizes, strides, dims)) {
    if (stride != expected) return false;
    expected *= size;
  }
  return true;
}

// check_writable's overlap rule on a shape: no two elements share memory, so that writing each
// element once has one result (torch's in-place ops refuse a zero stride, an expanded tensor, and
// scale an element that appears k times k times). An empty tensor overlaps nothing, whatever its
// strides; a row-major one neither. Else, sorted by stride, dimensions that each step past the
// farthest offset of the ones before cannot overlap (any dense layout, slices, transposes); a
// layout that fails this (an as_strided view) is decided exactly, by marking each element's
// offset.
bool no_internal_overlap(const int64_t* sizes, const int64_t* strides, int64_t dims) {
  if (row_major_or_empty(sizes, strides, dims)) return true;
  const DimsByStride by_stride(sizes, strides, dims);
  if (by_stride[0].first == 0) return false;  // not row-major: some dimension has more than one element
  int64_t reach = 0;  // the farthest offset of the dimensions before
  bool separated = true;
  for (const auto& [stride, size] : by_stride) {
    separated = separated && stride > reach;
    reach += stride * (size - 1);
  }
  if (separated) return true;
  std::vector<bool> taken(static_cast<size_t>(reach) + 1, false);
  std::vector<int64_t> index(by_stride.size(), 0);
  int64_t offset = 0;
  while (true) {
    if (taken[static_cast<size_t>(offset)]) return false;
    taken[static_cast<size_t>(offset)] = true;
    size_t k = 0;
    for (; k < by_stride.size(); ++k) {  // the next element, the first dimension fastest
      offset += by_stride[k].first;
      if (++index[k] < by_stride[k].second) break;
      offset -= by_stride[k].first * by_stride[k].second;
      index[k] = 0;
    }
    if (k == by_stride.size()) return true;
  }
}

// check_tensors' (with writable, check_writable's) checks and the metadata of every tensor in one
// pass of eight shim calls a tensor: true when every tensor passes every check and every call
// succeeds (out, when given, then holds the metadata). False says nothing about which tensor or
// check: the caller then runs the tensor-by-tensor checks for their refusal.
template <typename HandleAt>
bool read_checked(size_t n, const HandleAt& handle_at, DeviceType device_type, bool writable, bool with_data,
                  TensorMetaList* out) {
  const ShimCodes& c = shim_codes();
  int32_t expected_device = 0;
  if (device_type == DeviceType::CPU) {
    expected_device = c.cpu;
  } else if (device_type == DeviceType::CUDA) {
    expected_device = c.cuda;
  } else {
    return false;
  }
  if (out != nullptr) out->resize(n);
  TensorMeta scratch;
  int32_t first_index = 0;
  for (size_t i = 0; i < n; ++i) {
    // An undefined tensor has no dtype the kernels take and no device: it fails here.
    const AtenTensorHandle h = handle_at(i);
    TensorMeta& m = out != nullptr ? (*out)[i] : scratch;
    int32_t dtype = 0, layout = 0, device = 0, index = 0;
    if (aoti_torch_get_dtype(h, &dtype) != kOk || !accepted_dtype(dtype, &m.dtype, &m.element_size)) return false;
    if (aoti_torch_get_layout(h, &layout) != kOk || layout != c.strided) return false;
    if (aoti_torch_get_device_type(h, &device) != kOk || device != expected_device) return false;
    if (aoti_torch_get_device_index(h, &index) != kOk) return false;
    if (i == 0) {
      first_index = index;
    } else if (index != first_index) {
      return false;
    }
    m.device_index = index;
    if (!read_shape(h, &m.dim, &m.sizes, &m.strides)) return false;
    if (writable && !no_internal_overlap(m.sizes, m.strides, m.dim)) return false;
    int64_t numel = 1;
    for (int64_t d = 0; d < m.dim; ++d) numel *= m.sizes[d];
    m.numel = numel;
    m.data = nullptr;
    if (with_data && numel > 0 && torch_get_mutable_data_ptr(h, &m.data) != kOk) return false;
  }
  return true;
}

// The byte ranges [first element, one past the farthest] overlap: the rule of any_memory_shared.
bool ranges_overlap(std::vector<std::pair<uintptr_t, uintptr_t>>& ranges) {
  // Grads are usually allocated in (reverse) parameter order: check those orders in one pass
  // before sorting.
  bool ascending = true, descending = true;
  for (size_t i = 1; i < ranges.size(); ++i) {
    ascending = ascending && ranges[i - 1].second <= ranges[i].first;
    descending = descending && ranges[i].second <= ranges[i - 1].first;
  }
  if (ascending || descending) return false;
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i - 1].second > ranges[i].first) return true;
  }
  return false;
}

void append_range(std::vector<std::pair<uintptr_t, uintptr_t>>& ranges, const void* data, const int64_t* sizes,
                  const int64_t* strides, int64_t dims, int64_t element_size) {
  int64_t last = 0;  // offset of the farthest element, in elements
  for (int64_t d = 0; d < dims; ++d) last += (sizes[d] - 1) * strides[d];
  const auto begin = reinterpret_cast<uintptr_t>(data);
  ranges.emplace_back(begin, begin + (last + 1) * element_size);
}

bool read_checked(const TensorList& tensors, DeviceType device_type, bool writable, bool with_data,
                  TensorMetaList* out) {
  return read_checked(
      tensors.size(), [&tensors](size_t i) { return tensors[i].get(); }, device_type, writable, with_data, out);
}

// check_tensors tensor by tensor, accessor by accessor: the refusals and their order.
void check_tensors_one_by_one(const TensorList& tensors, const char* op, DeviceType device_type) {
  const char* expected_device = device_type == DeviceType::CUDA ? "CUDA" : "CPU";
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i];
    FUSEDCLIP_CHECK_TYPE(t.defined(), op, ": tensor ", i, " is undefined");
    FUSEDCLIP_CHECK_TYPE(t.layout() == torch::headeronly::Layout::Strided, op, ": tensor ", i,
                         " is not a dense (strided) tensor; only dense tensors are supported");
    FUSEDCLIP_CHECK_TYPE(t.device().type() == device_type, op, ": the ", expected_device, " kernels take ",
                         expected_device, " tensors, but tensor ", i, " is on ", device_name(t));
    FUSEDCLIP_CHECK_TYPE(t.device() == tensors[0].device(), op, ": all tensors must be on one device, but tensor 0 is on ",
                         device_name(tensors[0]), " and tensor ", i, " on ", device_name(t));
    const ScalarType s = t.scalar_type();
    FUSEDCLIP_CHECK_TYPE(is_floating(s) || is_complex(s), op, ": tensor ", i, " has dtype ", dtype_name(s),
                         "; expected float32, float64, float16, bfloat16 or complex");
  }
}

void check_writable_one_by_one(const TensorList& tensors, const char* op, DeviceType device_type) {
  check_tensors_one_by_one(tensors, op, device_type);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i];
    FUSEDCLIP_CHECK_VALUE(no_internal_overlap(t.sizes().data(), t.strides().data(), t.dim()), op, ": tensor ", i,
                          " has internally overlapping memory (elements that share memory: an expanded "
                          "tensor, an as_strided view) and cannot be modified in place; clone it first");
  }
}

bool any_memory_shared_one_by_one(const TensorList& tensors) {
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  ranges.reserve(tensors.size());
  for (const Tensor& t : tensors) {
    if (t.numel() == 0) continue;
    append_range(ranges, t.data_ptr(), t.sizes().data(), t.strides().data(), t.dim(),
                 static_cast<int64_t>(t.element_size()));
  }
  return ranges_overlap(ranges);
}

}  // namespace

void check_tensors(const TensorList& tensors, const char* op, DeviceType device_type) {
  if (read_checked(tensors, device_type, false, false, nullptr)) return;
  check_tensors_one_by_one(tensors, op, device_type);
}

void check_writable(const TensorList& tensors, const char* op, DeviceType device_type) {
  if (read_checked(tensors, device_type, true, false, nullptr)) return;
  check_writable_one_by_one(tensors, op, device_type);
}

TensorMetaList checked_meta(const TensorList& tensors, const char* op, DeviceType device_type, bool writable,
                            bool with_data) {
  TensorMetaList meta;
  if (read_checked(tensors, device_type, writable, with_data, &meta)) return meta;
  // A refusal (or an accessor that failed): the checks one by one raise it, in their order; a
  // list they pass is read accessor by accessor, failing where an accessor fails.
  if (writable) {
    check_writable_one_by_one(tensors, op, device_type);
  } else {
    check_tensors_one_by_one(tensors, op, device_type);
  }
  meta.assign(tensors.size(), TensorMeta{});
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i];
    TensorMeta& m = meta[i];
    m.dtype = t.scalar_type();
    m.dim = t.dim();
    m.sizes = t.sizes().data();
    m.strides = t.strides().data();
    m.numel = t.numel();
    m.element_size = static_cast<int64_t>(t.element_size());
    m.device_index = t.get_device_index();
    if (with_data && m.numel > 0) m.data = t.mutable_data_ptr();
  }
  return meta;
}

TensorMetaList checked_meta(TensorListArg& tensors, const char* op, DeviceType device_type, bool writable,
                            bool with_data) {
  TensorMetaList meta;
  const AtenTensorHandle* handles = tensors.handles();
  if (read_checked(
          tensors.size(), [handles](size_t i) { return handles[i]; }, device_type, writable, with_data, &meta)) {
    return meta;
  }
  return checked_meta(tensors.tensors(), op, device_type, writable, with_data);
}

TensorListArg::TensorListArg(StableIValue list) {
  const auto list_handle = torch::stable::detail::to<StableListHandle>(list);
  try {
    size_t size = 0;
    STABLE_TORCH_ERROR_CODE_CHECK(torch_list_size(list_handle, &size));
    handles_.reserve(size);
    for (size_t i = 0; i < size; ++i) {
      StableIValue element;
      STABLE_TORCH_ERROR_CODE_CHECK(torch_list_get_item(list_handle, i, &element));
      handles_.push_back(torch::stable::detail::to<AtenTensorHandle>(element));  // owned from here
    }
  } catch (...) {
    for (AtenTensorHandle h : handles_) aoti_torch_delete_tensor_object(h);
    torch_delete_list(list_handle);
    throw;
  }
  STABLE_TORCH_ERROR_CODE_CHECK(torch_delete_list(list_handle));
}

TensorListArg::~TensorListArg() {
  // The handles not handed to stable tensors (which delete theirs).
  for (size_t i = tensors_.size(); i < handles_.size(); ++i) aoti_torch_delete_tensor_object(handles_[i]);
}

const TensorList& TensorListArg::tensors() {
  if (tensors_.size() < handles_.size()) {
    tensors_.reserve(handles_.size());
    while (tensors_.size() < handles_.size()) tensors_.emplace_back(handles_[tensors_.size()]);
  }
  return tensors_;
}

bool read_shape(AtenTensorHandle h, int64_t* dims, const int64_t** sizes, const int64_t** strides) {
  int64_t* s = nullptr;
  int64_t* st = nullptr;
  if (aoti_torch_get_dim(h, dims) != kOk || aoti_torch_get_sizes(h, &s) != kOk ||
      aoti_torch_get_strides(h, &st) != kOk) {
    return false;
  }
  *sizes = s;
  *strides = st;
  return true;
}

bool non_overlapping_and_dense(const Tensor& t) {
  return dense_layout(t.sizes().data(), t.strides().data(), t.dim());
}

bool non_overlapping_and_dense(const TensorMeta& t) { return dense_layout(t.sizes, t.strides, t.dim); }

namespace {

// check_agc_arguments' checks of the parameters in one pass of six shim calls a parameter, from
// the gradients' metadata: true when every pair passes, false (for any failure) sends the pairs
// through the checks one by one for the refusal.
bool agc_params_pass(const TensorList& params, const TensorMetaList& grads, DeviceType device_type) {
  const ShimCodes& c = shim_codes();
  const int32_t expected_device = device_type == DeviceType::CPU ? c.cpu : c.cuda;
  if (device_type != DeviceType::CPU && device_type != DeviceType::CUDA) return false;
  for (size_t i = 0; i < params.size(); ++i) {
    const TensorMeta& g = grads[i];
    if (is_complex(g.dtype)) return false;
    const AtenTensorHandle h = params[i].get();
    int32_t dtype = 0, layout = 0, device = 0, index = 0;
    ScalarType scalar_type = ScalarType::Float;
    int64_t element_size = 0, dims = 0;
    int64_t* sizes = nullptr;
    if (aoti_torch_get_dtype(h, &dtype) != kOk || !accepted_dtype(dtype, &scalar_type, &element_size) ||
        is_complex(scalar_type)) {
      return false;
    }
    if (aoti_torch_get_layout(h, &layout) != kOk || layout != c.strided) return false;
    if (aoti_torch_get_device_type(h, &device) != kOk || device != expected_device) return false;
    if (aoti_torch_get_device_index(h, &index) != kOk || index != g.device_index) return false;
    if (aoti_torch_get_dim(h, &dims) != kOk || dims != g.dim || aoti_torch_get_sizes(h, &sizes) != kOk) return false;
    for (int64_t d = 0; d < dims; ++d) {
      if (sizes[d] != g.sizes[d]) return false;
    }
  }
  return true;
}

}  // namespace

void check_agc_arguments(const TensorList& grads, const TensorList& params, double clip_factor, double eps,
                         DeviceType device_type) {
  const char* op = "multi_tensor_agc_";
  FUSEDCLIP_CHECK_VALUE(grads.size() == params.size(), op, ": got ", grads.size(), " gradients but ", params.size(),
                        " parameters");
  FUSEDCLIP_CHECK_VALUE(clip_factor >= 0, op, ": clip_factor must be >= 0, got ", clip_factor);
  FUSEDCLIP_CHECK_VALUE(eps >= 0, op, ": eps must be >= 0, got ", eps);
  // check_writable of the gradients, keeping their metadata for the parameters' pass.
  TensorMetaList grad_meta;
  const bool one_pass = read_checked(grads, device_type, true, false, &grad_meta);
  if (!one_pass) check_writable_one_by_one(grads, op, device_type);
  if (one_pass && agc_params_pass(params, grad_meta, device_type)) return;
  for (size_t i = 0; i < grads.size(); ++i) {
    const Tensor& p = params[i];
    FUSEDCLIP_CHECK_TYPE(p.defined() && p.layout() == torch::headeronly::Layout::Strided &&
                             p.device() == grads[i].device(),
                         op, ": parameter ", i, " must be a dense tensor on its gradient's device (",
                         device_name(grads[i]), ")");
    FUSEDCLIP_CHECK_TYPE(is_floating(p.scalar_type()), op, ": parameter ", i, " has dtype ",
                         dtype_name(p.scalar_type()), "; expected float32, float64, float16 or bfloat16");
    FUSEDCLIP_CHECK_TYPE(!is_complex(grads[i].scalar_type()), op, ": gradient ", i,
                         " is complex; AGC is defined for real tensors");
    bool same_shape = p.dim() == grads[i].dim();
    for (int64_t d = 0; same_shape && d < p.dim(); ++d) same_shape = p.size(d) == grads[i].size(d);
    FUSEDCLIP_CHECK_VALUE(same_shape, op, ": parameter ", i, " and its gradient have different shapes");
  }
}

void check_monitor_state(const Tensor& norms, const Tensor& mean, const Tensor& var, const Tensor& count,
                         const Tensor& below, const Tensor& explosions, const Tensor& exploding,
                         const Tensor& vanishing, DeviceType device_type) {
  const ScalarType dtype = norms.scalar_type();
  FUSEDCLIP_CHECK_TYPE(norms.device().type() == device_type && (dtype == ScalarType::Float || dtype == ScalarType::Double),
                       "monitor_update_: norms must be a float32 or float64 ",
                       device_type == DeviceType::CUDA ? "CUDA" : "CPU", " tensor, got ", dtype_name(dtype), " on ",
                       device_name(norms));
  FUSEDCLIP_CHECK_VALUE(norms.dim() == 1, "monitor_update_: norms must be 1-dim, got ", norms.dim(), " dimensions");
  const int64_t size = norms.size(0);
  struct State {
    const Tensor& tensor;
    const char* name;
    ScalarType dtype;
  };
  for (const State& s : {State{norms, "norms", dtype}, State{mean, "mean", dtype}, State{var, "var", dtype},
                         State{count, "count", ScalarType::Long}, State{below, "below", ScalarType::Long},
                         State{explosions, "explosions", ScalarType::Long},
                         State{exploding, "exploding", ScalarType::Bool},
                         State{vanishing, "vanishing", ScalarType::Bool}}) {
    FUSEDCLIP_CHECK_TYPE(s.tensor.device() == norms.device() && s.tensor.scalar_type() == s.dtype, "monitor_update_: ",
                         s.name, " must be a ", dtype_name(s.dtype), " tensor on ", device_name(norms), ", got ",
                         dtype_name(s.tensor.scalar_type()), " on ", device_name(s.tensor));
    FUSEDCLIP_CHECK_VALUE(s.tensor.dim() == 1 && s.tensor.size(0) == size && s.tensor.is_contiguous(),
                          "monitor_update_: ", s.name, " must be a contiguous 1-dim tensor of size ", size);
  }
}

void check_norm_type(double norm_type) {
  FUSEDCLIP_CHECK_VALUE(!std::isnan(norm_type), "norm_type must not be nan");
}

void check_scalar(const Tensor& t, const char* op, const char* arg_name) {
  FUSEDCLIP_CHECK_VALUE(t.numel() == 1, op, ": ", arg_name, " must be a one-element float tensor, got ", t.numel(),
                        " elements");
  FUSEDCLIP_CHECK_TYPE(is_floating(t.scalar_type()), op, ": ", arg_name, " must be a one-element float tensor, got ",
                       dtype_name(t.scalar_type()));
}

bool any_memory_shared(const TensorList& tensors) {
  // The byte range each tensor can touch: [first element, one past its farthest element].
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  ranges.reserve(tensors.size());
  for (const Tensor& t : tensors) {
    const AtenTensorHandle h = t.get();
    int64_t dims = 0;
    const int64_t* sizes = nullptr;
    const int64_t* strides = nullptr;
    int32_t dtype = 0;
    ScalarType scalar_type = ScalarType::Float;
    int64_t element_size = 0;
    if (!read_shape(h, &dims, &sizes, &strides) || aoti_torch_get_dtype(h, &dtype) != kOk ||
        !accepted_dtype(dtype, &scalar_type, &element_size)) {
      return any_memory_shared_one_by_one(tensors);
    }
    int64_t numel = 1;
    for (int64_t d = 0; d < dims; ++d) numel *= sizes[d];
    if (numel == 0) continue;
    void* data = nullptr;
    if (aoti_torch_get_data_ptr(h, &data) != kOk) return any_memory_shared_one_by_one(tensors);
    append_range(ranges, data, sizes, strides, dims, element_size);
  }
  return ranges_overlap(ranges);
}

bool any_memory_shared(const TensorMetaList& tensors) {
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  ranges.reserve(tensors.size());
  for (const TensorMeta& t : tensors) {
    if (t.numel == 0) continue;
    append_range(ranges, t.data, t.sizes, t.strides, t.dim, t.element_size);
  }
  return ranges_overlap(ranges);
}

}  // namespace fusedclip
