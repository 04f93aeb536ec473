"""A horizontal batch's operand pointers, gathered in C: `Pointers(where).update(ins, outs)`.

A batch of 200 optimizer updates reads ~1,200 operand pointers per call; `data_ptr()` from Python costs ~40 ns
each, plus the stores into a ctypes table. `fb_batch.gather(where, n, *seqs)` reads every operand's pointer
in C (torch's own reader for tensors and Parameters, as launch_ext.py; an int is an address already;
anything else through its data_ptr method), stores the k-th at address where[k] (a slot of the batch's
pointer table) and returns how many slots changed, so a caller can tell a steady call (same tensors, same
storages) from one whose table must be uploaded again. `gather_run(fn, a, b, c, where, n, *seqs)` then calls
fn(a, b, c) with the GIL released (the CPU batch's parallel region).

Built on first use through cpu_compiler.build, like launch_ext.py; where it cannot be built, the same
`Pointers` methods run in Python (slower, same results). `FUSEBACKEND_CTYPES_LAUNCH=1` keeps Python.
"""
from __future__ import annotations

import ctypes
import os
import threading

import torch

SOURCE = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef void (*fb_run)(void*, void*, int64_t);
static void* (*tensor_data_ptr)(PyObject*) = nullptr;   // torch's reader (plain tensors and Parameters)
static PyTypeObject* tensor_type = nullptr;
static PyTypeObject* param_type = nullptr;
static PyObject* data_ptr_name = nullptr;

static int pointer_of(PyObject* o, uint64_t* out) {
    PyTypeObject* t = Py_TYPE(o);
    if (tensor_data_ptr != nullptr && (t == tensor_type || t == param_type)) {
        try {
            *out = (uint64_t)(uintptr_t)tensor_data_ptr(o);
            return 0;
        } catch (...) {                      // not a plain strided tensor: its method raises the error
        }
    } else if (PyLong_CheckExact(o)) {
        *out = (uint64_t)PyLong_AsUnsignedLongLong(o);
        return PyErr_Occurred() ? -1 : 0;
    }
    PyObject* r = PyObject_CallMethodNoArgs(o, data_ptr_name);
    if (r == nullptr) return -1;
    *out = (uint64_t)PyLong_AsUnsignedLongLong(r);
    Py_DECREF(r);
    return PyErr_Occurred() ? -1 : 0;
}

// the objects of seqs[0], seqs[1], ... in order: the k-th's pointer to *where[k]; the count that changed, or -1
static Py_ssize_t gather_into(PyObject* where_o, PyObject* n_o, PyObject* const* seqs, Py_ssize_t nseq) {
    uint64_t* const* where = (uint64_t* const*)PyLong_AsVoidPtr(where_o);
    Py_ssize_t n = PyLong_AsSsize_t(n_o);
    if (PyErr_Occurred()) return -1;
    Py_ssize_t k = 0, changed = 0;
    for (Py_ssize_t s = 0; s < nseq; ++s) {
        PyObject* fast = PySequence_Fast(seqs[s], "gather: operands must be a sequence");
        if (fast == nullptr) return -1;
        Py_ssize_t m = PySequence_Fast_GET_SIZE(fast);
        PyObject** items = PySequence_Fast_ITEMS(fast);
        if (k + m > n) {
            Py_DECREF(fast);
            PyErr_SetString(PyExc_ValueError, "gather: more operands than table slots");
            return -1;
        }
        for (Py_ssize_t i = 0; i < m; ++i, ++k) {
            uint64_t p;
            if (pointer_of(items[i], &p) < 0) {
                Py_DECREF(fast);
                return -1;
            }
            changed += *where[k] != p;
            *where[k] = p;
        }
        Py_DECREF(fast);
    }
    if (k != n) {
        PyErr_SetString(PyExc_ValueError, "gather: fewer operands than table slots");
        return -1;
    }
    return changed;
}

// gather(where, n, *seqs) -> slots changed
static PyObject* gather(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
    if (nargs < 2) {
        PyErr_SetString(PyExc_TypeError, "gather(where, n, *seqs)");
        return nullptr;
    }
    Py_ssize_t changed = gather_into(args[0], args[1], args + 2, nargs - 2);
    return changed < 0 ? nullptr : PyLong_FromSsize_t(changed);
}

// gather_run(fn, a, b, c, where, n, *seqs): gather, then fn(a, b, c) without the GIL -> slots changed
static PyObject* gather_run(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
    if (nargs < 6) {
        PyErr_SetString(PyExc_TypeError, "gather_run(fn, a, b, c, where, n, *seqs)");
        return nullptr;
    }
    fb_run fn = (fb_run)PyLong_AsVoidPtr(args[0]);
    void* a = PyLong_AsVoidPtr(args[1]);
    void* b = PyLong_AsVoidPtr(args[2]);
    int64_t c = PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred()) return nullptr;
    Py_ssize_t changed = gather_into(args[4], args[5], args + 6, nargs - 6);
    if (changed < 0) return nullptr;
    Py_BEGIN_ALLOW_THREADS
    fn(a, b, c);
    Py_END_ALLOW_THREADS
    return PyLong_FromSsize_t(changed);
}

// setup(address of torch's data pointer reader, torch.Tensor, torch.nn.Parameter)
static PyObject* setup(PyObject*, PyObject* args) {
    unsigned long long addr;
    PyObject *type, *param;
    if (!PyArg_ParseTuple(args, "KOO", &addr, &type, &param)) return nullptr;
    tensor_data_ptr = (void* (*)(PyObject*))(uintptr_t)addr;
    tensor_type = addr ? (PyTypeObject*)type : nullptr;
    param_type = addr ? (PyTypeObject*)param : nullptr;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"gather", (PyCFunction)(void (*)(void))gather, METH_FASTCALL, "gather(where, n, *seqs)"},
    {"gather_run", (PyCFunction)(void (*)(void))gather_run, METH_FASTCALL, "gather_run(fn, a, b, c, where, n, *seqs)"},
    {"setup", setup, METH_VARARGS, "setup(reader address, tensor type, parameter type)"},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "fb_batch", nullptr, -1, methods};

extern "C" PyMODINIT_FUNC PyInit_fb_batch(void) {
    data_ptr_name = PyUnicode_InternFromString("data_ptr");
    return PyModule_Create(&module);
}
"""

_lock = threading.Lock()
_state: dict = {}
_RUN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def load(cache_dir=None):
    """The built module, or None where the Python path stays."""
    if os.environ.get("FUSEBACKEND_CTYPES_LAUNCH", "") not in ("", "0"):
        return None
    with _lock:
        if "module" not in _state:
            _state["module"] = _build(cache_dir)
        return _state["module"]


def _build(cache_dir):
    from .launch_ext import build_extension, tensor_data_ptr_reader
    module = build_extension(SOURCE, "fb_batch", cache_dir)
    if module is not None:
        module.setup(tensor_data_ptr_reader() or 0, torch.Tensor, torch.nn.Parameter)
    return module


class Pointers:
    """The destinations of a batch's operand pointers: where[k] is the table slot of the k-th operand of the
    sequences `update` is given (inputs, then output addresses)."""

    def __init__(self, where: list, ext=None):
        self.n = len(where)
        self.where = (ctypes.c_uint64 * max(1, self.n))(*where)
        self.addr = ctypes.addressof(self.where)
        self.ext = ext
        self.slots = [ctypes.c_uint64.from_address(a) for a in where] if ext is None else None

    def update(self, *seqs) -> int:
        """Write every operand's pointer to its slot; how many slots changed."""
        if self.ext is not None:
            return self.ext.gather(self.addr, self.n, *seqs)
        return self._update_py(seqs)

    def update_run(self, fn: int, a: int, b: int, c: int, *seqs) -> int:
        """update(*seqs), then fn(a, b, c) (a C function's address) without the GIL."""
        if self.ext is not None:
            return self.ext.gather_run(fn, a, b, c, self.addr, self.n, *seqs)
        changed = self._update_py(seqs)
        _RUN(fn)(a, b, c)
        return changed

    def _update_py(self, seqs) -> int:
        vals = [o if type(o) is int else o.data_ptr() for seq in seqs for o in seq]
        if len(vals) != self.n:
            raise ValueError("gather: %d operands for %d table slots" % (len(vals), self.n))
        changed = 0
        for slot, v in zip(self.slots, vals):
            if slot.value != v:
                slot.value = v
                changed += 1
        return changed
