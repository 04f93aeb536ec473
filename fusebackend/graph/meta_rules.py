"""Where torch's fake (meta) kernels disagree with the real ones, the real rule, so kernels read real types.

`_native_batch_norm_legit_functional` and `_batch_norm_with_update_functional` promise float32 new running
stats for a half-type input (their meta kernels follow the opmath type); the real kernels return the running
stats' own dtype. A kernel built on the fake dtype read the real bfloat16 buffers as float32 (twice their
bytes) and wrote garbage back into the running stats. The runtime also checks every ATen output a kernel
reads (runtime/meta_check.py); this table keeps the common cases off that slow path and its warning.
"""
from __future__ import annotations

import dataclasses

# op overload name -> {output item: index of the argument whose dtype that output has}
_OUTPUT_DTYPE_OF_ARG = {
    "_native_batch_norm_legit_functional.default": {3: 3, 4: 4},
    "_batch_norm_with_update_functional.default": {4: 3, 5: 4},
}


def real_multi_meta(target, args, multi, meta_of):
    """`multi` (a tuple of TensorMeta) with the real kernel's dtypes; `meta_of` gives an arg Ref's meta."""
    rules = _OUTPUT_DTYPE_OF_ARG.get(getattr(target, "__name__", ""))
    if not rules or not multi:
        return multi
    fixed = list(multi)
    for item, arg in rules.items():
        src = meta_of(args[arg]) if arg < len(args) and args[arg] is not None else None
        if item < len(fixed) and fixed[item] is not None and src is not None and src.dtype != fixed[item].dtype:
            fixed[item] = dataclasses.replace(fixed[item], dtype=src.dtype)
    return tuple(fixed)
