"""CPU benchmark: eager vs Inductor (C++/OpenMP) vs fuse on the CPU anchors of shared/ANCHORS.md.

    python3 bench/cpu.py [--only SUBSTR] [--out FILE] [--save] [--keep-caches] [--verbose]

One run prints a JSON line per workload as it goes, then an aligned table; see bench/README.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import harness  # noqa: E402
from timing import base_info  # noqa: E402
from workloads import cpu_workloads  # noqa: E402

COPY_BYTES = 1 << 28  # 256 MiB source buffer (and as much again for the destination)

VARIANTS = [
    harness.inductor("ind", "default"),
    harness.fuse_cold("fuse"),
    harness.fuse_warm("fuse_warm"),
]

COLUMNS = [  # (header, row key, kind, group whose failure makes the cell ERROR)
    ("workload", "name", None, None),
    ("eager ms", "eager_ms", "ms", "eager"),
    ("inductor ms", "ind_ms", "ms", "ind"),
    ("fuse ms", "fuse_ms", "ms", "fuse"),
    ("floor ms", "floor_ms", "ms", None),
    ("fuse/ind", "fuse_over_ind", "ratio", "fuse"),
    ("ind compile s", "ind_compile_s", "s", "ind"),
    ("fuse cold s", "fuse_compile_s", "s", "fuse"),
    ("fuse warm s", "fuse_warm_compile_s", "s", "fuse_warm"),
    ("fuse err", "fuse_err", "err", "fuse"),
]

RATIOS = [("fuse_over_ind", "fuse_ms", "ind_ms")]


def main():
    opts = harness.parse_args(__doc__.strip().splitlines()[0])
    info = base_info("cpu")
    info["device"] = "cpu"
    workloads = cpu_workloads(opts.only)
    if not workloads:
        sys.exit("no workload matches --only %r" % opts.only)
    harness.run_suite(info, workloads, VARIANTS, COLUMNS, opts, device="cpu", card="cpu", copy_bytes=COPY_BYTES,
                      min_total=0.3, ratios=RATIOS)


if __name__ == "__main__":
    main()
