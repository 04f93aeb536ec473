"""Bad inputs of every class the user controls, and concurrent use: a clear error or a correct result, never a crash
or a wrong answer (issue 6). One test per class:

options (unknown name, ill-typed value) -> OptionError naming the option; an op the templates do not cover -> an
ATen call; a kernel that fails to compile -> that group runs as ATen with one warning; no C++ compiler -> the same,
and the warning says how to install one; an unusable cache folder -> the same, naming where the path came from; a
corrupt cache entry -> rebuilt, never loaded; two processes filling one cache at once; one compiled model called
from several threads at once.
"""
import glob
import hashlib
import os
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch

import fusebackend
from fusebackend.runtime import cache, cpu_compiler
from numerics import assert_matches


def _fuse_warnings(caught):
    return [str(w.message) for w in caught if str(w.message).startswith("fusebackend")]


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty kernel cache folder and no kernels in memory: every kernel is built (or fails) for real."""
    d = tmp_path / "cache"
    monkeypatch.setenv("FUSEBACKEND_CACHE_DIR", str(d))
    fusebackend.reset()
    yield d
    fusebackend.reset()


def _unique(x, tag):
    """A pointwise chain whose kernel text no other test produces (so it is compiled cold here)."""
    return torch.tanh(x * tag + 0.25) * torch.sigmoid(x)


# ---------------------------------------------------------------- options

@pytest.mark.parametrize("how", ["torch.compile", "FuseOptions"])
def test_unknown_option_is_an_option_error_listing_the_allowed_ones(how):
    with pytest.raises(fusebackend.OptionError) as ei:
        if how == "FuseOptions":
            fusebackend.FuseOptions.from_dict({"cuda_graphs": True})
        else:
            torch.compile(lambda x: x + 1, backend="fuse", options={"cuda_graphs": True})(torch.randn(4))
    msg = str(ei.value)
    assert "'cuda_graphs'" in msg
    for allowed in ("cudagraphs", "cache_dir", "fallback", "max_group_nodes", "compile_threads", "dump_dir"):
        assert allowed in msg, msg


@pytest.mark.parametrize("name,value", [("cudagraphs", "yes"), ("fallback", "maybe"), ("max_group_nodes", 0),
                                        ("max_group_nodes", True), ("compile_threads", -1), ("cache_dir", 3),
                                        ("dump_dir", ["x"])])
def test_ill_typed_option_is_an_option_error_naming_it(name, value):
    with pytest.raises(fusebackend.OptionError, match="'%s'" % name) as ei:
        torch.compile(lambda x: x * 2, backend="fuse", options={name: value})(torch.randn(4))
    assert repr(value) in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_options_that_are_not_a_dict():
    with pytest.raises(fusebackend.OptionError, match="must be a dict"):
        fusebackend.FuseOptions.from_dict([("cudagraphs", True)])


# ---------------------------------------------------------------- ops the templates do not cover

def test_unsupported_op_runs_as_aten_with_a_correct_result():
    def f(x):
        return torch.cumsum(torch.sin(x), dim=1) * 2 + torch.sort(x, dim=-1).values
    x = torch.randn(8, 33)
    rep = fusebackend.explain(f, x)
    assert rep.num_aten_calls >= 2 and rep.num_kernels >= 1, str(rep)
    assert not rep.fallbacks, rep.fallbacks             # not a failure: the op is simply opaque
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_matches(f, torch.compile(f, backend="fuse"), (torch.randn(8, 33),))
    assert not _fuse_warnings(caught)


def test_tensor_constant_made_inside_the_model_is_read_by_a_kernel():
    """torch.tensor(...) inside forward becomes a get_attr constant of the AOT graph (it crashed lowering)."""
    def f(x):
        keep = x > 0
        return torch.softmax(torch.where(keep, torch.zeros(()), torch.tensor(float("-inf"))) + x, -1)
    x = torch.randn(6, 40)
    x[:, 0] = 1.0                                        # no row is all -inf
    rep = fusebackend.explain(f, x)
    assert rep.num_kernels == 1 and rep.num_aten_calls == 0 and not rep.fallbacks, str(rep)
    torch._dynamo.reset()
    y = torch.randn(6, 40)
    y[:, 0] = 1.0
    assert_matches(f, torch.compile(f, backend="fuse"), (y,))


def _compile_and_check_exp():
    """exp(x) * 2 compiled fresh and checked against eager; the warnings it raised."""
    f = lambda x: torch.exp(x) * 2
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_matches(f, torch.compile(f, backend="fuse"), (torch.randn(5, 7),))
    return caught


def test_graph_we_cannot_lower_runs_as_aten_with_one_warning(monkeypatch):
    from fusebackend.capture import backend

    def refuse(gm):
        raise NotImplementedError("FX node kind 'call_module' is not supported")
    monkeypatch.setattr(backend, "lower", refuse)
    caught = _compile_and_check_exp()
    assert len(_fuse_warnings(caught)) == 1, [str(w.message) for w in caught]


def test_emitter_bug_runs_that_group_as_aten_with_one_warning(monkeypatch):
    """An exception other than EmitError inside an emitter (a bug) is a fallback, not a crash."""
    from fusebackend.capture import kernels

    def broken(fg, group):
        raise KeyError("emitter bug")
    monkeypatch.setattr(kernels, "emit_kernel", broken)
    msgs = _fuse_warnings(_compile_and_check_exp())
    assert len(msgs) == 1 and "internal error" in msgs[0] and "KeyError" in msgs[0], msgs


# ---------------------------------------------------------------- compile failures

def test_compiler_that_fails_gives_one_warning_and_a_correct_result(fresh_cache, monkeypatch):
    monkeypatch.setenv("CXX", "/bin/false")
    f = lambda x: _unique(x, 1.375)
    compiled = torch.compile(f, backend="fuse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_matches(f, compiled, (torch.randn(300),))
        assert_matches(f, compiled, (torch.randn(300),))      # no second warning on the next call
    msgs = _fuse_warnings(caught)
    assert len(msgs) == 1, msgs
    assert "fell back to ATen" in msgs[0] and "compile" in msgs[0]
    assert not glob.glob(str(fresh_cache / "cpu" / "*.so"))


def test_one_bad_group_falls_back_alone(fresh_cache, monkeypatch):
    """Two kernel groups around a matmul; the first one's C++ does not compile: only it runs as ATen."""
    real = cpu_compiler._compile

    def broken_for_tanh(cxx, source, path):
        if "fb::Tanh" in source:
            source += "\n#error injected by test_reliability\n"
        return real(cxx, source, path)
    monkeypatch.setattr(cpu_compiler, "_compile", broken_for_tanh)

    def f(x, w):
        h = torch.tanh(x * 0.75 + 0.5)
        return torch.relu(h @ w) * 1.625 - 0.125
    args = (torch.randn(16, 32), torch.randn(32, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = fusebackend.explain(f, *args)
    msgs = _fuse_warnings(caught)
    assert len(msgs) == 1, msgs
    assert rep.num_kernels == 1, str(rep)
    assert len(rep.fallbacks) == 1 and "compile" in rep.fallbacks[0][1], rep.fallbacks
    assert "injected by test_reliability" in rep.fallbacks[0][1]     # the compiler's own message is kept
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert_matches(f, torch.compile(f, backend="fuse"), args)


def test_fallback_error_option_raises_instead(fresh_cache, monkeypatch):
    monkeypatch.setenv("CXX", "/bin/false")
    with pytest.raises(Exception, match="compile"):
        torch.compile(lambda x: _unique(x, 1.625), backend="fuse", options={"fallback": "error"})(torch.randn(8))


@pytest.mark.parametrize("cxx", ["/nonexistent/bin/g++", None])
def test_missing_compiler_warns_how_to_install_one(fresh_cache, monkeypatch, tmp_path, cxx):
    if cxx is None:
        monkeypatch.delenv("CXX", raising=False)
    else:
        monkeypatch.setenv("CXX", cxx)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    f = lambda x: _unique(x, 1.875)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_matches(f, torch.compile(f, backend="fuse"), (torch.randn(100),))
    msgs = _fuse_warnings(caught)
    assert len(msgs) == 1, msgs
    assert "apt-get install g++" in msgs[0], msgs[0]
    if cxx:
        assert cxx in msgs[0]


def test_unusable_cache_folder_warns_naming_the_variable(tmp_path, monkeypatch):
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    monkeypatch.setenv("FUSEBACKEND_CACHE_DIR", str(not_a_dir / "sub"))
    fusebackend.reset()
    f = lambda x: _unique(x, 2.125)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_matches(f, torch.compile(f, backend="fuse"), (torch.randn(64),))
    msgs = _fuse_warnings(caught)
    assert len(msgs) == 1 and "FUSEBACKEND_CACHE_DIR" in msgs[0], msgs
    fusebackend.reset()


# ---------------------------------------------------------------- the disk cache

def _entries(d):
    return sorted(glob.glob(os.path.join(str(d), "cpu", "*.so")))


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "bad_checksum", "no_checksum", "consistent_garbage"])
def test_corrupt_cache_entry_is_rebuilt_never_loaded(tmp_path, monkeypatch, damage):
    f = lambda x, y: torch.sigmoid(x * 0.5 + y) * 3.25 - torch.tanh(y)       # the kernel of this test
    args = (torch.randn(50, 7), torch.randn(7))
    good_dir, bad_dir = tmp_path / "good", tmp_path / "bad"
    # Build the entry in one folder, copy it to a second and damage it there: the damaged path was never
    # opened by this process before (dlopen would otherwise hand back the library already loaded).
    monkeypatch.setenv("FUSEBACKEND_CACHE_DIR", str(good_dir))
    fusebackend.reset()
    torch.compile(f, backend="fuse")(*args)
    (so,) = _entries(good_dir)
    good = open(so, "rb").read()
    (bad_dir / "cpu").mkdir(parents=True)
    target = str(bad_dir / "cpu" / os.path.basename(so))
    data = {"truncate": good[: len(good) // 3],
            "flip_byte": good[:4000] + bytes([good[4000] ^ 0xFF]) + good[4001:],
            "bad_checksum": good, "no_checksum": good,
            "consistent_garbage": b"\x7fELF not really a library" * 40}[damage]
    with open(target, "wb") as fh:
        fh.write(data)
    if damage == "bad_checksum":
        open(target + ".sha256", "w").write("0" * 64)
    elif damage != "no_checksum":
        want = data if damage == "consistent_garbage" else good
        open(target + ".sha256", "w").write(hashlib.sha256(want).hexdigest())

    loads, compiles = [], []
    real_cdll, real_compile = cpu_compiler.ctypes.CDLL, cpu_compiler._compile

    def spy_cdll(path, *a, **k):
        loads.append(open(path, "rb").read())
        return real_cdll(path, *a, **k)

    def spy_compile(*a):
        compiles.append(a[2])
        return real_compile(*a)
    monkeypatch.setattr(cpu_compiler.ctypes, "CDLL", spy_cdll)
    monkeypatch.setattr(cpu_compiler, "_compile", spy_compile)
    monkeypatch.setenv("FUSEBACKEND_CACHE_DIR", str(bad_dir))
    fusebackend.reset()
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_matches(f, torch.compile(f, backend="fuse"), args)
    assert not _fuse_warnings(caught)
    assert compiles == [target]                       # rebuilt, once
    assert cache.load_verified(target) is not None    # and intact on disk again
    # nothing that failed its checksum was ever handed to dlopen
    for blob in loads:
        assert blob == open(target, "rb").read() or (damage == "consistent_garbage" and blob == data)
    fusebackend.reset()


def test_checksum_is_verified_before_every_load():
    """store() writes the entry, then its checksum; load_verified() trusts only an entry matching it."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.so")
        cache.store(p, b"abc")
        assert cache.load_verified(p) == b"abc"
        open(p, "ab").write(b"d")
        assert cache.load_verified(p) is None
        open(p + ".sha256", "w").write("not hex at all \xff")
        assert cache.load_verified(p) is None
        os.unlink(p + ".sha256")
        assert cache.load_verified(p) is None


# ---------------------------------------------------------------- concurrency

_CHILD = textwrap.dedent('''
    import os, sys, time, hashlib
    import torch, fusebackend
    from fusebackend.runtime import cpu_compiler
    compiles = []
    real = cpu_compiler._compile
    def counting(cxx, source, path):
        compiles.append(path)
        return real(cxx, source, path)
    cpu_compiler._compile = counting
    barrier, me, other = sys.argv[1], sys.argv[2], sys.argv[3]
    open(os.path.join(barrier, me), "w").close()
    t0 = time.time()
    while not os.path.exists(os.path.join(barrier, other)) and time.time() - t0 < 60:
        time.sleep(0.005)
    def f(x, y, w):
        a = torch.sin(x * 1.0625) + y                        # pointwise kernel
        b = torch.softmax(a * 0.375, dim=-1)                 # row kernel
        c = (b @ w)                                          # ATen
        return torch.relu(c - 0.0625).sum(-1), b.amax(0)     # two more kernels
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(64, 40, generator=g), torch.randn(40, generator=g), torch.randn(40, 24, generator=g))
    out = torch.compile(f, backend="fuse")(*args)
    ref = f(*args)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
    print("COMPILES", len(compiles))
''')


def test_two_processes_filling_one_cache_at_once(tmp_path):
    cache_d, barrier = tmp_path / "cache", tmp_path / "barrier"
    barrier.mkdir()
    env = dict(os.environ, FUSEBACKEND_CACHE_DIR=str(cache_d), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(barrier), me, other], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for me, other in (("a", "b"), ("b", "a"))]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
        assert "fell back" not in err, err[-3000:]
    entries = _entries(cache_d)
    assert len(entries) >= 3
    for e in entries:                                  # every entry intact, no temporary files left over
        assert cache.load_verified(e) is not None, e
    assert not glob.glob(str(cache_d / "cpu" / ".tmp-*"))
    compiles = sum(int(out.split("COMPILES")[1]) for out, _ in results)
    assert compiles == len(entries), (compiles, entries)   # the lock: each kernel was built by one process


def _mixed_model(xs, w):
    h = [torch.relu(x * 2 + 1) for x in xs]                 # identical small kernels (a horizontal batch)
    s = torch.softmax(torch.cat(h, 0) @ w, dim=-1)
    return torch.nn.functional.layer_norm(s + 0.5, (s.shape[-1],)), h[0] - h[1]


@pytest.mark.parametrize("warm", [True, False])
def test_one_compiled_model_called_from_many_threads(warm):
    compiled = torch.compile(_mixed_model, backend="fuse")
    w = torch.randn(32, 48)

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(16, 32, generator=g) for _ in range(4)], w
    if warm:
        compiled(*inputs(0))
    errors, start = [], threading.Barrier(6)

    def worker(k):
        try:
            start.wait()
            for i in range(15):
                xs, ww = inputs(1000 * k + i)
                got, ref = compiled(xs, ww), _mixed_model(xs, ww)
                for a, b in zip(got, ref):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        except BaseException as e:      # noqa: B902 - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors[0]
