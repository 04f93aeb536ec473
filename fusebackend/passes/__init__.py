"""Passes: pure functions from a FusionGraph to groups."""
from .cse import eliminate_common
from .groups import Group
from .horizontal import Batch, batch_horizontal
from .pipeline import plan_groups
from .remat import rematerialize
from .vertical import fuse_vertical

__all__ = ["Batch", "Group", "batch_horizontal", "eliminate_common", "fuse_vertical", "plan_groups", "rematerialize"]
