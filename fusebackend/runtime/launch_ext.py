"""One C call per CPU kernel launch: a small CPython extension, built once per machine and Python like a kernel.

The ctypes path costs, per launch, a Python `data_ptr()` call and a ctypes array store per operand and
ctypes' own call (about 0.35 us per operand and 0.5 us per call on the 2-core box): for a small graph of 20
kernels that is a quarter of its time. `fb_launch.launch(kernel, meta, *operands)` reads each operand's data
pointer in C (torch's own reader for plain tensors, the one Inductor's C++ kernels use; an int is an address
already; anything else, e.g. a Parameter, through its data_ptr method) and calls kernel(ptrs, meta) with the
GIL released. Nothing is shared between calls, so two threads may launch at once.

Built on first use through cpu_compiler.build (disk cache, a lock per entry); where it cannot be built (no
Python headers, no compiler) or torch lacks the pointer reader, `load()` returns None and kernels launch
through ctypes. `FUSEBACKEND_CTYPES_LAUNCH=1` keeps ctypes (for comparing the two).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sysconfig
import threading

import torch

SOURCE = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef void (*fb_kernel)(void**, const int64_t*);
static void* (*tensor_data_ptr)(PyObject*) = nullptr;   // torch's reader for exact torch.Tensor objects
static PyTypeObject* tensor_type = nullptr;
static PyObject* data_ptr_name = nullptr;

static int pointer_of(PyObject* o, void** out) {
    if (Py_TYPE(o) == tensor_type) {
        try {
            *out = tensor_data_ptr(o);
            return 0;
        } catch (...) {                      // not a plain strided tensor: its method raises the error
        }
    } else if (PyLong_CheckExact(o)) {
        *out = PyLong_AsVoidPtr(o);
        return (*out == nullptr && PyErr_Occurred()) ? -1 : 0;
    }
    PyObject* r = PyObject_CallMethodNoArgs(o, data_ptr_name);
    if (r == nullptr) return -1;
    *out = PyLong_AsVoidPtr(r);
    Py_DECREF(r);
    return PyErr_Occurred() ? -1 : 0;
}

// launch(kernel address, meta address, *operands): kernel(operand pointers, meta), without the GIL
static PyObject* launch(PyObject*, PyObject* const* args, Py_ssize_t n) {
    if (n < 2) {
        PyErr_SetString(PyExc_TypeError, "launch(kernel, meta, *operands)");
        return nullptr;
    }
    fb_kernel kernel = (fb_kernel)PyLong_AsVoidPtr(args[0]);
    const int64_t* meta = (const int64_t*)PyLong_AsVoidPtr(args[1]);
    if (PyErr_Occurred()) return nullptr;
    void* stack[32];
    void** ptrs = stack;
    Py_ssize_t m = n - 2;
    if (m > 32) {
        ptrs = (void**)PyMem_Malloc(m * sizeof(void*));
        if (ptrs == nullptr) return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < m; ++i) {
        if (pointer_of(args[i + 2], &ptrs[i]) < 0) {
            if (ptrs != stack) PyMem_Free(ptrs);
            return nullptr;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    kernel(ptrs, meta);
    Py_END_ALLOW_THREADS
    if (ptrs != stack) PyMem_Free(ptrs);
    Py_RETURN_NONE;
}

// setup(address of torch's data pointer reader, torch.Tensor)
static PyObject* setup(PyObject*, PyObject* args) {
    unsigned long long addr;
    PyObject* type;
    if (!PyArg_ParseTuple(args, "KO", &addr, &type)) return nullptr;
    tensor_data_ptr = (void* (*)(PyObject*))(uintptr_t)addr;
    tensor_type = addr ? (PyTypeObject*)type : nullptr;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"launch", (PyCFunction)(void (*)(void))launch, METH_FASTCALL, "launch(kernel, meta, *operands)"},
    {"setup", setup, METH_VARARGS, "setup(reader address, tensor type)"},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "fb_launch", nullptr, -1, methods};

extern "C" PyMODINIT_FUNC PyInit_fb_launch(void) {
    data_ptr_name = PyUnicode_InternFromString("data_ptr");
    return PyModule_Create(&module);
}
"""

_lock = threading.Lock()
_state: dict = {}


def load(cache_dir=None):
    """The built module (its `launch`), or None where the ctypes call stays."""
    if os.environ.get("FUSEBACKEND_CTYPES_LAUNCH", "") not in ("", "0"):
        return None
    with _lock:
        if "module" not in _state:
            _state["module"] = _build(cache_dir)
        return _state["module"]


def tensor_data_ptr_reader():
    """The address of torch's C reader of a tensor's data pointer (Inductor's guards export it), else None."""
    reader = getattr(getattr(getattr(torch._C, "_dynamo", None), "guards", None),
                     "_torchinductor_pyobject_tensor_data_ptr", None)
    return reader if isinstance(reader, int) else None


def build_extension(source: str, name: str, cache_dir=None):
    """A CPython extension module `name` built from C++ `source` (through the kernel compiler and its cache), or
    None: no Python headers, or a compiler error (the caller keeps its Python path)."""
    include = sysconfig.get_paths().get("include")
    if not include or not os.path.exists(os.path.join(include, "Python.h")):
        return None
    from . import cpu_compiler
    try:
        lib = cpu_compiler.build(source, "PyInit_" + name, cache_dir, extra_flags=("-I", include))
        loader = importlib.machinery.ExtensionFileLoader(name, lib._name)
        spec = importlib.util.spec_from_file_location(name, lib._name, loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        return module
    except Exception:
        return None


def _build(cache_dir):
    reader = tensor_data_ptr_reader()
    module = build_extension(SOURCE, "fb_launch", cache_dir) if reader is not None else None
    if module is not None:
        module.setup(reader, torch.Tensor)
    return module
