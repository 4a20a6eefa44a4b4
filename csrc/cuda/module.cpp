// fusedclip._C_cuda: the Python module of the CUDA library. Importing it loads the library, whose
// static initializers register the CUDA kernels of the fusedclip operators (the
// STABLE_TORCH_LIBRARY_IMPL block of each csrc/cuda/*.cu); the Python layer defines the operators'
// schemas before the import. The module itself holds the settings of csrc/cuda/glue.h and the CUDA
// version of the build.
//
// The limited C API only (abi3, CPython 3.10 on: setup.py passes the same Py_LIMITED_API): no
// pybind11 and no torch Python header, so the library links neither libtorch_python nor a
// particular CPython.
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030a0000
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstdint>
#include <exception>

#include "cuda/glue.h"

namespace {

// An exception of the C++ code as a Python RuntimeError (none may cross into the interpreter).
PyObject* raise_runtime_error(const std::exception& e) {
  PyErr_SetString(PyExc_RuntimeError, e.what());
  return nullptr;
}

PyObject* set_single_launch_max_bytes(PyObject* /*module*/, PyObject* bytes) {
  if (!PyLong_Check(bytes)) {
    PyErr_SetString(PyExc_TypeError, "set_single_launch_max_bytes: bytes must be an int");
    return nullptr;
  }
  const long long value = PyLong_AsLongLong(bytes);
  if (value == -1 && PyErr_Occurred()) return nullptr;
  fusedclip::cuda::set_single_launch_max_bytes(static_cast<int64_t>(value));
  Py_RETURN_NONE;
}

PyObject* single_launch_max_bytes(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(static_cast<long long>(fusedclip::cuda::single_launch_max_bytes()));
}

PyObject* kernels_run_on(PyObject* /*module*/, PyObject* device) {
  if (!PyLong_Check(device)) {
    PyErr_SetString(PyExc_TypeError, "kernels_run_on: device must be an int (a CUDA device index)");
    return nullptr;
  }
  const long index = PyLong_AsLong(device);
  if (index == -1 && PyErr_Occurred()) return nullptr;
  if (index < 0 || index > INT32_MAX) Py_RETURN_FALSE;  // no such device
  try {
    return PyBool_FromLong(fusedclip::cuda::kernels_run_on(static_cast<int>(index)) ? 1 : 0);
  } catch (const std::exception& e) {
    return raise_runtime_error(e);
  }
}

PyMethodDef methods[] = {
    {"set_single_launch_max_bytes", set_single_launch_max_bytes, METH_O,
     "set_single_launch_max_bytes(bytes: int) -> None\n\nLargest grads (bytes) the fused CUDA clip runs as one "
     "cooperative launch; -1: the L2 size, 0: never."},
    {"single_launch_max_bytes", single_launch_max_bytes, METH_NOARGS,
     "single_launch_max_bytes() -> int\n\nThe setting of set_single_launch_max_bytes (-1 by default)."},
    {"kernels_run_on", kernels_run_on, METH_O,
     "kernels_run_on(device: int) -> bool\n\nWhether the CUDA kernels of this build run on that CUDA device (its "
     "architecture is built); False where there is no such device."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "fusedclip._C_cuda",
    "The CUDA kernels of fusedclip's operators (registered on import) and their settings.",
    -1,
    methods,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C_cuda() {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "cuda_version", fusedclip::cuda::cuda_runtime_version()) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
