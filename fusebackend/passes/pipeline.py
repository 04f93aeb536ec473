"""The passes in the order a compile runs them: FusionGraph -> (groups, horizontal batches)."""
from __future__ import annotations

from .cse import eliminate_common
from .horizontal import batch_horizontal
from .inplace import mark_stores
from .layout import to_channels_last
from .remat import rematerialize
from .remat_scalar import rematerialize_scalars
from .vertical import fuse_vertical


def plan_groups(fg, max_nodes: int, conv_layout: str = "contiguous", kind: str = "inference"):
    """Turn copy_s into graph inputs into stores, give convolutions channels-last layouts where they run
    faster so (kind: forward | backward | inference, as the rule differs for training), merge repeated
    computations, copy generated values and one-element values into their readers, fuse producer->consumer
    chains into groups, then batch independent kernels of one shape (fg is rewritten in place)."""
    mark_stores(fg)
    fg = to_channels_last(fg, conv_layout, training=kind != "inference")
    fg = rematerialize_scalars(rematerialize(eliminate_common(fg)))
    return batch_horizontal(fg, fuse_vertical(fg, max_nodes=max_nodes))
