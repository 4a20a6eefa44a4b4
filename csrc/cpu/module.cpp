// The Python module fusedclip._C, with the limited C API only (no pybind11, no torch Python
// headers): loading it registers the CPU kernels (the STABLE_TORCH_LIBRARY_IMPL blocks of
// csrc/cpu/, static initializers), and it says which instruction set csrc/cpu/isa.cpp chose.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "isa.h"

namespace {

PyObject* grad_name = nullptr;     // "grad", interned
PyObject* version_name = nullptr;  // "_version", interned

// TensorBase's getters of grad and _version, called directly for an object whose type is exactly
// torch.Tensor or torch.nn.Parameter: both resolve these attributes to TensorBase's descriptors
// (neither class defines them or __getattribute__), and a descriptor with a setter comes before
// the instance's __dict__ anyway. The call skips the generic lookup (the type's MRO, then the
// instance's __dict__): ~15 ns of a ~60 ns read. Any other type is read by PyObject_GetAttr.
struct Getter {
  PyObject* descriptor = nullptr;
  descrgetfunc get = nullptr;
};

struct TensorAttributes {
  PyObject* tensor_type = nullptr;
  PyObject* parameter_type = nullptr;
  Getter grad;
  Getter version;
};

bool load_getter(PyObject* tensor_base, const char* name, Getter* getter) {
  PyObject* descriptor = PyObject_GetAttrString(tensor_base, name);  // a descriptor, read on the class
  if (descriptor == nullptr) return false;
  getter->get = reinterpret_cast<descrgetfunc>(PyType_GetSlot(Py_TYPE(descriptor), Py_tp_descr_get));
  if (getter->get == nullptr) {
    Py_DECREF(descriptor);
    PyErr_Format(PyExc_TypeError, "torch._C.TensorBase.%s is not a descriptor", name);
    return false;
  }
  getter->descriptor = descriptor;
  return true;
}

// Loaded at the first call (torch is imported by then); nullptr, with the error set, if torch has
// not these classes.
const TensorAttributes* tensor_attributes() {
  static TensorAttributes attributes;
  static bool loaded = false;
  if (loaded) return &attributes;
  PyObject* torch = PyImport_ImportModule("torch");
  PyObject* nn = torch == nullptr ? nullptr : PyImport_ImportModule("torch.nn");
  PyObject* torch_c = torch == nullptr ? nullptr : PyImport_ImportModule("torch._C");
  PyObject* tensor_base = torch_c == nullptr ? nullptr : PyObject_GetAttrString(torch_c, "TensorBase");
  const bool ok = tensor_base != nullptr && nn != nullptr &&
                  (attributes.tensor_type = PyObject_GetAttrString(torch, "Tensor")) != nullptr &&
                  (attributes.parameter_type = PyObject_GetAttrString(nn, "Parameter")) != nullptr &&
                  load_getter(tensor_base, "grad", &attributes.grad) &&
                  load_getter(tensor_base, "_version", &attributes.version);
  Py_XDECREF(tensor_base);
  Py_XDECREF(torch_c);
  Py_XDECREF(nn);
  Py_XDECREF(torch);
  if (!ok) return nullptr;
  loaded = true;
  return &attributes;
}

// object.<name> (a new reference, nullptr with the error set), through getter when object's type
// is exactly torch.Tensor or torch.nn.Parameter.
PyObject* read_attribute(const TensorAttributes& attributes, PyObject* object, const Getter& getter, PyObject* name) {
  PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(object));
  if (type == attributes.tensor_type || type == attributes.parameter_type) {
    return getter.get(getter.descriptor, object, type);
  }
  return PyObject_GetAttr(object, name);
}

// grads_of(parameters: list) -> list: the .grad of every parameter whose .grad is not None, in
// order; whatever a .grad read raises propagates. fusedclip/_core.py's grads_of in C: the
// same reads, without the interpreter's cost per element.
PyObject* grads_of(PyObject*, PyObject* parameters) {
  if (!PyList_Check(parameters)) {
    PyErr_SetString(PyExc_TypeError, "grads_of: parameters must be a list");
    return nullptr;
  }
  const TensorAttributes* attributes = tensor_attributes();
  if (attributes == nullptr) return nullptr;
  const Py_ssize_t size = PyList_Size(parameters);
  PyObject* grads = PyList_New(size);
  if (grads == nullptr) return nullptr;
  Py_ssize_t count = 0;
  // A .grad read may run Python (a property of a subclass) that changes the list: its size is
  // read again at each step, and each parameter is held while its .grad is read.
  for (Py_ssize_t i = 0; i < size && i < PyList_Size(parameters); ++i) {
    PyObject* parameter = PyList_GetItem(parameters, i);
    Py_INCREF(parameter);
    PyObject* grad = read_attribute(*attributes, parameter, attributes->grad, grad_name);
    Py_DECREF(parameter);
    if (grad == nullptr) {
      Py_DECREF(grads);
      return nullptr;
    }
    if (grad == Py_None) {
      Py_DECREF(grad);
      continue;
    }
    PyList_SetItem(grads, count++, grad);  // steals grad
  }
  if (count < size && PyList_SetSlice(grads, count, size, nullptr) < 0) {
    Py_DECREF(grads);
    return nullptr;
  }
  return grads;
}

// plain_tensors(tensors: list, writable: bool) -> bool: whether the type of every tensor is
// exactly torch.Tensor or torch.nn.Parameter (no subclass) and, when writable, none is an
// inference tensor (the stable ABI cannot ask the operators' kernels). An inference tensor is
// found by its version counter, which it lacks: reading ._version raises for it alone.
PyObject* plain_tensors(PyObject*, PyObject* args) {
  PyObject* tensors = nullptr;
  int writable = 0;
  if (!PyArg_ParseTuple(args, "O!p", &PyList_Type, &tensors, &writable)) return nullptr;
  const TensorAttributes* attributes = tensor_attributes();
  if (attributes == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < PyList_Size(tensors); ++i) {
    PyObject* tensor = PyList_GetItem(tensors, i);
    PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(tensor));
    if (type != attributes->tensor_type && type != attributes->parameter_type) Py_RETURN_FALSE;
    if (writable) {
      PyObject* version = read_attribute(*attributes, tensor, attributes->version, version_name);
      if (version == nullptr) {
        PyErr_Clear();
        Py_RETURN_FALSE;
      }
      Py_DECREF(version);
    }
  }
  Py_RETURN_TRUE;
}

PyMethodDef methods[] = {
    {"grads_of", grads_of, METH_O, "The .grad of every parameter that has one, in order."},
    {"plain_tensors", plain_tensors, METH_VARARGS,
     "Whether every tensor is a plain Tensor or Parameter and, when writable, none is an inference tensor."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "fusedclip's CPU kernels on PyTorch's stable ABI; importing it registers them.",
    -1,
    methods,
};

}  // namespace

PyMODINIT_FUNC PyInit__C() {
  grad_name = PyUnicode_InternFromString("grad");
  version_name = PyUnicode_InternFromString("_version");
  if (grad_name == nullptr || version_name == nullptr) return nullptr;
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  // cpu_isa: the instruction set the kernels run; widest_cpu_isa: the widest this CPU and build
  // support; cpu_isa_request_ignored: FUSEDCLIP_CPU_ISA named one they cannot run.
  if (PyModule_AddStringConstant(module, "cpu_isa", fusedclip::cpu::chosen_isa()) < 0 ||
      PyModule_AddStringConstant(module, "widest_cpu_isa", fusedclip::cpu::widest_isa()) < 0 ||
      PyModule_AddIntConstant(module, "cpu_isa_request_ignored", fusedclip::cpu::isa_request_ignored() ? 1 : 0) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
