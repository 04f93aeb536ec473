"""Graph layer: the FusionGraph, the ATen op registry and FX lowering."""
from .fusion_graph import FusionGraph, OpNode, Ref, TensorMeta
from .lower import lower

__all__ = ["FusionGraph", "OpNode", "Ref", "TensorMeta", "lower"]
