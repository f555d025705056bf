// Makes the shared library importable as mlellp_ext._C. Importing it runs the
// TORCH_LIBRARY registrations; the ops are then torch.ops.mlellp.*.
// (The CMake build links the same sources without this file into a library
// for torch.ops.load_library.)
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
