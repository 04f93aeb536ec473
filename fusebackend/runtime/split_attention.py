"""Split-context decode attention: part of the K/V cache attended on the CPU, the rest on the GPU, merged by
log-sum-exp.

    sa = SplitAttention()
    out = sa(q, k_host, v_host, split, k_dev=None, v_dev=None, scale=None, lengths=None, causal=False)

Context positions [0, T) of a host cache k_host / v_host [B, Hkv, T, D] (any strides; pin it for fast
streaming) are cut in three:
  [0, split)            the fused CPU kernel (runtime/cpu_attention.py) on a worker thread: the ctypes call
                        releases the GIL, so the main thread meanwhile queues the GPU side;
  [split, T - Tdev)     streamed to the GPU (one cudaMemcpy2DAsync per tensor where the layout allows) and
                        attended there;
  [T - Tdev, T)         k_dev / v_dev [B, Hkv, Tdev, D], already on the GPU (optional).
Each part returns (out float32, lse float32); the merge runs on q's device. q on the CPU runs the "GPU" parts on
the CPU with the same code (tests check the merge without a GPU). The split point that makes both sides finish
together is passes/cost_attention.py's choose_split (see split_for()).

GPU partials: flash attention (bf16 / f16) or memory-efficient attention (f32) with the query rows of one kv
head folded into its query length (GQA without expanding K/V), which return the log-sum-exp; with per-batch
lengths or causal rows, a float32 matmul-softmax (the kernels take no such mask).
"""
from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor

import torch

from ..passes.cost_attention import choose_split
from .cpu_attention import AttentionShapeError, check_inputs, decode_attention_partial, merge_partials


def _fail(msg):
    raise AttentionShapeError("split attention: " + msg)


def _fold(q, hkv):
    """q [B, Hq, Lq, D] -> [B, Hkv, R * Lq, D]: the query rows that share a kv head, row r = head_in_group * Lq + i."""
    B, Hq, Lq, D = q.shape
    return q.reshape(B, hkv, (Hq // hkv) * Lq, D)


def _unfold(x, Hq, Lq):
    B, hkv = x.shape[:2]
    return x.reshape(B, Hq, Lq, *x.shape[3:])


def attention_partial(q, k, v, scale, offset=0, lengths=None, causal=False, force_matmul=False):
    """(out float32 [B, Hq, Lq, D], lse float32 [B, Hq, Lq]) of q over k / v [B, Hkv, n, D] on their device,
    which hold context positions [offset, offset + n). lengths: valid positions per batch (global positions);
    causal: row i of Lq sees positions < length - Lq + 1 + i. Rows that attend nothing: out 0, lse -inf."""
    B, Hq, Lq, D = q.shape
    hkv, n = k.shape[1], k.shape[2]
    if n == 0:
        return (torch.zeros(B, Hq, Lq, D, dtype=torch.float32, device=q.device),
                torch.full((B, Hq, Lq), -math.inf, dtype=torch.float32, device=q.device))
    qf = _fold(q, hkv)
    if q.is_cuda and lengths is None and not causal and not force_matmul:
        res = _fused_partial(qf, k, v, scale)
        if res is not None:
            o, lse = res
            return _unfold(o.float(), Hq, Lq), _unfold(lse.float(), Hq, Lq)
    s = torch.matmul(qf.float() * scale, k.float().transpose(-1, -2))            # [B, Hkv, R*Lq, n]
    if lengths is not None or causal:
        pos = torch.arange(offset, offset + n, device=q.device)
        ln = (torch.full((B,), offset + n, device=q.device, dtype=torch.int64) if lengths is None
              else lengths.to(device=q.device, dtype=torch.int64))
        lim = ln.view(B, 1, 1, 1).expand(B, 1, s.shape[2], 1)
        if causal:
            i = torch.arange(s.shape[2], device=q.device) % Lq
            lim = lim - Lq + 1 + i.view(1, 1, -1, 1)
        s = s.masked_fill(pos.view(1, 1, 1, n) >= lim, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    o = torch.matmul(torch.exp(s - safe.unsqueeze(-1)), v.float())
    return _unfold(o, Hq, Lq), _unfold(lse, Hq, Lq)


_FUSED_OK = {}


def _fused_partial(qf, k, v, scale):
    """Flash / memory-efficient attention with its log-sum-exp, or None where neither takes these inputs."""
    key = (qf.dtype, qf.shape[-1], qf.device)
    if _FUSED_OK.get(key) is False:
        return None
    try:
        if qf.dtype in (torch.bfloat16, torch.float16):
            r = torch.ops.aten._scaled_dot_product_flash_attention(qf, k, v, 0.0, False, False, scale=scale)
            o, lse = r[0], r[1]
        else:
            r = torch.ops.aten._scaled_dot_product_efficient_attention(qf, k, v, None, True, 0.0, False,
                                                                       scale=scale)
            o, lse = r[0], r[1][..., :qf.shape[2]]
        _FUSED_OK[key] = True
        return o, lse
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, NotImplementedError):        # this build / card / shape has no such kernel
        _FUSED_OK[key] = False
        return None


class SplitAttention:
    """Split-context attention with one CPU worker thread (its OpenMP team stays warm between calls) and reusable
    device staging for the streamed part (copies and kernels on the current stream, so a call's copy waits for the
    last call's reads of the staging). Not for concurrent calls from several threads."""

    def __init__(self, threads=None, executor=None, inline_cpu=False):
        """threads: the CPU kernel's OpenMP threads (default torch.get_num_threads() at each call).
        inline_cpu: run the CPU part on the calling thread after the GPU side is queued (its copies and kernels
        are asynchronous) instead of on the worker thread: one thread handoff less per call."""
        self.threads = threads
        self.inline_cpu = inline_cpu
        self._own_pool = executor is None
        self.pool = executor or ThreadPoolExecutor(1, thread_name_prefix="fb-cpu-attention")
        self._staging = {}
        self._pinned = {}
        self.last = {}                  # what the last call did: parts, gpu path

    def close(self):
        if self._own_pool:
            self.pool.shutdown(wait=True)

    def __call__(self, q, k_host, v_host, split, k_dev=None, v_dev=None, scale=None, lengths=None, causal=False,
                 threads=None):
        B, Hq, Lq, D, Hkv, T = check_inputs(q, k_host, v_host, lengths, q_anywhere=True)
        dev = q.device
        tdev = 0
        if k_dev is not None or v_dev is not None:
            if k_dev is None or v_dev is None:
                _fail("give both k_dev and v_dev, or neither")
            if k_dev.shape != v_dev.shape or k_dev.dim() != 4 or tuple(k_dev.shape[:2]) != (B, Hkv) \
                    or k_dev.shape[3] != D:
                _fail("k_dev / v_dev must be [B, Hkv, Tdev, D] = [%d, %d, *, %d], got %s and %s"
                      % (B, Hkv, D, tuple(k_dev.shape), tuple(v_dev.shape)))
            if k_dev.device != dev or v_dev.device != dev:
                _fail("k_dev / v_dev must be on q's device %s, got %s / %s" % (dev, k_dev.device, v_dev.device))
            if k_dev.dtype != q.dtype or v_dev.dtype != q.dtype:
                _fail("k_dev / v_dev must have q's dtype %s" % q.dtype)
            tdev = k_dev.shape[2]
            if tdev > T:
                _fail("k_dev holds %d positions, more than the context T = %d" % (tdev, T))
        split = int(split)
        if not 0 <= split <= T - tdev:
            _fail("split %d must lie in [0, T - Tdev] = [0, %d]" % (split, T - tdev))
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        threads = int(threads or self.threads or torch.get_num_threads())
        ln_host = None if lengths is None else lengths.to(device="cpu", dtype=torch.int64)
        if ln_host is not None and ln_host.numel() and (int(ln_host.min()) < 0 or int(ln_host.max()) > T):
            _fail("lengths must lie in [0, %d] (the context T), got %s" % (T, ln_host.tolist()))

        parts, fut, job = [], None, None
        if split > 0:
            q_host = q.to("cpu") if dev.type != "cpu" else q           # waits for the producer of q
            out_c = lse_c = None                                       # on the CPU: fresh tensors (returned)
            if dev.type == "cuda":
                out_c, lse_c, ev = self._pinned_out((B, Hq, Lq, D), dev)
                if ev is not None:
                    ev.synchronize()                                   # the last call's copy out of them is done
            job = functools.partial(decode_attention_partial, q_host, k_host, v_host, 0, split, scale, ln_host,
                                    causal, threads, None, out_c, lse_c)
            if not self.inline_cpu:
                fut = self.pool.submit(job)
        try:
            lens_dev = None if lengths is None else lengths.to(device=dev, dtype=torch.int64)
            n_str = T - tdev - split
            if n_str > 0:
                ks, vs = self._stream(k_host, v_host, split, split + n_str, dev)
                parts.append(attention_partial(q, ks, vs, scale, split, lens_dev, causal))
            if tdev > 0:
                parts.append(attention_partial(q, k_dev, v_dev, scale, T - tdev, lens_dev, causal))
        finally:
            cpu_part = fut.result() if fut is not None else None
        if job is not None and fut is None:
            cpu_part = job()
        if cpu_part is not None:
            o, l = cpu_part
            if dev.type != "cpu":
                o, l = o.to(dev, non_blocking=True), l.to(dev, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record()
                self._pinned[((B, Hq, Lq, D), dev)][2] = ev
            parts.insert(0, (o, l))
        self.last = {"cpu": split, "streamed": T - tdev - split, "resident": tdev,
                     "gpu_path": "fused" if _FUSED_OK.get((q.dtype, D, dev)) else "matmul"}
        if not parts:
            return torch.zeros_like(q)
        if len(parts) == 1:
            return parts[0][0].to(q.dtype)
        return merge_partials(parts, q.dtype, empty_rows=lengths is not None)

    def _pinned_out(self, shape, dev):
        """Pinned host buffers the CPU partial is written to (its copies to the GPU are non-blocking), one pair per
        q shape, with the event of their last copy out."""
        key = (shape, dev)
        ent = self._pinned.get(key)
        if ent is None:
            ent = [torch.empty(shape, dtype=torch.float32, pin_memory=True),
                   torch.empty(shape[:3], dtype=torch.float32, pin_memory=True), None]
            self._pinned[key] = ent
        return ent[0], ent[1], ent[2]

    def _stream(self, k_host, v_host, lo, hi, dev):
        """K / V positions [lo, hi) on `dev`: views of the host tensors when dev is the CPU, else device copies."""
        if dev.type == "cpu":
            return k_host[:, :, lo:hi], v_host[:, :, lo:hi]
        out = []
        for name, src in (("k", k_host), ("v", v_host)):
            view = src[:, :, lo:hi]
            key = (name, view.dtype, dev)
            buf, n = self._staging.get(key), view.numel()
            if buf is None or buf.numel() < n:          # one buffer per tensor, grown by a quarter when short: a
                buf = torch.empty(n + n // 4, dtype=view.dtype, device=dev)   # growing context reuses it
                self._staging[key] = buf
            dst = buf[:n].view(view.shape)
            _copy_h2d(dst, view)
            out.append(dst)
        return out[0], out[1]


def _copy_h2d(dst, src):
    """dst (device, contiguous [B, H, n, D]) <- src (host view): one cudaMemcpy2DAsync when each (b, h) slice is
    one contiguous run and the (b, h) runs are evenly spaced; torch's copy_ otherwise."""
    B, H, n, D = src.shape
    sb, sh, st, sd = src.stride()
    rows, cols = B * H, n * D
    pitch = cols if rows == 1 else (sh if H > 1 else sb)
    if (sd == 1 or D == 1) and (st == D or n == 1) and (sb == H * sh or B == 1 or H == 1) and pitch >= cols \
            and src.is_pinned():
        from .cpu_worker import _H2D, _memcpy2d_fn
        fn = _memcpy2d_fn()
        if fn is not None:
            es = src.element_size()
            code = fn(dst.data_ptr(), cols * es, src.data_ptr(), pitch * es, cols * es, rows, _H2D,
                      torch.cuda.current_stream(dst.device).cuda_stream)
            if code:
                raise RuntimeError("cudaMemcpy2DAsync failed with CUDA error %d" % code)
            return
    dst.copy_(src, non_blocking=True)


_DEFAULT = []


def split_decode_attention(q, k_host, v_host, split, k_dev=None, v_dev=None, scale=None, lengths=None,
                           causal=False, threads=None):
    """SplitAttention's call on a process-wide instance (one worker thread)."""
    if not _DEFAULT:
        _DEFAULT.append(SplitAttention())
    return _DEFAULT[0](q, k_host, v_host, split, k_dev, v_dev, scale, lengths, causal, threads)


def split_for(profile, q, k_host, resident=0, grain=64):
    """The split point passes/cost_attention.choose_split picks for these shapes (an int for SplitAttention)."""
    B, Hq, Lq, D = q.shape
    Hkv, T = k_host.shape[1], k_host.shape[2]
    return choose_split(profile, B, Hq, Hkv, T, D, q.dtype, Lq, resident, grain).split
