"""Passes: pure functions from a FusionGraph to groups."""
from .groups import Group
from .horizontal import Batch, batch_horizontal
from .remat import rematerialize
from .vertical import fuse_vertical

__all__ = ["Batch", "Group", "batch_horizontal", "fuse_vertical", "rematerialize"]
