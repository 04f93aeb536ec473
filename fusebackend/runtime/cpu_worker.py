"""Host side of the hybrid MoE runtime: the CUDA seam the layer calls through, pinning in place, growable pinned
buffers, strided host->device copies, the staging pool for streamed experts and the CPU expert worker thread.

Everything CUDA-specific goes through `CudaApi`, so the layer's orchestration can be exercised on a CPU-only
machine with a stand-in (tests/test_hybrid_moe.py); the real one refuses to start without CUDA.
"""
from __future__ import annotations

import ctypes
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from ..graph.moe_grouped import fused_gate_up
from .pinning import PINS

_H2D = 1                       # cudaMemcpyHostToDevice


def expert_layout(buf, rows, hidden):
    """gate [rows, H], up [rows, H] (adjacent: one fused matmul), down [H, rows], packed from a flat buffer's
    start: the layout of resident experts and of staging slots."""
    n = rows * hidden
    return buf[:n].view(rows, hidden), buf[n:2 * n].view(rows, hidden), buf[2 * n:3 * n].view(hidden, rows)


def expert_ffn(x, gate, up, down, out=None):
    """SwiGLU expert down(silu(gate x) * up x) on x's device; gate/up [n, H], down [H, n] may be a block of the
    FFN rows (a split expert): the down-projections of row blocks add up to the whole."""
    gu = fused_gate_up(gate, up)
    if gu is not None:
        g, u = F.linear(x, gu).chunk(2, dim=-1)
    else:
        g, u = F.linear(x, gate), F.linear(x, up)
    a = F.silu(g) * u
    if out is None:
        return F.linear(a, down)
    return torch.mm(a, down.t(), out=out)


_MEMCPY2D = []


def _memcpy2d_fn():
    """cudaMemcpy2DAsync from the cudart torch loaded (same runtime, same context), else CuPy's."""
    if not _MEMCPY2D:
        fn = None
        try:
            with open("/proc/self/maps") as f:
                libs = sorted({ln.split()[-1] for ln in f if "libcudart" in ln and ".so" in ln})
        except OSError:
            libs = []
        for path in libs + ["libcudart.so"]:
            try:
                c = ctypes.CDLL(path).cudaMemcpy2DAsync
            except (OSError, AttributeError):
                continue
            c.restype, c.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                                   ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t,
                                                   ctypes.c_int, ctypes.c_void_p]
            fn = c
            break
        if fn is None:
            try:
                from cupy.cuda import runtime as cr
                fn = lambda *a: cr.memcpy2DAsync(*a) or 0    # noqa: E731 -- raises on error itself
            except ImportError:
                pass
        _MEMCPY2D.append(fn)
    return _MEMCPY2D[0]


class CudaApi:
    """The CUDA calls of the hybrid runtime. Raises RuntimeError naming CUDA where there is none."""
    simulated = False

    def __init__(self, device=None):
        if not torch.cuda.is_available():
            raise RuntimeError("HybridMoELayer needs CUDA: torch.cuda.is_available() is False (torch %s); "
                               "the pure scheduling helpers in fusebackend.runtime.hybrid_plan work without it"
                               % torch.__version__)
        self.device = torch.device(device if device is not None else "cuda")
        if self.device.type != "cuda":
            raise RuntimeError("HybridMoELayer needs a CUDA device, got %s" % self.device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())

    def current_stream(self):
        return torch.cuda.current_stream(self.device)

    def new_stream(self):
        return torch.cuda.Stream(self.device)

    def stream(self, s):
        return torch.cuda.stream(s)

    def event(self, timing=False):
        return torch.cuda.Event(enable_timing=timing)

    def empty(self, shape, dtype):
        return torch.empty(shape, dtype=dtype, device=self.device)

    def pinned(self, shape, dtype):
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def pin(self, t):
        return PINS.pin(t)

    def unpin(self, t):
        PINS.release(t)

    def record_stream(self, t, s):
        t.record_stream(s)

    def can_copy2d(self):
        return _memcpy2d_fn() is not None

    def copy2d(self, dst, src, stream):
        """dst (device, contiguous [rows, cols]) <- src (pinned host [rows, cols], row stride >= cols) as one
        cudaMemcpy2DAsync: torch's copy_ would gather a strided host source into pageable memory first."""
        assert dst.is_contiguous() and src.stride(1) == 1 and dst.shape == src.shape and dst.dtype == src.dtype
        es = dst.element_size()
        code = _memcpy2d_fn()(dst.data_ptr(), dst.stride(0) * es, src.data_ptr(), src.stride(0) * es,
                              dst.shape[1] * es, dst.shape[0], _H2D, stream.cuda_stream)
        if code:
            raise RuntimeError("cudaMemcpy2DAsync failed with CUDA error %d" % code)


class PinnedRows:
    """A pinned host buffer of [rows, *tail] that grows by doubling. A replaced buffer is freed by torch's host
    allocator only once the copies recorded on it have finished."""

    def __init__(self, api, tail, dtype):
        self.api, self.tail, self.dtype, self.buf = api, tuple(tail), dtype, None

    def get(self, rows):
        if self.buf is None or self.buf.shape[0] < rows:
            self.buf = self.api.pinned((max(rows, 2 * (0 if self.buf is None else self.buf.shape[0]), 8),)
                                       + self.tail, self.dtype)
        return self.buf[:rows]


class StagingSlots:
    """Bookkeeping of the device staging slots (pure): which weights each holds (a key and an FFN row range),
    least-recently-used replacement, hit/miss counts."""

    def __init__(self, n):
        self.keys, self.ranges, self.used = [None] * n, [None] * n, [0] * n
        self.clock, self.hits, self.misses = 0, 0, 0

    def find(self, key, f0, f1):
        for s, (k, r) in enumerate(zip(self.keys, self.ranges)):
            if k == key and r[0] <= f0 and f1 <= r[1]:
                return s
        return None

    def victim(self, protect=()):
        free = [s for s in range(len(self.keys)) if s not in protect]
        return min(free, key=lambda s: self.used[s]) if free else None

    def touch(self, s):
        self.clock += 1
        self.used[s] = self.clock

    def assign(self, s, key, f0, f1):
        self.keys[s], self.ranges[s] = key, (f0, f1)
        self.touch(s)


class StagingPool:
    """Device staging for streamed experts: `slots` buffers of one expert each, filled on a copy stream (the
    compute stream waits on a slot's `ready` event; the next fill waits on its `free` event). Share one pool
    between layers of the same shape: two experts' worth for the whole model, not per layer."""

    def __init__(self, api, hidden, ffn, dtype, slots=2, copy_stream=None):
        self.api, self.hidden, self.ffn, self.dtype = api, hidden, ffn, dtype
        self.bufs = [api.empty((3 * ffn * hidden,), dtype) for _ in range(slots)]
        self.book = StagingSlots(slots)
        self.ready, self.free = [None] * slots, [None] * slots
        self.stream = copy_stream if copy_stream is not None else api.new_stream()
        for b in self.bufs:              # freed with copies in flight, the blocks wait for the copy stream
            api.record_stream(b, self.stream)
        self.timing = False
        self.busy_until, self._last_copy = 0.0, None     # host clock when the queued copies should be done

    def note_copy(self, done_ev, expect_s):
        """A copy of expect_s seconds (the cost model's) was queued on the copy stream, done at done_ev."""
        now = time.perf_counter()
        self.busy_until, self._last_copy = max(now, self.busy_until) + expect_s, done_ev

    def backlog_s(self):
        """How long the copy stream is still busy with what is queued on it (FIFO: the newest copy ends last);
        0 once that copy's event has completed, else the host clock's distance to the expected end."""
        if self._last_copy is None or self._last_copy.query():
            self._last_copy = None
            return 0.0
        return max(0.0, self.busy_until - time.perf_counter())

    def nbytes(self):
        return sum(b.numel() * b.element_size() for b in self.bufs)

    def views(self, s, f0, f1):
        a, b = self.book.ranges[s]
        g, u, d = expert_layout(self.bufs[s], b - a, self.hidden)
        return g[f0 - a:f1 - a], u[f0 - a:f1 - a], d[:, f0 - a:f1 - a]

    def stage(self, key, host, f0, f1, protect=(), expect_s=0.0):
        """Start copying rows [f0, f1) of host (gate, up, down) into a slot unless one holds them: (slot, hit,
        (start, end) timing events or None); slot None when every slot is protected. expect_s: the copy's
        predicted time, for backlog_s()."""
        s = self.book.find(key, f0, f1)
        if s is not None:
            self.book.touch(s)
            self.book.hits += 1
            return s, True, None
        s = self.book.victim(protect)
        if s is None:
            return None, False, None
        api, st = self.api, self.stream
        with api.stream(st):
            if self.free[s] is not None:
                st.wait_event(self.free[s])
            t0 = api.event(self.timing)
            t0.record(st)
            g, u, d = expert_layout(self.bufs[s], f1 - f0, self.hidden)
            gh, uh, dh = host
            g.copy_(gh[f0:f1], non_blocking=True)
            u.copy_(uh[f0:f1], non_blocking=True)
            if f1 - f0 == dh.shape[1]:
                d.copy_(dh, non_blocking=True)
            else:
                api.copy2d(d, dh[:, f0:f1], st)
            ev = api.event(self.timing)
            ev.record(st)
        self.ready[s] = ev
        self.note_copy(ev, expect_s)
        self.book.assign(s, key, f0, f1)
        self.book.misses += 1
        return s, False, (t0, ev) if self.timing else None

    def acquire(self, s, stream):
        stream.wait_event(self.ready[s])

    def release(self, s, stream):
        ev = self.api.event()
        ev.record(stream)
        self.free[s] = ev


class StreamPipe:
    """One call's streamed items [(expert, f0, f1)] through a pool's slots: fills are issued while a slot is
    free (a slot this call still reads -- `protect`, or in flight -- is never refilled), each compute waits for
    its fill and frees its slot for the next one, so the copy of item i+1 overlaps the compute of item i."""

    def __init__(self, pool, items, host_of, protect, expect=None):
        self.pool, self.items, self.host_of, self.protect = pool, deque(items), host_of, protect
        self.expect = expect             # expect(f0, f1): a fill's predicted seconds (the pool's backlog)
        self.inflight, self.timings = deque(), []

    def issue(self):
        while self.items:
            e, f0, f1 = self.items[0]
            busy = self.protect | {s for *_, s in self.inflight}
            s, _, tev = self.pool.stage(*self.host_of(e), f0, f1, busy,
                                        self.expect(f0, f1) if self.expect is not None else 0.0)
            if s is None:
                return
            self.items.popleft()
            self.inflight.append((e, f0, f1, s))
            if tev:
                self.timings.append(tev)

    def drain(self, stream, compute):
        """compute(expert, f0, f1, gate, up, down) for every item, in order."""
        self.issue()
        while self.inflight:
            e, f0, f1, s = self.inflight.popleft()
            self.pool.acquire(s, stream)
            compute(e, f0, f1, *self.pool.views(s, f0, f1))
            self.pool.release(s, stream)
            self.issue()


def run_cpu_job(waits, x, out, segments):
    """The worker's job: wait for the gathered activations (and for the output buffer's previous copy to the
    GPU), then each segment (gate, up, down, row offset, rows) of x into out. Returns (wait s, compute s, the
    perf_counter when the job started: its wake-up after the submit is overhead the layer learns)."""
    t0 = time.perf_counter()
    for ev in waits:
        if ev is not None:
            ev.synchronize()            # an event wait releases the GIL; it never syncs the whole device
    t1 = time.perf_counter()
    for g, u, d, off, n in segments:
        expert_ffn(x[off:off + n], g, u, d, out=out[off:off + n])
    return t1 - t0, time.perf_counter() - t1, t0


_WORKER = []
_WORKER_LOCK = threading.Lock()


def default_worker():
    """One thread for CPU expert work, shared by every layer: jobs run in order and never oversubscribe the
    cores; torch's CPU kernels release the GIL, so the main thread keeps issuing GPU work meanwhile."""
    with _WORKER_LOCK:
        if not _WORKER:
            _WORKER.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuse-cpu-experts"))
        return _WORKER[0]
