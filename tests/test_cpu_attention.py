"""The fused CPU decode-attention kernel (emit/cpu_attention.py, runtime/cpu_attention.py), split-context attention
(runtime/split_attention.py) and its split choice (passes/cost_attention.py).

Reference: SDPA's math on float64 copies of the inputs. The kernel passes where its error against that reference
is at most twice eager SDPA's own (on the input dtype) plus a small floor: float32 accumulation, one rounding of
the output to the input dtype."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fusebackend.passes.cost_attention import choose_split, split_time
from fusebackend.passes.hardware_profile import reference_h200
from fusebackend.runtime.cpu_attention import (AttentionShapeError, decode_attention, decode_attention_partial,
                                               kernel_for, merge_partials, plan_chunks)
from fusebackend.runtime.split_attention import SplitAttention, attention_partial, split_for

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}


def _rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen).to(dtype)


def _inputs(B, Hq, Hkv, Lq, T, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return _rand(B, Hq, Lq, D, dtype=dtype, gen=g), _rand(B, Hkv, T, D, dtype=dtype, gen=g), \
        _rand(B, Hkv, T, D, dtype=dtype, gen=g)


def _ref(q, k, v, scale=None, lengths=None, causal=False):
    """float64 SDPA, per batch over its valid positions; causal rows as the kernel defines them."""
    outs = []
    for b in range(q.shape[0]):
        n = k.shape[2] if lengths is None else int(lengths[b])
        qb, kb, vb = q[b:b + 1].double(), k[b:b + 1, :, :n].double(), v[b:b + 1, :, :n].double()
        mask = None
        if causal:
            Lq = q.shape[2]
            pos = torch.arange(n)
            mask = pos.view(1, -1) < (n - Lq + 1 + torch.arange(Lq)).view(-1, 1)
        outs.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=True))
    return torch.cat(outs)


def _eager(q, k, v, scale=None):
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _check(out, q, k, v, ref, scale=None, eager=True):
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    bound = FLOOR[q.dtype]
    if eager:
        bound += 2 * _err(_eager(q, k, v, scale), ref)
    assert _err(out, ref) <= bound, "error %.3g > %.3g" % (_err(out, ref), bound)


SHAPES = [  # B, Hq, Hkv, Lq, T, D
    (1, 32, 8, 1, 1000, 128),      # the ANCHORS layout (GQA 4), a context that is no multiple of the tile
    (2, 8, 2, 4, 777, 64),         # Lq 4
    (3, 4, 4, 1, 1, 128),          # one position, no GQA
    (2, 6, 2, 1, 4097, 80),        # D not a multiple of the vector width; several chunks
    (1, 16, 1, 8, 300, 32),        # MQA, Lq 8: 128 rows per kv head
    (2, 12, 3, 2, 65, 16),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b%d_hq%d_hkv%d_lq%d_t%d_d%d" % s)
def test_matches_sdpa(shape, dtype):
    B, Hq, Hkv, Lq, T, D = shape
    q, k, v = _inputs(B, Hq, Hkv, Lq, T, D, dtype)
    _check(decode_attention(q, k, v), q, k, v, _ref(q, k, v))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_and_thread_counts(dtype):
    q, k, v = _inputs(2, 8, 2, 1, 3000, 64, dtype, seed=1)
    ref = _ref(q, k, v, scale=0.3)
    outs = [decode_attention(q, k, v, scale=0.3, threads=t) for t in (1, 2, 3)]
    for o in outs:
        _check(o, q, k, v, ref, scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_cache_slices(dtype):
    """K/V as the first T positions of a cache with room for more, in [B, H, cap, D] and in [B, cap, H, D]
    (transposed) layouts, a non-unit inner stride, and a transposed q: all read in place."""
    B, Hq, Hkv, Lq, T, D, cap = 2, 8, 2, 2, 531, 64, 1024
    g = torch.Generator().manual_seed(3)
    kc, vc = _rand(B, Hkv, cap, D, dtype=dtype, gen=g), _rand(B, Hkv, cap, D, dtype=dtype, gen=g)
    q = _rand(B, Lq, Hq, D, dtype=dtype, gen=g).transpose(1, 2)
    k, v = kc[:, :, :T], vc[:, :, :T]
    assert not k.is_contiguous() and not q.is_contiguous()
    _check(decode_attention(q, k, v), q, k, v, _ref(q, k, v))
    kt = _rand(B, cap, Hkv, D, dtype=dtype, gen=g).transpose(1, 2)[:, :, :T]
    vt = _rand(B, cap, Hkv, D, dtype=dtype, gen=g).transpose(1, 2)[:, :, :T]
    _check(decode_attention(q, kt, vt), q, kt, vt, _ref(q, kt, vt))
    kw = _rand(B, Hkv, T, 2 * D, dtype=dtype, gen=g)[..., ::2]         # inner stride 2: the generic path
    vw = _rand(B, Hkv, T, 2 * D, dtype=dtype, gen=g)[..., 1::2]
    _check(decode_attention(q, kw, vw), q, kw, vw, _ref(q, kw, vw))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lengths_per_batch(dtype):
    B, Hq, Hkv, Lq, T, D = 4, 8, 2, 1, 700, 64
    q, k, v = _inputs(B, Hq, Hkv, Lq, T, D, dtype, seed=4)
    lengths = torch.tensor([700, 1, 333, 64])
    out = decode_attention(q, k, v, lengths=lengths)
    ref = _ref(q, k, v, lengths=lengths)
    _check(out, q, k, v, ref, eager=False)
    # positions past a length are never read: garbage there changes nothing
    k2, v2 = k.clone(), v.clone()
    for b, n in enumerate(lengths.tolist()):
        k2[b, :, n:] = float("nan")
        v2[b, :, n:] = float("inf")
    assert torch.equal(decode_attention(q, k2, v2, lengths=lengths), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_causal_rows(dtype):
    q, k, v = _inputs(2, 8, 2, 4, 150, 64, dtype, seed=5)
    lengths = torch.tensor([150, 9])
    out = decode_attention(q, k, v, lengths=lengths, causal=True)
    _check(out, q, k, v, _ref(q, k, v, lengths=lengths, causal=True), eager=False)


def _scores_lse(q, k, start, stop, scale):
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    kk = k.double().repeat_interleave(Hq // Hkv, dim=1)[:, :, start:stop]
    return torch.logsumexp(q.double() @ kk.transpose(-1, -2) * scale, dim=-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_partials_merge_to_full(dtype):
    B, Hq, Hkv, Lq, T, D = 2, 8, 2, 4, 1500, 64
    q, k, v = _inputs(B, Hq, Hkv, Lq, T, D, dtype, seed=6)
    scale = D ** -0.5
    cuts = [0, 1, 700, 1433, T]
    parts = [decode_attention_partial(q, k, v, a, b, scale) for a, b in zip(cuts, cuts[1:])]
    for (a, b), (o, lse) in zip(zip(cuts, cuts[1:]), parts):
        assert o.dtype == torch.float32 and lse.shape == (B, Hq, Lq)
        assert _err(lse, _scores_lse(q, k, a, b, scale)) < 1e-4 * max(1.0, math.log(b - a + 1))
        ref = _ref(q, k[:, :, a:b], v[:, :, a:b])
        assert _err(o, ref) < 1e-4 if dtype == torch.float32 else _err(o, ref) < 1e-3
    merged = merge_partials(parts, dtype)
    _check(merged, q, k, v, _ref(q, k, v))
    out, lse = merge_partials(parts)
    assert _err(lse, _scores_lse(q, k, 0, T, scale)) < 1e-4


def test_empty_range_and_lengths_zero():
    q, k, v = _inputs(2, 4, 2, 1, 100, 32, torch.float32)
    o, lse = decode_attention_partial(q, k, v, 50, 50)
    assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(lse).all()
    o, lse = decode_attention_partial(q, k, v, 60, 100, lengths=torch.tensor([100, 40]))
    assert torch.isneginf(lse[1]).all() and torch.equal(o[1], torch.zeros_like(o[1]))
    assert torch.isfinite(lse[0]).all()
    # merging an empty part changes nothing
    full = decode_attention_partial(q, k, v, 0, 100)
    empty = decode_attention_partial(q, k, v, 100, 100)
    out, _ = merge_partials([full, empty])
    assert _err(out, full[0]) == 0.0
    out, lse = merge_partials([empty, empty])
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    # length 0: the row attends nothing; out is 0
    out = decode_attention(q, k, v, lengths=torch.tensor([0, 100]))
    assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_out_buffers_and_strided_outputs():
    q, k, v = _inputs(1, 8, 2, 1, 300, 64, torch.bfloat16)
    out = torch.empty(1, 1, 8, 64).transpose(1, 2)          # any strides
    lse = torch.empty(1, 8, 1)
    o, l = decode_attention_partial(q, k, v, 0, 300, out=out, lse=lse)
    assert o is out and l is lse
    assert _err(out, _ref(q, k, v)) < 1e-3


@pytest.mark.parametrize("inline", [False, True], ids=["worker", "inline"])
@pytest.mark.parametrize("split", [0, 1, 500, 1000, 1999, 2000])
def test_split_attention_on_the_cpu_alone(split, inline):
    """Both parts on the CPU: the kernel's [0, split) on the worker thread (or inline), the rest by the torch
    partial, merged by their log-sum-exp: equals the full attention."""
    q, k, v = _inputs(2, 8, 2, 1, 2000, 64, torch.bfloat16, seed=7)
    sa = SplitAttention(threads=2, inline_cpu=inline)
    try:
        out = sa(q, k, v, split)
        _check(out, q, k, v, _ref(q, k, v))
        assert sa.last["cpu"] == split and sa.last["streamed"] == 2000 - split
        # with a "device" tail (here CPU tensors): CPU [0, split'), streamed, resident [1700, 2000)
        s2 = min(split, 1700)
        out = sa(q, k, v, s2, k_dev=k[:, :, 1700:].contiguous(), v_dev=v[:, :, 1700:].contiguous())
        _check(out, q, k, v, _ref(q, k, v))
        assert sa.last == {"cpu": s2, "streamed": 1700 - s2, "resident": 300, "gpu_path": "matmul"}
    finally:
        sa.close()


def test_split_attention_results_are_not_reused_buffers():
    q, k, v = _inputs(1, 4, 2, 1, 300, 32, torch.float32, seed=12)
    sa = SplitAttention(threads=1)
    try:
        a = sa(q, k, v, 300)                    # the CPU part alone
        a_copy = a.clone()
        sa(q * 2, k, v, 300)
        assert torch.equal(a, a_copy)
    finally:
        sa.close()


def test_split_attention_lengths_and_causal_on_the_cpu():
    q, k, v = _inputs(3, 8, 4, 2, 900, 32, torch.float32, seed=8)
    lengths = torch.tensor([900, 17, 450])
    sa = SplitAttention(threads=2)
    try:
        for causal in (False, True):
            out = sa(q, k, v, 400, lengths=lengths, causal=causal)
            _check(out, q, k, v, _ref(q, k, v, lengths=lengths, causal=causal), eager=False)
    finally:
        sa.close()


def test_torch_partial_matches_kernel_partial():
    q, k, v = _inputs(2, 8, 2, 3, 600, 64, torch.float32, seed=9)
    lengths = torch.tensor([600, 250])
    for causal in (False, True):
        o1, l1 = decode_attention_partial(q, k, v, 200, 600, lengths=lengths, causal=causal)
        o2, l2 = attention_partial(q, k[:, :, 200:600], v[:, :, 200:600], 64 ** -0.5, 200, lengths, causal)
        fin = torch.isfinite(l1)
        assert torch.equal(fin, torch.isfinite(l2))
        assert _err(l1[fin], l2[fin]) < 1e-4 and _err(o1, o2) < 1e-5


@pytest.mark.parametrize("bad, match", [
    (lambda q, k, v: (q.double(), k.double(), v.double()), "dtype torch.float64"),
    (lambda q, k, v: (q, k.half(), v), "share a dtype"),
    (lambda q, k, v: (q[:, :6], k[:, :4], v[:, :4]), r"q heads \(6\) must be a multiple of kv heads \(4\)"),
    (lambda q, k, v: (q.expand(2, 8, 9, 32).contiguous(), k, v), "9 positions per sequence"),
    (lambda q, k, v: (q[..., :16], k, v), r"head dim of q \(16\) and k/v \(32\)"),
    (lambda q, k, v: (q[:1], k, v), r"batch of q \(1\) and k/v \(2\)"),
    (lambda q, k, v: (q, k, v[:, :, :5]), "k and v must have the same shape"),
    (lambda q, k, v: (q[0], k, v), "q must be 4-d"),
    (lambda q, k, v: (q, k.to("meta"), v), "k is on meta"),
])
def test_errors_name_what_is_wrong(bad, match):
    q, k, v = _inputs(2, 8, 4, 1, 50, 32, torch.float32)
    with pytest.raises(AttentionShapeError, match=match):
        decode_attention(*bad(q, k, v))


def test_errors_for_lengths_ranges_and_grad():
    q, k, v = _inputs(2, 8, 4, 1, 50, 32, torch.float32)
    with pytest.raises(AttentionShapeError, match=r"lengths must lie in \[0, 50\]"):
        decode_attention(q, k, v, lengths=torch.tensor([51, 3]))
    with pytest.raises(AttentionShapeError, match="1-d tensor of 2"):
        decode_attention(q, k, v, lengths=torch.tensor([5]))
    with pytest.raises(AttentionShapeError, match="integer tensor"):
        decode_attention(q, k, v, lengths=torch.tensor([5.0, 3.0]))
    with pytest.raises(AttentionShapeError, match=r"\[start, stop\) = \[10, 60\)"):
        decode_attention_partial(q, k, v, 10, 60)
    with pytest.raises(AttentionShapeError, match="requires grad"):
        decode_attention(q.requires_grad_(), k, v)
    with pytest.raises(AttentionShapeError, match=r"split 51 must lie in \[0, T - Tdev\] = \[0, 50\]"):
        SplitAttention(threads=1)(q.detach(), k, v, 51)
    with pytest.raises(AttentionShapeError, match="at most 128"):
        decode_attention(*_inputs(1, 32, 1, 8, 10, 32, torch.float32))


def test_kernels_are_built_once_per_configuration():
    a = kernel_for(torch.bfloat16, 64, 4, 1)
    assert kernel_for(torch.bfloat16, 64, 4, 1) is a
    assert kernel_for(torch.bfloat16, 64, 4, 2) is not a
    assert "omp parallel" in a.src.source and "fb::ld<float, S>" in a.src.source


def test_chunk_plan_gives_every_thread_work():
    for B, Hkv, T, th in ((1, 8, 32768, 16), (4, 8, 32768, 16), (16, 8, 8192, 16), (1, 8, 131072, 16),
                          (1, 1, 100, 2), (2, 2, 1, 4), (1, 8, 0, 16)):
        chunk, n = plan_chunks(B, Hkv, T, th)
        assert chunk % 64 == 0 and n * chunk >= T and (n - 1) * chunk < max(T, 1)
        if T >= 256 * 4 * th:
            assert B * Hkv * n >= 4 * th


# ---------------------------------------------------------------- the split choice (pure)
REF = reference_h200()


@pytest.mark.parametrize("b,t", [(1, 32768), (4, 32768), (16, 8192), (1, 131072)])
def test_split_choice_balances_or_takes_one_side(b, t):
    p = choose_split(REF, b, 32, 8, t, 128, "bfloat16")
    assert 0 <= p.split <= t and p.split + p.streamed == t and p.split % 64 == 0 or p.split == t
    assert p.predicted_s <= min(p.cpu_only_s, p.streamed_only_s) + 1e-12
    if 0 < p.split < t:
        assert abs(p.cpu_s - p.gpu_s) < 0.1 * p.predicted_s      # both finish together
    # a faster link moves work to it; a faster CPU moves work to the CPU
    fast_link = choose_split(REF.replace(h2d_bw=4 * REF.h2d_bw, shared_dram_bw=400e9), b, 32, 8, t, 128, "bfloat16")
    fast_cpu = choose_split(REF.replace(cpu_mem_bw=4 * REF.cpu_mem_bw, shared_dram_bw=400e9), b, 32, 8, t, 128,
                            "bfloat16")
    assert fast_link.split < fast_cpu.split


def test_split_choice_without_contention_halves_the_time():
    prof = REF.replace(cpu_mem_bw=54.4e9, shared_dram_bw=1e12)      # CPU as fast as the link, no DRAM sharing
    p = choose_split(prof, 4, 32, 8, 32768, 128, "bfloat16")
    assert 0.4 < p.cpu_fraction < 0.6
    assert p.predicted_s < 0.6 * min(p.cpu_only_s, p.streamed_only_s)


def test_split_choice_with_resident_positions():
    t = 32768
    p = choose_split(REF, 4, 32, 8, t, 128, "bfloat16", resident=t // 2)
    assert p.resident == t // 2 and p.split + p.streamed == t // 2
    whole = split_time(REF, 4, 32, 8, t, 128, "bfloat16", p.split, 1, t // 2)
    assert math.isclose(whole[0], p.predicted_s)
    assert choose_split(REF, 1, 32, 8, t, 128, "bfloat16", resident=t).split == 0
    with pytest.raises(ValueError, match="resident"):
        choose_split(REF, 1, 32, 8, t, 128, "bfloat16", resident=t + 1)
    with pytest.raises(ValueError, match="split"):
        split_time(REF, 1, 32, 8, t, 128, "bfloat16", t + 64)


def test_split_for_reads_the_shapes():
    q = torch.zeros(4, 32, 1, 128, dtype=torch.bfloat16)
    k = torch.zeros(4, 8, 32768, 128, dtype=torch.bfloat16).as_strided((4, 8, 32768, 128), (0, 0, 0, 0))
    assert split_for(REF, q, k) == choose_split(REF, 4, 32, 8, 32768, 128, torch.bfloat16).split


# ---------------------------------------------------------------- the real split path
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_split_attention_cpu_and_gpu(dtype):
    B, Hq, Hkv, Lq, T, D = 2, 32, 8, 1, 5000, 128
    q, k, v = _inputs(B, Hq, Hkv, Lq, T, D, dtype, seed=10)
    ref = _ref(q, k, v)
    kp, vp = k.pin_memory(), v.pin_memory()
    qd = q.cuda()
    sa = SplitAttention()
    inline = SplitAttention(inline_cpu=True)
    try:
        for split, tdev in ((2000, 0), (0, 0), (T, 0), (1500, 1000), (0, T), (1234, 321)):
            kd = k[:, :, T - tdev:].cuda() if tdev else None
            vd = v[:, :, T - tdev:].cuda() if tdev else None
            out = sa(qd, kp, vp, split, kd, vd)
            assert out.device.type == "cuda" and out.dtype == dtype
            _check(out.cpu(), q, k, v, ref)
            _check(inline(qd, kp, vp, split, kd, vd).cpu(), q, k, v, ref)
            if T - tdev - split > 0 and dtype != torch.float32:
                assert sa.last["gpu_path"] == "fused"
        lengths = torch.tensor([T, 777])
        out = sa(qd, kp, vp, 2500, lengths=lengths.cuda())
        _check(out.cpu(), q, k, v, _ref(q, k, v, lengths=lengths), eager=False)
        # a strided host cache (capacity > T) streams through the same path
        cap = torch.randn(B, Hkv, T + 300, D).to(dtype).pin_memory()
        cap[:, :, :T] = k
        capv = torch.randn(B, Hkv, T + 300, D).to(dtype).pin_memory()
        capv[:, :, :T] = v
        out = sa(qd, cap[:, :, :T], capv[:, :, :T], 1000)
        _check(out.cpu(), q, k, v, ref)
    finally:
        sa.close()
        inline.close()


@pytest.mark.gpu
def test_gpu_partial_lse_matches_the_scores():
    q, k, v = _inputs(1, 32, 8, 1, 3000, 128, torch.bfloat16, seed=11)
    scale = 128 ** -0.5
    o, lse = attention_partial(q.cuda(), k.cuda(), v.cuda(), scale)
    assert _err(lse.cpu(), _scores_lse(q, k, 0, 3000, scale)) < 1e-3
    o2, lse2 = attention_partial(q.cuda(), k.cuda(), v.cuda(), scale, force_matmul=True)
    assert _err(lse, lse2) < 1e-3 and _err(o, o2) < 1e-2
