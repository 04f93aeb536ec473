"""The program cache (runtime/program_cache.py): a warm start rebuilds a compiled graph's Program from disk
without lowering, passes or emission, and gives eager's results; anything that changed misses, anything
corrupt recompiles."""
import json
import os
import re
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

import fusebackend
from fusebackend import FuseOptions, OptionError
from fusebackend.capture import backend, kernels
from fusebackend.runtime import cache, cpu_compiler, program_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh disk cache with the program cache on (conftest turns it off for every other test)."""
    monkeypatch.setenv("FUSEBACKEND_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FUSEBACKEND_PROGRAM_CACHE", "1")
    return tmp_path


def _block(x, w, b):
    h = torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b)
    return torch.nn.functional.gelu(h) * torch.sigmoid(x) + 0.5


def _inputs(seed, rows=8, cols=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(dtype) for s in ((rows, cols), (cols,), (cols,))]


def _compile_and_run(fn, args, options=None, dynamic=False):
    """A fresh compile (Dynamo and in-memory kernels forgotten), the call's output and the cache counters
    it moved."""
    torch._dynamo.reset()
    fusebackend.reset()
    before = dict(program_cache.stats)
    compiled = torch.compile(fn, backend="fuse", options=options, dynamic=dynamic)
    with torch.no_grad():
        out = compiled(*args)
    return out, {k: program_cache.stats[k] - before[k] for k in before}


def _assert_matches_eager(fn, out, args):
    ref = fn(*args)
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err <= 1e-5, "relative error %g" % err


def _entries(root):
    return sorted(p for p in os.listdir(os.path.join(root, "programs")) if p.endswith(".json.z"))


def test_warm_start_skips_lowering_passes_and_emission(cache_dir, monkeypatch):
    _, moved = _compile_and_run(_block, _inputs(0))
    assert moved["stores"] == 1 and moved["hits"] == 0

    def refuse(*a, **k):
        raise AssertionError("a warm start must not run this stage")
    for mod, name in ((backend, "lower"), (backend, "plan_groups"), (kernels, "emit_kernel"),
                      (cpu_compiler, "_compile")):      # kernels come from the kernel cache
        monkeypatch.setattr(mod, name, refuse)
    args = _inputs(1)                               # fresh random inputs, not the ones it compiled for
    out, moved = _compile_and_run(_block, args)
    assert moved["hits"] == 1 and moved["misses"] == 0 and moved["stores"] == 0
    _assert_matches_eager(_block, out, args)


def test_training_forward_and_backward_graphs_hit(cache_dir, monkeypatch):
    def train_step(seed):
        x, w, b = [t.requires_grad_() for t in _inputs(seed)]
        torch._dynamo.reset()
        fusebackend.reset()
        torch.compile(_block, backend="fuse")(x, w, b).pow(2).mean().backward()
        xe, we, be = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        _block(xe, we, be).pow(2).mean().backward()
        for got, want in ((x, xe), (w, we), (b, be)):
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6)
    train_step(0)
    monkeypatch.setattr(backend, "lower", lambda gm: pytest.fail("a warm start lowered a graph"))
    before = dict(program_cache.stats)
    train_step(1)
    assert program_cache.stats["hits"] - before["hits"] == 2        # the forward and the backward graph


def test_second_process_hits_and_matches_eager(cache_dir):
    script = textwrap.dedent("""
        import json, sys, torch
        sys.path.insert(0, %r)
        import models
        from fusebackend.runtime import program_cache
        # the key holds a hash of the package's source: pinned, so an edit elsewhere in the tree while this test
        # runs does not make the second process a miss
        program_cache.package_digest = lambda: "pinned"
        entry = models.get("llama_layer")
        model, example = entry.make(size="small", seed=0)
        fresh = entry.make_inputs(size="small", seed=int(sys.argv[1]))
        with torch.no_grad():
            compiled = torch.compile(model, backend="fuse")
            compiled(*example)
            out, ref = compiled(*fresh), model(*fresh)
        err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        print("RESULT " + json.dumps(dict(program_cache.stats, err=err)))
    """ % ROOT)

    def run(seed):
        res = subprocess.run([sys.executable, "-c", script, str(seed)], capture_output=True, text=True,
                             env=dict(os.environ), cwd=ROOT, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(next(l for l in res.stdout.splitlines() if l.startswith("RESULT "))[7:])
    cold, warm = run(1), run(2)
    assert cold["stores"] >= 1 and cold["hits"] == 0 and cold["err"] <= 1e-5
    assert warm["hits"] == cold["stores"] and warm["misses"] == 0 and warm["stores"] == 0
    assert warm["err"] <= 1e-5


@pytest.mark.parametrize("change", ["graph", "shape", "dtype", "option"])
def test_a_changed_graph_shape_dtype_or_option_misses(cache_dir, change):
    _compile_and_run(_block, _inputs(0))
    fn, args, options = _block, _inputs(1), None
    if change == "graph":
        fn = lambda x, w, b: _block(x, w, b) * 2.0      # noqa: E731
    elif change == "shape":
        args = _inputs(1, rows=12)
    elif change == "dtype":
        args = _inputs(1, dtype=torch.float64)
    else:
        options = {"max_group_nodes": 3}
    out, moved = _compile_and_run(fn, args, options)
    assert moved["misses"] == 1 and moved["hits"] == 0 and moved["stores"] == 1
    _assert_matches_eager(fn, out, args)
    assert len(_entries(cache_dir)) == 2
    _, moved = _compile_and_run(fn, args, options)   # and the new entry serves the next start
    assert moved["hits"] == 1


def _rewrite(path, edit):
    """Edit an entry's JSON and store it with a matching checksum (the checksum alone cannot catch it)."""
    data = json.loads(zlib.decompress(open(path, "rb").read()))
    cache.store(path, zlib.compress(json.dumps(edit(data)).encode()))


def _replace_first_op(data, replacement):
    text, n = re.subn(r'\["op", "aten::\w+\.\w+"\]', replacement, json.dumps(data), count=1)
    assert n == 1
    return json.loads(text)


CORRUPTIONS = {
    "bytes": lambda p: open(p, "r+b").write(b"\x00garbage"),          # fails the checksum
    "not_json": lambda p: cache.store(p, zlib.compress(b"{not json")),
    "unknown_op": lambda p: _rewrite(p, lambda d: _replace_first_op(d, '["op", "aten::no_such_op.default"]')),
    "names_eval": lambda p: _rewrite(p, lambda d: _replace_first_op(d, '["fn", "builtins", "eval"]')),
    "missing_node": lambda p: _rewrite(p, lambda d: dict(d, graph=dict(d["graph"], nodes=d["graph"]["nodes"][:2]))),
    "other_key": lambda p: _rewrite(p, lambda d: dict(d, key="0" * 32)),
    "truncated": lambda p: open(p, "r+b").truncate(10),
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_a_corrupt_entry_recompiles_and_is_replaced(cache_dir, how):
    _compile_and_run(_block, _inputs(0))
    (name,) = _entries(cache_dir)
    CORRUPTIONS[how](os.path.join(cache_dir, "programs", name))
    args = _inputs(1)
    out, moved = _compile_and_run(_block, args)
    assert moved["misses"] == 1 and moved["hits"] == 0 and moved["stores"] == 1
    _assert_matches_eager(_block, out, args)
    out, moved = _compile_and_run(_block, args)
    assert moved["hits"] == 1
    _assert_matches_eager(_block, out, args)


def _with_constant(x):
    return torch.where(x > 0, x, torch.tensor(-0.25)) + torch.tensor([1.0, 2.0, 3.0, 4.0])


def test_symbolic_sizes_and_tensor_constants_hit(cache_dir):
    _compile_and_run(_with_constant, [torch.randn(6, 4)], dynamic=True)
    for rows in (5, 9):
        args = [torch.randn(rows, 4)]
        out, moved = _compile_and_run(_with_constant, args, dynamic=True)
        assert moved["hits"] == 1 and moved["misses"] == 0
        _assert_matches_eager(_with_constant, out, args)


def test_a_kernel_that_failed_to_build_is_not_cached(cache_dir, monkeypatch):
    def broken(*a, **k):
        raise cpu_compiler.CompileFailed("C++ compile failed:\nerror: injected")
    monkeypatch.setattr(cpu_compiler, "_compile", broken)
    args = _inputs(0)
    out, moved = _compile_and_run(_block, args)    # the groups run as ATen (one warning each)
    _assert_matches_eager(_block, out, args)
    assert moved["stores"] == 0


def test_round_trip_is_faithful(cache_dir, monkeypatch):
    """The decoded state encodes to the same entry: nothing is lost or changed on the way through disk."""
    import models
    seen = []
    real = program_cache.encode

    def spy(k, gm, *rest):
        entry = real(k, gm, *rest)
        seen.append((gm, entry))
        return entry
    monkeypatch.setattr(program_cache, "encode", spy)
    model, args = models.get("gpt2_block").make(size="small")
    _compile_and_run(model, args)
    _compile_and_run(_with_constant, [torch.randn(6, 4)], dynamic=True)
    assert len(seen) == 2
    for gm, entry in seen:
        entry = json.loads(json.dumps(entry))          # as it comes back from disk
        warm = program_cache._decode(entry, gm)
        again = real(entry["key"], gm, warm.fg, warm.groups, warm.batches, warm.specs,
                     dict.fromkeys(warm.specs), warm.fallbacks)
        assert json.loads(json.dumps(again)) == entry


def test_off_by_option_or_environment(cache_dir, monkeypatch):
    _, moved = _compile_and_run(_block, _inputs(0), options={"program_cache": False})
    assert moved == dict.fromkeys(moved, 0)
    monkeypatch.setenv("FUSEBACKEND_PROGRAM_CACHE", "0")
    _, moved = _compile_and_run(_block, _inputs(0))
    assert moved == dict.fromkeys(moved, 0)
    _, moved = _compile_and_run(_block, _inputs(0), options={"program_cache": True})   # the option wins
    assert moved["stores"] == 1
    assert not program_cache.enabled(FuseOptions(gpu_memory_budget="50%", program_cache=True))


def test_option_is_validated():
    with pytest.raises(OptionError, match="program_cache"):
        FuseOptions.from_dict({"program_cache": "yes"})
