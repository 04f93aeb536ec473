"""Passes: pure functions from a FusionGraph to groups."""
from .groups import Group
from .vertical import fuse_vertical

__all__ = ["Group", "fuse_vertical"]
