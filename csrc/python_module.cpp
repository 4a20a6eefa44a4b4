// The Python module fusedclip._C: importing it registers the operators (csrc/fusedclip.cpp and
// the kernels), and it offers entry points that take the parameters themselves.
//
// Why those entry points: at 10,000 parameters, reading p.grad in Python, then parsing the list of
// grads back into C++ tensors, costs more than the kernels (about 1 us per parameter once backward
// has evicted their metadata from cache). Here the grads are read in C++, no Python object is
// made for them, and the operator is called through the C++ dispatcher below the autograd keys
// (as torch's own autograd kernels redispatch non-differentiable ops): the Python API calls these
// under no_grad on plain CPU tensors, and the kernels bump the version counters themselves. That
// skips autograd's boxed fallback, which would copy the 10,000 tensors into and out of a stack.
#include <torch/extension.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cpu/vec_config.h"
#include "tensor_checks.h"
#ifdef FUSEDCLIP_WITH_CUDA
#include "cuda/ops.h"
#endif

namespace {

// Dispatch keys of a tensor the CPU operators do not take as it is: a tensor subclass (Python),
// a lazily conjugated or negated view.
const c10::DispatchKeySet& not_plain_keys() {
  static const c10::DispatchKeySet keys(
      {c10::DispatchKey::Python, c10::DispatchKey::Conjugate, c10::DispatchKey::Negative});
  return keys;
}

// The defined grads of params when every item is exactly a Tensor or a Parameter (a subclass may
// define .grad its own way) and every grad is a plain tensor (see not_plain_keys) on one device,
// of type device_type when one is given; nothing otherwise: the caller then takes its Python
// path, which groups by device and validates. The one grad collection of every fast path.
// positions, when given, receives the index in params of each grad returned.
std::optional<std::vector<at::Tensor>> grads_of(const py::list& params, std::optional<c10::DeviceType> device_type,
                                                std::vector<int64_t>* positions = nullptr) {
  const Py_ssize_t n = PyList_GET_SIZE(params.ptr());
  std::vector<at::Tensor> grads;
  grads.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(params.ptr(), i);
    if (!THPVariable_CheckExact(item)) return std::nullopt;
    const at::Tensor& grad = THPVariable_Unpack(item).grad();
    if (!grad.defined()) continue;
    if (device_type.has_value() && grad.device().type() != *device_type) return std::nullopt;
    if (!grads.empty() && grad.device() != grads[0].device()) return std::nullopt;
    // A tensor-subclass grad (a DTensor on a plain parameter) dispatches to Python, and a lazily
    // conjugated or negated one to torch's fallback, not to the operators' checks: the Python
    // path groups the first and refuses the others with the reason. One test of the key set.
    if (grad.key_set().has_any(not_plain_keys())) return std::nullopt;
    grads.push_back(grad);
    if (positions != nullptr) positions->push_back(static_cast<int64_t>(i));
  }
  return grads;
}

std::optional<std::vector<at::Tensor>> cpu_grads_of(const py::list& params, std::vector<int64_t>* positions = nullptr) {
  return grads_of(params, c10::DeviceType::CPU, positions);
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// op(args...) without the GIL, dispatched below the autograd keys (see the top of this file).
template <typename Signature, typename... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Signature>& op, Args&&... args) {
  py::gil_scoped_release no_gil;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(std::forward<Args>(args)...);
}

// fusedclip::clip_grad_norm_ on the grads of params; None when it did not run (see grads_of, or
// no grads at all). Raises, before anything is modified, where the operator refuses the grads.
py::object clip_grad_norm_of(const py::list& params, double max_norm, double norm_type) {
  static const auto op = find_op<at::Tensor(at::TensorList, double, double)>("fusedclip::clip_grad_norm_");
  auto grads = cpu_grads_of(params);
  if (!grads || grads->empty()) return py::none();
  return py::cast(call_below_autograd(op, *grads, max_norm, norm_type));
}

// fusedclip::multi_tensor_scale_ on the grads of params; false when it did not run.
bool scale_grads_of(const py::list& params, const at::Tensor& coef) {
  static const auto op = find_op<void(at::TensorList, const at::Tensor&)>("fusedclip::multi_tensor_scale_");
  auto grads = cpu_grads_of(params);
  if (!grads) return false;
  if (!grads->empty()) call_below_autograd(op, *grads, coef);
  return true;
}

// fusedclip::multi_tensor_clamp_ on the grads of params; false when it did not run.
bool clamp_grads_of(const py::list& params, double lo, double hi) {
  static const auto op = find_op<void(at::TensorList, double, double)>("fusedclip::multi_tensor_clamp_");
  auto grads = cpu_grads_of(params);
  if (!grads) return false;
  if (!grads->empty()) call_below_autograd(op, *grads, lo, hi);
  return true;
}

// fusedclip::clip_grad_norm_with_norms_ on the grads of params: (total norm, one norm per
// parameter, 0 where it has no grad); None when it did not run.
py::object clip_grad_norm_with_norms_of(const py::list& params, double max_norm, double norm_type) {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor>(at::TensorList, double, double)>(
      "fusedclip::clip_grad_norm_with_norms_");
  // Where each grad came from, read with the grads: the operator runs without the GIL, and
  // another thread may assign a .grad meanwhile.
  std::vector<int64_t> positions;
  auto grads = cpu_grads_of(params, &positions);
  if (!grads || grads->empty()) return py::none();
  auto [total, per_grad] = call_below_autograd(op, *grads, max_norm, norm_type);
  const int64_t n = static_cast<int64_t>(PyList_GET_SIZE(params.ptr()));
  if (static_cast<int64_t>(grads->size()) == n) return py::make_tuple(total, per_grad);
  at::Tensor per_param = at::zeros({n}, per_grad.options());
  per_param.index_copy_(0, at::tensor(positions, at::kLong), per_grad);
  return py::make_tuple(total, per_param);
}

// Whether every item is a plain CPU tensor: one the CPU operators take as it is (not a subclass,
// which dispatches to Python, nor a lazily conjugated or negated view, which meets torch's
// fallback before the operators' own checks). The in-place fast paths of lists ask it first, so
// that anything else gets the Python path's precise error. ~5 ns a tensor.
bool plain_cpu_tensors(const py::list& tensors) {
  const Py_ssize_t n = PyList_GET_SIZE(tensors.ptr());
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(tensors.ptr(), i);
    if (!THPVariable_Check(item)) return false;
    const at::Tensor& t = THPVariable_Unpack(item);
    if (!t.defined() || !t.device().is_cpu() || t.key_set().has_any(not_plain_keys())) return false;
  }
  return true;
}

// --- the operators called straight (fusedclip/_eager.py) -------------------------------------
// fusedclip::<op> on a Python list of tensors, below the autograd keys (see the top of this
// file), without the GIL: what torch.ops.fusedclip.<op> does, without the Python argument
// parser and autograd's boxed fallback for the list. The kernels bump what they write.

std::vector<at::Tensor> tensors_of(const py::list& list) {
  const Py_ssize_t n = PyList_GET_SIZE(list.ptr());
  std::vector<at::Tensor> tensors;
  tensors.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(list.ptr(), i);
    TORCH_CHECK_TYPE(THPVariable_Check(item), "fusedclip: item ", i, " of the list is not a tensor");
    tensors.push_back(THPVariable_Unpack(item));
  }
  return tensors;
}

using TwoTensors = std::tuple<at::Tensor, at::Tensor>;

void def_direct_operators(py::module_& m) {
  m.def("multi_tensor_norm", [](const py::list& t, double p, bool per_tensor) {
    static const auto op = find_op<TwoTensors(at::TensorList, double, bool)>("fusedclip::multi_tensor_norm");
    return call_below_autograd(op, tensors_of(t), p, per_tensor);
  });
  m.def("multi_tensor_scale_", [](const py::list& t, const at::Tensor& coef) {
    static const auto op = find_op<void(at::TensorList, const at::Tensor&)>("fusedclip::multi_tensor_scale_");
    return call_below_autograd(op, tensors_of(t), coef);
  });
  m.def("multi_tensor_clamp_", [](const py::list& t, double lo, double hi) {
    static const auto op = find_op<void(at::TensorList, double, double)>("fusedclip::multi_tensor_clamp_");
    return call_below_autograd(op, tensors_of(t), lo, hi);
  });
  m.def("clip_grad_norm_", [](const py::list& t, double max_norm, double p) {
    static const auto op = find_op<at::Tensor(at::TensorList, double, double)>("fusedclip::clip_grad_norm_");
    return call_below_autograd(op, tensors_of(t), max_norm, p);
  });
  m.def("multi_tensor_agc_", [](const py::list& grads, const py::list& params, double factor, double eps) {
    static const auto op = find_op<TwoTensors(at::TensorList, at::TensorList, double, double)>("fusedclip::multi_tensor_agc_");
    return call_below_autograd(op, tensors_of(grads), tensors_of(params), factor, eps);
  });
  m.def("multi_tensor_scale_per_tensor_", [](const py::list& t, const at::Tensor& coefs) {
    static const auto op = find_op<void(at::TensorList, const at::Tensor&)>("fusedclip::multi_tensor_scale_per_tensor_");
    return call_below_autograd(op, tensors_of(t), coefs);
  });
  m.def("clip_grad_norm_with_norms_", [](const py::list& t, double max_norm, double p) {
    static const auto op = find_op<TwoTensors(at::TensorList, double, double)>("fusedclip::clip_grad_norm_with_norms_");
    return call_below_autograd(op, tensors_of(t), max_norm, p);
  });
  m.def("multi_tensor_unscale_norm", [](const py::list& t, const at::Tensor& inv_scale, double p) {
    static const auto op = find_op<TwoTensors(at::TensorList, const at::Tensor&, double)>("fusedclip::multi_tensor_unscale_norm");
    return call_below_autograd(op, tensors_of(t), inv_scale, p);
  });
}

// Whether the operators take tensors as they are: plain tensors (see not_plain_keys) on one
// device that pass fusedclip::check_tensors (with writes, check_writable), real when real_only.
bool operators_take(const std::vector<at::Tensor>& tensors, bool writes, bool real_only) {
  if (tensors.empty()) return false;
  for (const at::Tensor& t : tensors) {
    if (!t.defined() || t.key_set().has_any(not_plain_keys()) || (real_only && t.is_complex())) return false;
  }
  try {
    const c10::DeviceType type = tensors[0].device().type();
    if (writes) {
      fusedclip::check_writable(tensors, "fast path", type);
    } else {
      fusedclip::check_tensors(tensors, "fast path", type);
    }
  } catch (const c10::Error&) {
    return false;
  }
  return true;
}

// The defined grads of params, as a list, when the operators take them as they are (see
// operators_take); None otherwise (the Python path then validates, groups and says why). The
// GPU backends' fast path: one C++ call collects and checks 1,000 grads in microseconds.
py::object grads_on_one_device(const py::list& params, bool writes, bool real_only) {
  auto grads = grads_of(params, std::nullopt);
  if (!grads || !operators_take(*grads, writes, real_only)) return py::none();
  py::list out(grads->size());
  for (size_t i = 0; i < grads->size(); ++i) {
    out[i] = py::reinterpret_steal<py::object>(THPVariable_Wrap((*grads)[i]));
  }
  return out;
}

// Whether the operators take the tensors of the list as they are (see operators_take): the
// general path's Python checks of every tensor in one call (fusedclip/_core.py group_by_device).
bool tensors_on_one_device(const py::list& tensors, bool writes, bool real_only) {
  try {
    return operators_take(tensors_of(tensors), writes, real_only);
  } catch (const c10::TypeError&) {  // an item that is not a tensor
    return false;
  }
}

// Bumps the version counter of every tensor of the list, as an in-place operator's
// ADInplaceOrView kernel does: what torch._C._increment_version does, without parsing the list
// (~5 ns a tensor instead of ~250).
void bump_versions_of(const py::list& tensors) {
  const Py_ssize_t n = PyList_GET_SIZE(tensors.ptr());
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(tensors.ptr(), i);
    TORCH_CHECK_TYPE(THPVariable_Check(item), "bump_versions: item ", i, " is not a tensor");
    THPVariable_Unpack(item).unsafeGetTensorImpl()->bump_version();
  }
}

// The part of fusedclip/triton/tables.py's table-cache key that depends on each tensor: 24 bytes per
// tensor (address, numel, dtype, flags: non-overlapping and dense, inference tensor), as bytes;
// None when an item is not a tensor with storage and strided layout (the caller then checks the
// list in Python and says why it is refused). Read in C++: in Python it costs ~0.5 us a tensor.
py::object triton_table_key(const py::list& tensors) {
  struct Record {
    int64_t address;
    int64_t numel;
    int8_t dtype;
    int8_t flags;
    int8_t padding[6];
  };
  static_assert(sizeof(Record) == 24);
  const Py_ssize_t n = PyList_GET_SIZE(tensors.ptr());
  std::string key(static_cast<size_t>(n) * sizeof(Record), '\0');
  auto* records = reinterpret_cast<Record*>(key.data());
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(tensors.ptr(), i);
    if (!THPVariable_Check(item)) return py::none();
    const at::Tensor& t = THPVariable_Unpack(item);
    if (t.layout() != at::kStrided || !t.has_storage() || t.is_meta()) return py::none();
    Record& r = records[i];
    r.address = reinterpret_cast<int64_t>(t.unsafeGetTensorImpl()->data());
    r.numel = t.numel();
    r.dtype = static_cast<int8_t>(t.scalar_type());
    r.flags = static_cast<int8_t>((t.is_non_overlapping_and_dense() ? 1 : 0) | (t.is_inference() ? 2 : 0));
  }
  return py::bytes(key);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("cpu_capability") = FUSEDCLIP_CPU_CAPABILITY_NAME;
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
#ifdef FUSEDCLIP_WITH_CUDA
  m.attr("cuda_kernels") = true;  // csrc/cuda/ was built: backend "cuda"
  m.def("set_cuda_single_launch_max_bytes", &fusedclip::cuda::set_single_launch_max_bytes, py::arg("bytes"),
        "Largest grads (bytes) the fused CUDA clip runs as one cooperative launch; -1: the L2 size, 0: never.");
  m.def("cuda_single_launch_max_bytes", &fusedclip::cuda::single_launch_max_bytes);
  m.def("cuda_kernels_run_on", &fusedclip::cuda::kernels_run_on, py::arg("device"),
        "Whether the CUDA kernels of this build run on that CUDA device (its architecture is built).");
#else
  m.attr("cuda_kernels") = false;
#endif
  m.def("clip_grad_norm_of", &clip_grad_norm_of, py::arg("params"), py::arg("max_norm"),
        py::arg("norm_type"));
  m.def("scale_grads_of", &scale_grads_of, py::arg("params"), py::arg("coef"));
  m.def("clamp_grads_of", &clamp_grads_of, py::arg("params"), py::arg("lo"), py::arg("hi"));
  m.def("clip_grad_norm_with_norms_of", &clip_grad_norm_with_norms_of, py::arg("params"),
        py::arg("max_norm"), py::arg("norm_type"));
  m.def("triton_table_key", &triton_table_key, py::arg("tensors"));
  m.def("plain_cpu_tensors", &plain_cpu_tensors, py::arg("tensors"));
  m.def("grads_on_one_device", &grads_on_one_device, py::arg("params"), py::arg("writes"),
        py::arg("real_only") = false);
  m.def("tensors_on_one_device", &tensors_on_one_device, py::arg("tensors"), py::arg("writes"),
        py::arg("real_only") = false);
  m.def("bump_versions", &bump_versions_of, py::arg("tensors"));
  py::module_ direct = m.def_submodule("direct", "fusedclip::<op> called straight on a list (fusedclip/_eager.py)");
  def_direct_operators(direct);
}
