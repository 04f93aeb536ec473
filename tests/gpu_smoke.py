"""GPU smoke and timing for the CUDA path (not a pytest file): python3 tests/gpu_smoke.py [--no-inductor]

For the ANCHORS.md GPU workloads that one fused kernel covers: wall-clock ms per call (median of 5 runs of
20 calls, CPU overhead included) for eager, Inductor and fuse, the memory floor (bytes / 3.0 TB/s), fuse's
cold and warm compile, its error against eager, and each kernel's launch shape and registers. Then the
per-call overhead on a tiny input, with and without CUDA graphs, and emitter variants for the row kernels.
Writes everything to $OUT/gpu_smoke.json when $OUT is set.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

os.environ["FUSEBACKEND_CACHE_DIR"] = tempfile.mkdtemp(prefix="fb-smoke-")

import torch  # noqa: E402

import fusebackend  # noqa: E402
from fusebackend.emit import cuda_target as E  # noqa: E402
from fusebackend.runtime import cuda_compiler as CC  # noqa: E402
from fusebackend.runtime import cuda_launch as CL  # noqa: E402

F = torch.nn.functional
COPY_BW = 3.0e12


def rms(x, w):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16) * w


def workloads():
    n = 1 << 26
    R, C = 16384, 4096
    bf = torch.bfloat16
    yield ("pointwise_chain_f32_64M", lambda x, y: F.gelu(x * 1.5 + y) * torch.sigmoid(x) - torch.tanh(y) * 0.5,
           lambda: (torch.randn(n, device="cuda"), torch.randn(n, device="cuda")), 3 * 4 * n)
    yield ("masked_softmax_f32_16kx4k", lambda x, m: torch.softmax(x * 0.125 + m, -1),
           lambda: (torch.randn(R, C, device="cuda"), torch.randn(R, C, device="cuda")), 3 * 4 * R * C)
    yield ("add_layernorm_gelu_bf16_16kx4k",
           lambda x, r, w, b: F.gelu(F.layer_norm(x + r, (C,), w, b)),
           lambda: (torch.randn(R, C, device="cuda", dtype=bf), torch.randn(R, C, device="cuda", dtype=bf),
                    torch.randn(C, device="cuda", dtype=bf), torch.randn(C, device="cuda", dtype=bf)),
           3 * 2 * R * C)
    yield ("rmsnorm_bf16_16kx4k", rms,
           lambda: (torch.randn(R, C, device="cuda", dtype=bf), torch.randn(C, device="cuda", dtype=bf)),
           2 * 2 * R * C)


def wall_ms(f, args, n=20, reps=5):
    f(*args)
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            f(*args)
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) / n * 1e3)
    return statistics.median(ts)


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def fuse_compile(fn, args, **options):
    torch._dynamo.reset()
    c = torch.compile(fn, backend="fuse", options=dict(options, fallback="error") if options else {"fallback": "error"})
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = c(*args)
    torch.cuda.synchronize()
    return c, out, time.perf_counter() - t


def kernel_info():
    return [d for d in (k.describe() for k in list(CC.live_kernels)) if d]


def main():
    inductor = "--no-inductor" not in sys.argv
    p = torch.cuda.get_device_properties(0)
    print("device: %s, %d SMs, torch %s, NVRTC %s" % (p.name, p.multi_processor_count, torch.__version__,
                                                      CC._identity()[0]))
    results = {"device": p.name, "workloads": [], "variants": [], "overhead": {}}
    rows = []
    for name, fn, make, nbytes in workloads():
        args = make()
        with torch.no_grad():
            ref = fn(*args)
            t_eager = wall_ms(fn, args)
            CC.live_kernels.clear()
            c, out, cold = fuse_compile(fn, args)
            info = kernel_info()
            err = rel_err(out, ref)
            t_fuse = wall_ms(c, args)
            fusebackend.reset()
            _, _, warm = fuse_compile(fn, args)
            t_ind = float("nan")
            ind_compile = float("nan")
            if inductor:
                torch._dynamo.reset()
                ci = torch.compile(fn)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                ci(*args)
                torch.cuda.synchronize()
                ind_compile = time.perf_counter() - t0
                t_ind = wall_ms(ci, args)
        floor = nbytes / COPY_BW * 1e3
        r = dict(name=name, eager=t_eager, inductor=t_ind, fuse=t_fuse, floor=floor, cold_s=cold, warm_s=warm,
                 inductor_compile_s=ind_compile, rel_err=err, kernels=info)
        results["workloads"].append(r)
        rows.append(r)
        print("%-32s eager %.3f  inductor %.3f  fuse %.3f  floor %.3f ms | fuse cold %.2fs warm %.2fs "
              "(inductor %.2fs) | err %.1e | %s" % (name, t_eager, t_ind, t_fuse, floor, cold, warm, ind_compile,
                                                    err, [(k["grid"], k["block"], k["regs"], k["local_bytes"])
                                                          for k in info]), flush=True)
        del args, ref, out

    # pointwise variants (same run, same card): bytes per thread per chunk, grid cap in waves
    name, fn, make, nbytes = next(iter(workloads()))
    args = make()
    for vb, waves in [(16, 1), (32, 1), (16, 4), (32, 4), (16, 0), (32, 0)]:
        saved = E.PW_VEC_BYTES, CL.PW_WAVES
        E.PW_VEC_BYTES, CL.PW_WAVES = vb, waves
        try:
            with torch.no_grad():
                CC.live_kernels.clear()
                c, out, cold = fuse_compile(fn, args)
                info = kernel_info()
                t = wall_ms(c, args)
                err = rel_err(out, fn(*args))
        finally:
            E.PW_VEC_BYTES, CL.PW_WAVES = saved
        results["variants"].append(dict(name=name, pw_vec_bytes=vb, waves=waves, fuse=t, rel_err=err, kernels=info))
        print("variant PW_VEC_BYTES=%d PW_WAVES=%d %-28s fuse %.3f ms (floor %.3f) err %.1e %s"
              % (vb, waves, name, t, nbytes / COPY_BW * 1e3, err, [(k["grid"], k["block"], k["regs"]) for k in info]),
              flush=True)
    del args

    # row-kernel variants: 16 or 32 bytes per thread per chunk
    for vb in (32,):
        saved = E.VEC_BYTES
        E.VEC_BYTES = vb
        try:
            for name, fn, make, nbytes in list(workloads())[1:]:
                args = make()
                with torch.no_grad():
                    CC.live_kernels.clear()
                    c, out, cold = fuse_compile(fn, args)
                    info = kernel_info()
                    t = wall_ms(c, args)
                    err = rel_err(out, fn(*args))
                results["variants"].append(dict(name=name, vec_bytes=vb, fuse=t, rel_err=err, cold_s=cold,
                                                kernels=info))
                print("variant VEC_BYTES=%d %-32s fuse %.3f ms cold %.2fs err %.1e %s"
                      % (vb, name, t, cold, err, [(k["grid"], k["block"], k["regs"]) for k in info]), flush=True)
                del args, out
        finally:
            E.VEC_BYTES = saved

    # per-call overhead on a tiny input
    fn = lambda x, y: torch.relu(x * 2 + y)
    args = (torch.randn(1024, device="cuda"), torch.randn(1024, device="cuda"))
    with torch.no_grad():
        ov = {"eager": wall_ms(fn, args, n=200)}
        c, _, _ = fuse_compile(fn, args)
        ov["fuse"] = wall_ms(c, args, n=200)
        c, _, _ = fuse_compile(fn, args, cudagraphs=True)
        ov["fuse_cudagraphs"] = wall_ms(c, args, n=200)
        x2 = (args[0].clone(), args[1].clone())
        ov["fuse_cudagraphs_new_inputs"] = wall_ms(lambda a, b: c(a, b), x2, n=200)
    results["overhead"] = ov
    print("tiny relu(x*2+y) [1024] per call (ms): " + ", ".join("%s %.4f" % kv for kv in ov.items()))
    print("\nworkload                          eager   inductor  fuse    floor   fuse/floor  cold(s)")
    for r in rows:
        print("%-32s %7.3f %8.3f %7.3f %7.3f %8.2f %8.2f" % (r["name"], r["eager"], r["inductor"], r["fuse"],
                                                             r["floor"], r["fuse"] / r["floor"], r["cold_s"]))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_smoke.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
