"""GPU benchmark: eager vs Inductor (default and reduce-overhead) vs fuse (plain and CUDA graphs).

    python3 bench/gpu.py [--only SUBSTR] [--out FILE] [--save] [--keep-caches] [--verbose]

The seven GPU anchors of shared/ANCHORS.md. One run prints a JSON line per workload as it goes, then an
aligned table; see bench/README.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import harness  # noqa: E402
from timing import base_info  # noqa: E402
from workloads import gpu_workloads  # noqa: E402

COPY_BYTES = 1 << 30  # 1 GiB source buffer (and as much again for the destination)

VARIANTS = [
    harness.inductor("ind", "default"),
    harness.inductor("ind_ro", "reduce-overhead"),
    harness.fuse_cold("fuse"),
    harness.fuse_warm("fuse_warm"),
    harness.fuse_cold("fuse_cg", {"cudagraphs": True}),
]

COLUMNS = [  # (header, row key, kind, group whose failure makes the cell ERROR)
    ("workload", "name", None, None),
    ("eager", "eager_ms", "ms", "eager"),
    ("ind", "ind_ms", "ms", "ind"),
    ("ind+cg", "ind_ro_ms", "ms", "ind_ro"),
    ("fuse", "fuse_ms", "ms", "fuse"),
    ("fuse+cg", "fuse_cg_ms", "ms", "fuse_cg"),
    ("floor", "floor_ms", "ms", None),
    ("fuse/ind", "fuse_over_ind", "ratio", "fuse"),
    ("fcg/icg", "fuse_cg_over_ind_ro", "ratio", "fuse_cg"),
    ("ind comp s", "ind_compile_s", "s", "ind"),
    ("fuse cold s", "fuse_compile_s", "s", "fuse"),
    ("fuse warm s", "fuse_warm_compile_s", "s", "fuse_warm"),
    ("fuse err", "fuse_err", "err", "fuse"),
    ("fuse+cg err", "fuse_cg_err", "err", "fuse_cg"),
]

RATIOS = [("fuse_over_ind", "fuse_ms", "ind_ms"), ("fuse_cg_over_ind_ro", "fuse_cg_ms", "ind_ro_ms")]


def main():
    opts = harness.parse_args(__doc__.strip().splitlines()[0], gpu=True)
    device = opts.device
    torch.backends.cuda.matmul.allow_tf32 = False
    info = base_info("gpu")
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        sys.exit("CUDA is not available (use --device cpu only to smoke-test this script)")
    info["device"] = torch.cuda.get_device_name(device) if on_cuda else device
    info["cuda"] = torch.version.cuda
    try:
        import cupy
        info["cupy"] = cupy.__version__
    except Exception as e:
        info["cupy"] = "not importable: " + repr(e)
    workloads = gpu_workloads(device, opts.only)
    if not workloads:
        sys.exit("no workload matches --only %r" % opts.only)
    harness.run_suite(info, workloads, VARIANTS, COLUMNS, opts, device=device, card=info["device"],
                      copy_bytes=COPY_BYTES, min_total=0.2, ratios=RATIOS)


if __name__ == "__main__":
    main()
