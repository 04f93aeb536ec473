"""The disk cache removes the temporary files of writers that died mid-write, and never a live writer's.

The writers are real processes: each loads runtime/cache.py on its own (stdlib only, no torch: fast), starts
`write_atomic` and hangs in its fsync; one is SIGKILLed there, the other stays alive while the cache is opened.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from fusebackend.runtime import cache

CACHE_PY = cache.__file__
WRITER = """
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("cache_under_test", sys.argv[1])
cache = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cache)
def hang(fd):
    print("writing", flush=True)
    time.sleep(120)
os.fsync = hang
cache.write_atomic(sys.argv[2], b"x" * 4096)
"""


@pytest.fixture
def root(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    (d / "cpu").mkdir(parents=True)
    monkeypatch.setattr(cache, "_swept", set())     # a fresh process: the first open sweeps
    return d


def start_writer(entry):
    p = subprocess.Popen([sys.executable, "-c", WRITER, CACHE_PY, str(entry)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    return p


def tmp_files(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith(cache.TMP_PREFIX))


def age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t))


def reopen(root):
    """Open the cache as a new process would (the sweep runs once per process)."""
    cache._swept.clear()
    assert cache.cache_dir(str(root)) == str(root)


def test_sigkilled_writer_leaves_a_tmp_file_the_next_open_removes_once_stale(root):
    entry = root / "cpu" / "k_abc.so"
    p = start_writer(entry)
    try:
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait()
        p.stdout.close()
    left = tmp_files(root / "cpu")
    assert len(left) == 1 and not entry.exists()
    assert cache._writer(left[0]) == (p.pid, cache._host())
    reopen(root)                                    # dead writer, but young: kept (the age threshold)
    assert tmp_files(root / "cpu") == left
    age(root / "cpu" / left[0], cache.STALE_AFTER_S + 60)
    reopen(root)
    assert tmp_files(root / "cpu") == []


def test_a_live_writers_tmp_file_is_never_removed(root):
    entry = root / "cpu" / "k_def.so"
    p = start_writer(entry)
    try:
        (name,) = tmp_files(root / "cpu")
        age(root / "cpu" / name, 10 * cache.STALE_AFTER_S)
        reopen(root)
        assert tmp_files(root / "cpu") == [name]    # old, but its writer is alive
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
    reopen(root)
    assert tmp_files(root / "cpu") == []


def test_names_without_a_pid_of_this_host_fall_back_to_age(root):
    dead = _dead_pid()
    legacy_young = root / "cpu" / ".tmp-k3j2_x9"
    legacy_old = root / ".tmp-q8w7e6r5"
    other_host = root / "cpu" / (".tmp-%d-00000000-abc" % dead)      # a pid of another machine means nothing
    this_host_young = root / "cpu" / (".tmp-%d-%s-abc" % (dead, cache._host()))
    entry, side = root / "cpu" / "k_1.so", root / "cpu" / "k_1.so.sha256"
    for f in (legacy_young, legacy_old, other_host, this_host_young, entry, side):
        f.write_bytes(b"x")
    age(legacy_young, 2 * 3600)
    age(legacy_old, cache.UNKNOWN_STALE_AFTER_S + 60)
    age(other_host, cache.STALE_AFTER_S + 60)
    age(entry, 10 * cache.UNKNOWN_STALE_AFTER_S)
    reopen(root)
    assert sorted(os.listdir(root / "cpu")) == sorted(f.name for f in (legacy_young, other_host, this_host_young,
                                                                       entry, side))
    assert not legacy_old.exists()


def test_the_sweep_runs_once_per_process_and_writes_carry_the_pid(root):
    reopen(root)
    stale = root / "cpu" / (".tmp-%d-%s-abc" % (_dead_pid(), cache._host()))
    stale.write_bytes(b"x")
    age(stale, cache.STALE_AFTER_S + 60)
    cache.cache_dir(str(root))                      # already swept in this process: no second scan
    assert stale.exists()
    cache.store(str(root / "cpu" / "k_2.so"), b"abc")
    assert cache.load_verified(str(root / "cpu" / "k_2.so")) == b"abc"
    assert tmp_files(root / "cpu") == [stale.name]  # a finished write leaves no temporary file
    assert cache._writer(cache._tmp_prefix() + "x") == (os.getpid(), cache._host())
    reopen(root)
    assert not stale.exists()


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid
