// lory PyTorch extension: the Python module the compiled library is imported as
// (lory_torch._C in an installed package). It has no members: importing it
// loads the shared library, whose static initializers (TORCH_LIBRARY,
// TORCH_LIBRARY_IMPL in the other sources) register the torch.ops.lory ops.
#include <Python.h>

#define LORY_TORCH_CONCAT_(a, b) a##b
#define LORY_TORCH_CONCAT(a, b) LORY_TORCH_CONCAT_(a, b)

// TORCH_EXTENSION_NAME is the module's name as torch.utils.cpp_extension builds
// it (_C from setup.py; the JIT build's library name, unused there).
extern "C" PyMODINIT_FUNC LORY_TORCH_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "lory's compiled ops (torch.ops.lory)", -1, nullptr};
  return PyModule_Create(&module);
}
