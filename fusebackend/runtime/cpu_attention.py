"""Decode attention on CPU tensors through the fused C++ kernel of emit/cpu_attention.py.

    decode_attention(q, k, v, scale=None, lengths=None, causal=False) -> out          like SDPA (enable_gqa)
    decode_attention_partial(q, k, v, start, stop, scale=None, lengths=None, causal=False) -> (out, lse)

q [B, Hq, Lq, D] (Lq 1..8), k / v [B, Hkv, T, D] with any strides (a slice of a larger cache is read in
place), Hq a multiple of Hkv (q head i uses kv head i // (Hq / Hkv), as SDPA's enable_gqa), bfloat16, float16
or float32 (one dtype for all three), float32 accumulation. `lengths`: int [B] valid positions per sequence
(positions >= lengths[b] are not attended). The partial result covers positions [start, stop): float32 out
normalised over that range and float32 lse [B, Hq, Lq] (natural log of its softmax denominator); partials of
disjoint ranges merge by merge_partials(). Kernels are compiled by runtime/cpu_compiler.py (disk cache) once
per (dtype, D, q heads per kv head, Lq, inner stride) and called through ctypes, which releases the GIL.
"""
from __future__ import annotations

import ctypes
import functools
import math
import threading

import torch

from ..emit.cpu_attention import MAX_LQ, NMETA, DTYPES, check_config, emit_decode_attention
from ..emit.errors import EmitError
from . import cpu_compiler

MIN_CHUNK = 256          # positions per work item at least (one item's setup: q rows, workspace, merge)
ITEMS_PER_THREAD = 16    # aim: this many items per thread: the dynamic schedule's last wave is short (H200: 4 ->
                         # 16 items per thread took 537 MB from 77 to 81-84 GB/s)

_P = ctypes.c_void_p
_lock = threading.Lock()
_kernels: dict = {}


class AttentionShapeError(ValueError):
    """The inputs are outside what the CPU decode-attention kernel handles; the message names what."""


@functools.lru_cache(maxsize=None)
def _source(dtype, head_dim, group, lq, unit_stride):
    return emit_decode_attention(dtype, head_dim, group, lq, unit_stride)


class _Kernel:
    def __init__(self, src, cache_dir=None):
        lib = cpu_compiler.build(src.source, src.full_name, cache_dir)
        self.src = src
        self.full = getattr(lib, src.full_name)
        self.full.argtypes = [_P, _P, _P, _P, _P, _P, _P, ctypes.c_float]
        self.full.restype = None
        self.partial = getattr(lib, src.partial_name)
        self.partial.argtypes = [_P, _P, _P, _P, _P, _P, _P, _P, ctypes.c_float]
        self.partial.restype = None
        self.lib = lib


def kernel_for(dtype, head_dim, group, lq, unit_stride=True, cache_dir=None) -> _Kernel:
    key = (dtype, head_dim, group, lq, unit_stride, cache_dir)
    k = _kernels.get(key)
    if k is None:
        k = _Kernel(_source(dtype, head_dim, group, lq, unit_stride), cache_dir)
        with _lock:
            k = _kernels.setdefault(key, k)
    return k


def _fail(msg):
    raise AttentionShapeError("decode_attention: " + msg)


def check_inputs(q, k, v, lengths=None, q_anywhere=False):
    """(B, Hq, Lq, D, Hkv, T) after checking everything the kernel assumes; AttentionShapeError otherwise.
    q_anywhere: q may be on another device (split attention copies it to the host itself)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            _fail("%s must be a tensor, got %s" % (name, type(t).__name__))
        if t.device.type != "cpu" and not (q_anywhere and name == "q"):
            _fail("%s is on %s; the kernel reads CPU tensors" % (name, t.device))
        if t.dim() != 4:
            _fail("%s must be 4-d ([B, H, L, D]), got shape %s" % (name, tuple(t.shape)))
        if t.dtype not in DTYPES:
            _fail("%s has dtype %s; supported: bfloat16, float16, float32" % (name, t.dtype))
        if t.requires_grad and torch.is_grad_enabled():
            _fail("%s requires grad; the kernel computes no gradient (use torch.no_grad())" % name)
    if not (q.dtype == k.dtype == v.dtype):
        _fail("q, k and v must share a dtype, got %s, %s, %s" % (q.dtype, k.dtype, v.dtype))
    B, Hq, Lq, D = q.shape
    if k.shape != v.shape:
        _fail("k and v must have the same shape, got %s and %s" % (tuple(k.shape), tuple(v.shape)))
    Bk, Hkv, T, Dk = k.shape
    if Bk != B:
        _fail("batch of q (%d) and k/v (%d) differ" % (B, Bk))
    if Dk != D:
        _fail("head dim of q (%d) and k/v (%d) differ (this kernel has one D for q, k and v)" % (D, Dk))
    if Hkv == 0 or Hq % Hkv:
        _fail("q heads (%d) must be a multiple of kv heads (%d)" % (Hq, Hkv))
    if not 1 <= Lq <= MAX_LQ:
        _fail("q has %d positions per sequence; the decode kernel takes 1..%d (use SDPA for prefill)"
              % (Lq, MAX_LQ))
    try:
        check_config(q.dtype, D, Hq // Hkv, Lq)
    except EmitError as e:
        _fail(str(e).split(": ", 1)[-1])
    for name, t in (("q", q), ("k", k), ("v", v)):
        if any(s < 0 for s in t.stride()):
            _fail("%s has a negative stride %s" % (name, t.stride()))
    if lengths is not None:
        if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.numel() != B:
            _fail("lengths must be a 1-d tensor of %d valid lengths, got %r" % (B, getattr(lengths, "shape", lengths)))
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            _fail("lengths must be an integer tensor, got %s" % lengths.dtype)
    return B, Hq, Lq, D, Hkv, T


def _lengths(lengths, T):
    if lengths is None:
        return None
    ln = lengths.to(device="cpu", dtype=torch.int64).contiguous()
    if ln.numel() and (int(ln.min()) < 0 or int(ln.max()) > T):
        _fail("lengths must lie in [0, %d] (the context T), got %s" % (T, ln.tolist()))
    return ln


def plan_chunks(B, Hkv, ctx, threads, items_per_thread=None):
    """(chunk, nchunks): positions per work item and items per (batch, kv head), so that items outnumber
    threads ITEMS_PER_THREAD times over without going below MIN_CHUNK positions (multiples of the tile)."""
    if ctx <= 0:
        return 64, 1
    ipt = ITEMS_PER_THREAD if items_per_thread is None else items_per_thread
    want = -(-ipt * max(1, threads) // max(1, B * Hkv))
    most = max(1, -(-ctx // MIN_CHUNK))
    n = max(1, min(want, most))
    chunk = -(-ctx // n)
    chunk = -(-chunk // 64) * 64
    return chunk, -(-ctx // chunk)


def _meta(B, Hkv, T, start, stop, chunk, nchunks, threads, causal, q, k, v, out, lse_strides):
    m = [B, Hkv, T, start, stop, chunk, nchunks, threads, int(bool(causal)),
         *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse_strides]
    assert len(m) == NMETA
    return (ctypes.c_int64 * NMETA)(*m)


def _scale(scale, D):
    s = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not math.isfinite(s):
        _fail("scale must be finite, got %r" % (scale,))
    return s


def _prepare(q, k, v, lengths, threads, cache_dir):
    B, Hq, Lq, D, Hkv, T = check_inputs(q, k, v, lengths)
    unit = (k.stride(3) == 1 or D == 1) and (v.stride(3) == 1 or D == 1)
    kern = kernel_for(q.dtype, D, Hq // Hkv, Lq, unit, cache_dir)
    threads = torch.get_num_threads() if threads is None else int(threads)
    if threads < 1:
        _fail("threads must be >= 1, got %d" % threads)
    return B, Hq, Lq, D, Hkv, T, kern, threads, _lengths(lengths, T)


def decode_attention(q, k, v, scale=None, lengths=None, causal=False, threads=None, cache_dir=None):
    """softmax(q k^T * scale) v over the valid positions, in q's dtype, [B, Hq, Lq, D] contiguous."""
    B, Hq, Lq, D, Hkv, T, kern, threads, ln = _prepare(q, k, v, lengths, threads, cache_dir)
    s = _scale(scale, D)
    out = torch.empty((B, Hq, Lq, D), dtype=q.dtype)
    if out.numel() == 0:
        return out
    chunk, nchunks = plan_chunks(B, Hkv, T if ln is None else int(ln.max()), threads)
    ws = torch.empty(B * Hkv * nchunks * kern.src.ws_floats_per_item, dtype=torch.float32)
    meta = _meta(B, Hkv, T, 0, T, chunk, nchunks, threads, causal, q, k, v, out, (0, 0, 0))
    kern.full(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), ln.data_ptr() if ln is not None else None,
              ws.data_ptr(), meta, s)
    return out


def decode_attention_partial(q, k, v, start, stop, scale=None, lengths=None, causal=False, threads=None,
                             cache_dir=None, out=None, lse=None):
    """Attention over context positions [start, stop) only (and below lengths[b]): (out float32 [B, Hq, Lq, D]
    normalised over that range, lse float32 [B, Hq, Lq]). A row that attends nothing: out 0, lse -inf.
    out / lse: optional float32 tensors of those shapes to write into (any strides)."""
    B, Hq, Lq, D, Hkv, T, kern, threads, ln = _prepare(q, k, v, lengths, threads, cache_dir)
    s = _scale(scale, D)
    start, stop = int(start), int(stop)
    if not 0 <= start <= stop <= T:
        _fail("the range [start, stop) = [%d, %d) must lie within [0, %d]" % (start, stop, T))
    out = _target(out, (B, Hq, Lq, D), "out")
    lse = _target(lse, (B, Hq, Lq), "lse")
    if out.numel() == 0:
        return out, lse
    hi = stop if ln is None else max(start, min(stop, int(ln.max())))
    chunk, nchunks = plan_chunks(B, Hkv, hi - start, threads)
    ws = torch.empty(B * Hkv * nchunks * kern.src.ws_floats_per_item, dtype=torch.float32)
    meta = _meta(B, Hkv, T, start, stop, chunk, nchunks, threads, causal, q, k, v, out, lse.stride())
    kern.partial(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
                 ln.data_ptr() if ln is not None else None, ws.data_ptr(), meta, s)
    return out, lse


def _target(t, shape, name):
    if t is None:
        return torch.empty(shape, dtype=torch.float32)
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.device.type != "cpu" \
            or tuple(t.shape) != shape:
        _fail("%s must be a float32 CPU tensor of shape %s" % (name, shape))
    return t


def merge_partials(parts, dtype=None, empty_rows=True):
    """Merge [(out, lse), ...] of disjoint context ranges (any device, one for all), pairwise: with w =
    sigmoid(lse_a - lse_b) = e^lse_a / (e^lse_a + e^lse_b), out = lerp(out_b, out_a, w) and lse = logaddexp
    (five small ops per pair: the merge sits on the critical path of a split call). Returns (out float32, lse),
    or out cast to `dtype` if given (then lse is dropped). Rows that attended nothing in any part come out 0
    (lse -inf); empty_rows=False (no row can be empty in two parts: no per-batch lengths) saves one op per pair."""
    if not parts:
        raise ValueError("merge_partials: no partial results")
    out, lse = parts[0][0].float(), parts[0][1].float()
    for i, (o, l) in enumerate(parts[1:]):
        l = l.float()
        w = torch.sigmoid(lse - l)
        if empty_rows:
            w = torch.nan_to_num(w, nan=0.0)                        # nan: both parts empty (their outs are 0)
        out = torch.lerp(o.float(), out, w.unsqueeze(-1))
        if dtype is None or i < len(parts) - 2:
            lse = torch.logaddexp(lse, l)
    return out.to(dtype) if dtype is not None else (out, lse)
