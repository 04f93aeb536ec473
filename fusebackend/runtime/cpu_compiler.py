"""Build CPU kernels with the system C++ compiler into shared libraries, cached on disk, loaded by ctypes."""
from __future__ import annotations

import ctypes
import glob
import os
import shutil
import subprocess
import tempfile
import threading

import torch

from . import cache
from .lru import BoundedCache

INCLUDE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "emit", "include")
# -ffp-contract=off: a*b+c rounds twice, as in eager (and Inductor); the math templates use explicit FMAs.
# -mprefer-vector-width=512: g++ otherwise vectorises with 256-bit registers on AVX-512 machines; the row
# kernels are bound by vector ops (2-core Sapphire Rapids box: rmsnorm bf16 1024x4096 1.65x Inductor's kernel
# time at 256 bits, 1.23x at 512; masked softmax 1.29x -> 1.06x). Without AVX-512 it changes nothing.
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
         "-ffp-contract=off", "-fPIC", "-shared", "-std=c++17", "-w"]


class CompilerMissing(RuntimeError):
    pass


class CompileFailed(RuntimeError):
    pass


# Libraries held in memory: at most MAX_LOADED (least recently used dropped; see runtime/lru.py)
MAX_LOADED = int(os.environ.get("FUSEBACKEND_MAX_LOADED_KERNELS", "2048"))
_loaded = BoundedCache(MAX_LOADED)
_lock = threading.Lock()
_compiler_id: dict = {}


INSTALL_HINT = "install g++ (e.g. `apt-get install g++`) or set CXX to a C++ compiler"


def compiler() -> str:
    env = os.environ.get("CXX")
    if env:
        if shutil.which(env) is None:
            raise CompilerMissing("CXX=%r is not an executable C++ compiler: %s" % (env, INSTALL_HINT))
        return env
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise CompilerMissing("no C++ compiler found: %s" % INSTALL_HINT)
    return cxx


def _omp_link_flags() -> list:
    """Link the OpenMP runtime torch already loaded, so one thread pool serves both."""
    libs = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*")))
    return [libs[0], "-Wl,-rpath," + os.path.dirname(libs[0])] if libs else []


def _identity(cxx: str) -> str:
    if cxx not in _compiler_id:
        try:
            ver = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            ver = cxx
        cpu = ""
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next((l for l in f if l.startswith("flags")), "")
        except OSError:
            pass
        headers = "".join(_read(p) for p in sorted(glob.glob(os.path.join(INCLUDE, "*.h"))))
        _compiler_id[cxx] = cache.digest(ver, cpu, headers, FLAGS)
    return _compiler_id[cxx]


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def build(source: str, name: str, cache_dir: str | None = None, extra_flags=()):
    """Compile (or fetch from cache) and return the loaded library (ctypes.CDLL); `name` is a symbol it must
    export. extra_flags: more compiler flags (launch_ext.py: the Python headers), part of the cache key."""
    cxx = compiler()
    key = cache.digest(source, _identity(cxx), *extra_flags)
    with _lock:
        if key in _loaded:
            return _loaded[key]
    root = os.path.join(cache.cache_dir(cache_dir), "cpu")
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "%s_%s.so" % (name, key))
    with cache.locked(path):             # loaded under the lock: no writer replaces the entry meanwhile
        # a kernel's compile is _compile(cxx, source, path), as tests that replace it expect
        flags = (extra_flags,) if extra_flags else ()
        if cache.load_verified(path) is None:
            _compile(cxx, source, path, *flags)
        lib = _load(path, name)
        if lib is None:                  # intact checksum, yet not a loadable library: rebuild it once
            _compile(cxx, source, path, *flags)
            lib = _load(path, name)
        if lib is None:
            raise CompileFailed("the compiled kernel library %s cannot be loaded" % path)
    with _lock:
        _loaded[key] = lib
    return lib


def _load(path: str, name: str):
    try:
        lib = ctypes.CDLL(path)
        getattr(lib, name)
        return lib
    except (OSError, AttributeError):
        return None


def _compile(cxx: str, source: str, path: str, extra_flags=()) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.cpp"), os.path.join(tmp, "k.so")
        with open(src, "w") as f:
            f.write(source)
        cmd = [cxx, *FLAGS, "-I", INCLUDE, *extra_flags, src, "-o", out, *_omp_link_flags()]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:             # the compiler vanished or is not executable
            raise CompilerMissing("cannot run the C++ compiler %r (%s): %s" % (cxx, e, INSTALL_HINT)) from e
        if res.returncode != 0:
            raise CompileFailed("C++ compile failed:\n" + res.stderr[-4000:])
        with open(out, "rb") as f:
            cache.store(path, f.read())


def clear_memory() -> None:
    with _lock:
        _loaded.clear()
