"""C++/OpenMP decode attention for CPU tensors: q [B, Hq, Lq, D] against a K/V cache [B, Hkv, T, D].

One kernel text per (dtype, D, q heads per kv head, Lq, unit inner stride, tuning); every other size and stride
is a run-time argument, so a cache slice with capacity > T, any batch, context and range share one library.

Work item = (batch, kv head, context chunk). Its thread reads the chunk's K and V rows once, for all the
R * Lq query rows of that kv group (GQA: R = Hq / Hkv), TT positions at a time: scores for the tile, an online
softmax update (running max m, running sum l, unnormalised accumulator acc, all float32), then P.V. Reading K/V
once per group instead of once per q head is what keeps the kernel at memory bandwidth. Each item writes its
(m, l, acc) to a workspace; a second, small pass merges an item's chunks by log-sum-exp. The work is split
so that items outnumber threads (runtime/cpu_attention.py picks the chunk), schedule(dynamic) since per-batch
lengths make items unequal.

Inner loops run over D with float accumulators and restrict pointers, `#pragma omp simd` (-fopenmp), and the
explicit FMAs of fb_math.h (kernels build with -ffp-contract=off): g++ -O3 -march=native turns them into
AVX-512 / AVX2 code. Scores: one K row, up to RB query rows per pass (RB vector accumulators, one horizontal
sum each; the file allows reassociation so that sum is a tree, not 16 dependent adds). P.V: PU positions per
pass over D, up to RB rows, so each V vector load feeds RB FMAs and each accumulator load PU. Both read K/V
straight from the cache (converted in registers), no copy; while a tile's scores run, its V rows and the next
tile's K rows are prefetched into L2 (a core alone cannot keep enough misses in flight from the streams).
Measured on the H200 machine (16 threads, bf16, 537 MB caches, DRAM-resident): 76-88 GB/s of K/V read where
the host copies at 74-82 GB/s (read + write) and a plain read reaches 92-112 GB/s; torch's CPU SDPA 19-26 GB/s.

Entries (extern "C"):
  <name>_full(q, k, v, out, lens, ws, M, scale)      out [B, Hq, Lq, D] in the input dtype
  <name>_partial(q, k, v, out, lse, lens, ws, M, scale)
      out float32 [B, Hq, Lq, D], normalised over [start, stop) of the context; lse float32 [B, Hq, Lq]
      (the natural log of the softmax denominator including the max). A row with no position: out 0, lse -inf.
M (int64): B, Hkv, T, start, stop, chunk, nchunks, nthreads, causal, then the strides (in elements) of q, k,
v, out (4 each) and lse (3). lens: int64 [B] valid lengths (positions >= lens[b] are not attended) or null.
causal: query row i of Lq sees positions < len - Lq + 1 + i (the new tokens are the last Lq of the context).
ws: float32, nitems * (NR * (D + 2)) with nitems = B * Hkv * nchunks, NR = R * Lq.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from . import ctypes_map as C
from .errors import EmitError

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_LQ = 8
MAX_ROWS = 128            # R * Lq: rows of one kv group held per item (qf, s and acc stay in L1/L2)
MAX_HEAD_DIM = 512
TILE = 64                 # positions per tile: K tile 16 KB (bf16, D 128), scores NR x TT floats
RB = 4                    # rows per pass of the score and P.V loops (vector accumulators in registers)
PU = 8                    # positions per pass of the P.V loop over D
PREFETCH = 2              # software prefetch one tile ahead: 0 off, 1 into L1 (prefetcht0), 2 into L2 (prefetcht1)
# (H200, 16 threads, 537 MB: no prefetch 62 GB/s, into L1 70, into L2 71-79; tile 32-128 and PU 4-8 within noise)
META = ("B", "Hkv", "T", "start", "stop", "chunk", "nchunks", "nthreads", "causal")
NMETA = len(META) + 4 * 4 + 3


@dataclass(frozen=True)
class AttentionSource:
    name: str
    source: str
    dtype: torch.dtype
    head_dim: int
    group: int             # q heads per kv head
    lq: int
    unit_stride: bool      # K and V rows have unit stride along D (the vectorised path)
    tile: int

    @property
    def rows(self) -> int:
        return self.group * self.lq

    @property
    def ws_floats_per_item(self) -> int:
        return self.rows * (self.head_dim + 2)

    @property
    def full_name(self) -> str:
        return self.name + "_full"

    @property
    def partial_name(self) -> str:
        return self.name + "_partial"


def check_config(dtype, head_dim, group, lq) -> None:
    """EmitError naming what is unsupported."""
    if dtype not in DTYPES:
        raise EmitError("decode attention: dtype %s is not supported (bfloat16, float16, float32)" % dtype)
    if not isinstance(head_dim, int) or not 1 <= head_dim <= MAX_HEAD_DIM:
        raise EmitError("decode attention: head dim %r is not supported (1..%d)" % (head_dim, MAX_HEAD_DIM))
    if not isinstance(lq, int) or not 1 <= lq <= MAX_LQ:
        raise EmitError("decode attention: %r query positions per sequence is not supported (1..%d: a decode "
                        "kernel)" % (lq, MAX_LQ))
    if not isinstance(group, int) or group < 1 or group * lq > MAX_ROWS:
        raise EmitError("decode attention: %r q heads per kv head x %d query positions = %r rows per kv head is "
                        "not supported (at most %d)" % (group, lq, group * lq if isinstance(group, int) else group,
                                                         MAX_ROWS))


def emit_decode_attention(dtype, head_dim: int, group: int, lq: int, unit_stride: bool = True,
                          tile: int = TILE, rb: int = RB, pu: int = PU, prefetch: int = PREFETCH,
                          prefetch_tiles: int = 1) -> AttentionSource:
    """The kernel text for one configuration (EmitError names what is unsupported). group: q heads per kv head;
    lq: query positions per sequence; unit_stride: K and V have stride 1 along D (else a generic, slower path);
    tile / rb / pu / prefetch / prefetch_tiles: the tuning knobs above."""
    check_config(dtype, head_dim, group, lq)
    if not isinstance(tile, int) or not 8 <= tile <= 1024:
        raise EmitError("decode attention: tile %r is not supported (8..1024)" % (tile,))
    if not (isinstance(rb, int) and 1 <= rb <= 16 and isinstance(pu, int) and 1 <= pu <= 16):
        raise EmitError("decode attention: rows per pass %r / positions per pass %r not in 1..16" % (rb, pu))
    nr = group * lq
    body = _KERNEL % dict(
        S=C.storage(dtype), D=head_dim, R=group, LQ=lq, NR=nr, TT=tile, NMETA=NMETA, PU=pu,
        PREFETCH="true" if prefetch and unit_stride else "false", PFHINT=3 if prefetch == 1 else 2, PFD=prefetch_tiles,
        KD="1" if unit_stride else "kd", VD="1" if unit_stride else "vd",
        SCORES=_indent(_scores(nr, rb), 6), PV=_indent(_pv(nr, rb, pu), 4))
    name = "fb_dattn_%s" % hashlib.sha1(body.encode()).hexdigest()[:12]
    source = _HEADER + body.replace("@NAME@", name)
    return AttentionSource(name, source, dtype, head_dim, group, lq, unit_stride, tile)


def _row_blocks(nr, rb, block):
    """block(base, n) -> the lines for rows base .. base + n - 1 (base: a C expression). Full blocks of rb rows
    run as a loop over r0 (unrolled, 128 rows of an MQA decode with 8 query positions took g++ 11.6 s), the
    rest once."""
    full, tail = divmod(nr, rb)
    out = []
    if full > 1:
        out += ["for (int64_t r0 = 0; r0 < %d; r0 += %d) {" % (full * rb, rb)]
        out += ["  " + l for l in block("r0", rb)] + ["}"]
    elif full == 1:
        out += block("0", rb)
    if tail:
        out += block(str(full * rb), tail)
    return out


def _scores(nr, rb):
    """For one K row kr (already offset): s[r][tt] = q_r . k for every row r, RB rows per pass."""
    def block(base, n):
        acc = ", ".join("a%d = 0.0f" % i for i in range(n))
        red = ", ".join("a%d" % i for i in range(n))
        out = ["{", "  float %s;" % acc, "  #pragma omp simd reduction(+:%s)" % red,
               "  for (int64_t d = 0; d < D; ++d) {", "    const float x = LD(kr[d * KD]);"]
        out += ["    a%d = fb::fma_(qf[(%s + %d) * D + d], x, a%d);" % (i, base, i, i) for i in range(n)]
        return out + ["  }"] + ["  s[(%s + %d) * TT + tt] = a%d;" % (base, i, i) for i in range(n)] + ["}"]
    return _row_blocks(nr, rb, block)


def _pv(nr, rb, pu):
    """acc[r][:] += sum_tt p[r][tt] * v[tt][:]: U positions per pass over D (vectorised over d), RB rows per
    pass, so each d step loads U V vectors and RB accumulators for RB * U FMAs."""
    def block(base, n):
        out = ["{"]
        out += ["  float* __restrict c%d = acc + (%s + %d) * D;" % (i, base, i) for i in range(n)]
        out += ["  int64_t tt = 0;", "  for (; tt + PU <= n; tt += PU) {"]
        out += ["    const float %s;" % ", ".join("p%d_%d = s[(%s + %d) * TT + tt + %d]" % (i, u, base, i, u)
                                                   for u in range(pu)) for i in range(n)]
        out += ["    const S* __restrict v%d = vb + (tt + %d) * vt;" % (u, u) for u in range(pu)]
        out += ["    #pragma omp simd", "    for (int64_t d = 0; d < D; ++d) {"]
        out += ["      const float x%d = LD(v%d[d * VD]);" % (u, u) for u in range(pu)]
        for i in range(n):
            e = "c%d[d]" % i
            for u in range(pu):
                e = "fb::fma_(p%d_%d, x%d, %s)" % (i, u, u, e)
            out.append("      c%d[d] = %s;" % (i, e))
        out += ["    }", "  }", "  for (; tt < n; ++tt) {"]
        out += ["    const float %s;" % ", ".join("p%d = s[(%s + %d) * TT + tt]" % (i, base, i) for i in range(n))]
        out += ["    const S* __restrict v0 = vb + tt * vt;", "    #pragma omp simd",
                "    for (int64_t d = 0; d < D; ++d) {", "      const float x0 = LD(v0[d * VD]);"]
        out += ["      c%d[d] = fb::fma_(p%d, x0, c%d[d]);" % (i, i, i) for i in range(n)]
        return out + ["    }", "  }", "}"]
    return _row_blocks(nr, rb, block)


def _indent(lines, n):
    pad = " " * n
    return "\n".join(pad + l if l else l for l in lines)


# Sums of one kernel may be reassociated (lane-parallel and tree-shaped): a float32 dot product over D in any
# order is as exact as eager's, and a strict left-to-right horizontal sum per score would cost 16 dependent
# scalar adds. Infinities and NaN keep their meaning (no finite-math).
_HEADER = '#pragma GCC optimize("associative-math", "no-signed-zeros")\n#include "fb_math.h"\n'

_KERNEL = r"""
namespace {
typedef %(S)s S;
constexpr int64_t D = %(D)d, R = %(R)d, LQ = %(LQ)d, NR = %(NR)d, TT = %(TT)d, PU = %(PU)d;
constexpr int64_t W = NR * (D + 2);      // workspace floats per item: m[NR], l[NR], acc[NR][D]
static inline float LD(S v) { return fb::ld<float, S>(v); }
static inline float NEG_INF() { return -fb::inf_f(); }
constexpr bool PREFETCH = %(PREFETCH)s;
constexpr int64_t PFD = %(PFD)d;                // K is prefetched this many tiles ahead
static inline void prefetch_row(const S* p) {
  for (int64_t o = 0; o < D * (int64_t)sizeof(S); o += 64) __builtin_prefetch((const char*)p + o, 0, %(PFHINT)d);
}

struct Args {
  const S* q; const S* k; const S* v; const int64_t* lens; float* ws; float scale;
  int64_t B, Hkv, T, start, stop, chunk, nchunks, nthreads, causal;
  int64_t qs[4], ks[4], vs[4], os[4], ls[3];
};

static Args unpack(const void* q, const void* k, const void* v, const int64_t* lens, float* ws,
                   const int64_t* M, float scale) {
  Args a;
  a.q = (const S*)q; a.k = (const S*)k; a.v = (const S*)v; a.lens = lens; a.ws = ws; a.scale = scale;
  a.B = M[0]; a.Hkv = M[1]; a.T = M[2]; a.start = M[3]; a.stop = M[4]; a.chunk = M[5]; a.nchunks = M[6];
  a.nthreads = M[7]; a.causal = M[8];
  for (int i = 0; i < 4; ++i) { a.qs[i] = M[9 + i]; a.ks[i] = M[13 + i]; a.vs[i] = M[17 + i]; a.os[i] = M[21 + i]; }
  for (int i = 0; i < 3; ++i) a.ls[i] = M[25 + i];
  return a;
}

static inline int64_t valid_len(const Args& a, int64_t b) {
  int64_t n = a.lens ? a.lens[b] : a.T;
  return n < a.T ? (n < 0 ? 0 : n) : a.T;
}

// One work item: batch b, kv head h, chunk c of [start, stop). Writes m, l, acc (unnormalised) to ws.
static void item(const Args& a, int64_t b, int64_t h, int64_t c) {
  float* __restrict wm = a.ws + ((b * a.Hkv + h) * a.nchunks + c) * W;
  float* __restrict wl = wm + NR;
  float* __restrict acc = wl + NR;
  const int64_t len = valid_len(a, b);
  const int64_t lo = a.start + c * a.chunk;
  int64_t hi = lo + a.chunk;
  if (hi > a.stop) hi = a.stop;
  if (hi > len) hi = len;
  for (int64_t r = 0; r < NR; ++r) { wm[r] = NEG_INF(); wl[r] = 0.0f; }
  for (int64_t i = 0; i < NR * D; ++i) acc[i] = 0.0f;
  if (lo >= hi) return;
  alignas(64) float qf[NR * D];
  alignas(64) float s[NR * TT];
  int64_t lim[NR];                         // row r attends positions < lim[r]
  for (int64_t hl = 0; hl < R; ++hl)
    for (int64_t i = 0; i < LQ; ++i) {
      const int64_t r = hl * LQ + i;
      const S* __restrict qr = a.q + b * a.qs[0] + (h * R + hl) * a.qs[1] + i * a.qs[2];
      for (int64_t d = 0; d < D; ++d) qf[r * D + d] = LD(qr[d * a.qs[3]]) * a.scale;
      lim[r] = a.causal ? len - LQ + 1 + i : hi;
      if (lim[r] > hi) lim[r] = hi;
    }
  const int64_t kt = a.ks[2], vt = a.vs[2];
  const int64_t kd = a.ks[3], vd = a.vs[3];
  const int64_t KD = %(KD)s, VD = %(VD)s;    // unit inner strides are compile-time 1 (the vectorised path)
  (void)kd; (void)vd;
  const S* kbase = a.k + b * a.ks[0] + h * a.ks[1];
  const S* vbase = a.v + b * a.vs[0] + h * a.vs[1];
  for (int64_t t0 = lo; t0 < hi; t0 += TT) {
    const int64_t n = hi - t0 < TT ? hi - t0 : TT;
    // scores
    for (int64_t tt = 0; tt < n; ++tt) {
      const S* __restrict kr = kbase + (t0 + tt) * kt;
      if (PREFETCH) {                      // this tile's V row, the next tile's K row, while the scores run
        prefetch_row(vbase + (t0 + tt) * vt);
        if (t0 + PFD * TT + tt < hi) prefetch_row(kr + PFD * TT * kt);
      }
%(SCORES)s
    }
    // causal rows: positions at or past the row's limit are not attended
    if (a.causal)
      for (int64_t r = 0; r < NR; ++r)
        for (int64_t tt = lim[r] - t0 < 0 ? 0 : lim[r] - t0; tt < n; ++tt) s[r * TT + tt] = NEG_INF();
    // online softmax update: s becomes p = exp(s - m_new)
    for (int64_t r = 0; r < NR; ++r) {
      float* __restrict sr = s + r * TT;
      float mt = NEG_INF();
      #pragma omp simd reduction(max:mt)
      for (int64_t tt = 0; tt < n; ++tt) mt = sr[tt] > mt ? sr[tt] : mt;
      const float mo = wm[r], mn = mt > mo ? mt : mo;
      if (mn == NEG_INF()) {               // nothing attended yet in this row
        for (int64_t tt = 0; tt < n; ++tt) sr[tt] = 0.0f;
        continue;
      }
      float sum = 0.0f;
      #pragma omp simd reduction(+:sum)
      for (int64_t tt = 0; tt < n; ++tt) { const float p = fb::exp_(sr[tt] - mn); sr[tt] = p; sum += p; }
      if (mn != mo) {
        const float alpha = fb::exp_(mo - mn);       // 0 when mo is -inf
        wl[r] = wl[r] * alpha;
        float* __restrict ar = acc + r * D;
        #pragma omp simd
        for (int64_t d = 0; d < D; ++d) ar[d] *= alpha;
      }
      wl[r] += sum;
      wm[r] = mn;
    }
    // P.V
    const S* __restrict vb = vbase + t0 * vt;
%(PV)s
  }
}

static void phase1(const Args& a) {
  const int64_t nitems = a.B * a.Hkv * a.nchunks;
  #pragma omp parallel for schedule(dynamic, 1) num_threads(a.nthreads) if(nitems > 1)
  for (int64_t it = 0; it < nitems; ++it) {
    const int64_t c = it %% a.nchunks, bh = it / a.nchunks;
    item(a, bh / a.Hkv, bh %% a.Hkv, c);
  }
}

// Merge the chunks of (b, h) for row r: M = max m, L = sum l e^(m - M), out = sum acc e^(m - M) / L.
template <bool PARTIAL, class O>
static void merge(const Args& a, O* __restrict out, float* __restrict lse) {
  const int64_t nrows = a.B * a.Hkv * NR;
  #pragma omp parallel for schedule(static) num_threads(a.nthreads) if(nrows * a.nchunks * D > 65536)
  for (int64_t x = 0; x < nrows; ++x) {
    const int64_t r = x %% NR, bh = x / NR, b = bh / a.Hkv, h = bh %% a.Hkv;
    const float* base = a.ws + bh * a.nchunks * W;
    float M = NEG_INF();
    for (int64_t c = 0; c < a.nchunks; ++c) { const float m = base[c * W + r]; M = m > M ? m : M; }
    alignas(64) float o[D];
    for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
    float L = 0.0f;
    if (M != NEG_INF())
      for (int64_t c = 0; c < a.nchunks; ++c) {
        const float* wc = base + c * W;
        if (wc[NR + r] == 0.0f) continue;
        const float e = fb::exp_(wc[r] - M);
        L = fb::fma_(wc[NR + r], e, L);
        const float* __restrict ac = wc + 2 * NR + r * D;
        #pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] = fb::fma_(ac[d], e, o[d]);
      }
    const float inv = L > 0.0f ? 1.0f / L : 0.0f;
    const int64_t hq = h * R + r / LQ, i = r %% LQ;
    O* __restrict orow = out + b * a.os[0] + hq * a.os[1] + i * a.os[2];
    for (int64_t d = 0; d < D; ++d) orow[d * a.os[3]] = fb::st<O, float>(o[d] * inv);
    if (PARTIAL) lse[b * a.ls[0] + hq * a.ls[1] + i * a.ls[2]] = L > 0.0f ? M + fb::log_(L) : NEG_INF();
  }
}
}  // namespace

extern "C" void @NAME@_full(const void* q, const void* k, const void* v, void* out, const int64_t* lens,
                            float* ws, const int64_t* M, float scale) {
  const Args a = unpack(q, k, v, lens, ws, M, scale);
  phase1(a);
  merge<false, S>(a, (S*)out, nullptr);
}

extern "C" void @NAME@_partial(const void* q, const void* k, const void* v, float* out, float* lse,
                               const int64_t* lens, float* ws, const int64_t* M, float scale) {
  const Args a = unpack(q, k, v, lens, ws, M, scale);
  phase1(a);
  merge<true, float>(a, out, lse);
}

extern "C" int64_t @NAME@_nmeta() { return %(NMETA)d; }
"""
