"""What an emitter hands the runtime: kernel text plus how to call it (no compiling here)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class KernelSource:
    """One generated kernel.

    Calling convention (both targets): a pointer array (inputs in `inputs` order, then outputs in
    `outputs` order) and an int64 array `meta`: the domain sizes, then for each operand its strides, then
    the value of each symbolic int in `scalars` (read from the environment every call).
    `unit_strides` lists (slot, dim) pairs the code assumes are 1; the runtime checks them once.
    """
    name: str
    target: str                 # "cpu" | "cuda"
    kind: str                   # "pointwise" | "reduction"
    source: str
    inputs: list                # Refs, in pointer order
    outputs: list               # node names, in pointer order (after the inputs)
    domain: tuple               # iteration sizes (ints, or symbol text for dynamic dims)
    reduce_dims: tuple = ()
    scalars: list = field(default_factory=list)   # Refs of symbolic ints passed by value after the strides
    operand_ranks: tuple = ()   # rank of each operand (its strides follow the domain sizes in meta)
    unit_strides: tuple = ()
    contiguous_slots: tuple = ()   # operands indexed by the linear index (must be contiguous)
    launch: dict = field(default_factory=dict)   # target-specific launch hints (CUDA block size, ...)
    # Entry point running many problems of this kernel in one launch (horizontal fusion), if emitted:
    # batch(P, M, nprob, nptr, nmeta) with problem p's pointers at P + p*nptr and meta at M + p*nmeta.
    batch_name: str = ""
    # The kernel reads through an index tensor (embedding, gather): an index out of range traps on CUDA
    # and, on the CPU, sets the library's `fb_index_error`, which the runtime raises as IndexError.
    checks_index: bool = False

    @property
    def num_meta(self) -> int:
        """Length of the meta array: domain sizes, every operand's strides, the symbolic ints (at least 1)."""
        return max(1, len(self.domain) + sum(self.operand_ranks) + len(self.scalars))

    @property
    def num_operands(self) -> int:
        return len(self.inputs) + len(self.outputs)
