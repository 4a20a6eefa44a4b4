// The Python module fusedclip._C, with the limited C API only (no pybind11, no torch Python
// headers): loading it registers the CPU kernels (the STABLE_TORCH_LIBRARY_IMPL blocks of
// csrc/cpu/, static initializers), and it says which instruction set csrc/cpu/isa.cpp chose.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "isa.h"

namespace {

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "fusedclip's CPU kernels on PyTorch's stable ABI; importing it registers them.",
    -1,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C() {
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
