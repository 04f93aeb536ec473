"""The passes in the order a compile runs them: FusionGraph -> (groups, horizontal batches)."""
from __future__ import annotations

from .cse import eliminate_common
from .horizontal import batch_horizontal
from .inplace import mark_stores
from .remat import rematerialize
from .remat_scalar import rematerialize_scalars
from .vertical import fuse_vertical


def plan_groups(fg, max_nodes: int):
    """Turn copy_s into graph inputs into stores, merge repeated computations, copy generated values and
    one-element values into their readers, fuse producer->consumer chains into groups, then batch independent
    kernels of one shape (fg is rewritten in place)."""
    mark_stores(fg)
    fg = rematerialize_scalars(rematerialize(eliminate_common(fg)))
    return batch_horizontal(fg, fuse_vertical(fg, max_nodes=max_nodes))
