"""Running a placed graph: weights in their homes, inputs and outputs on the user's device.

The graph was traced on host-resident parameters and compiled for the GPU. Per call, every weight argument
is handed to the program where its variant expects it: a GPU-homed weight as its resident copy (made on the
first call, reused while the parameter's version counter is unchanged); a host-homed weight is passed in
pinned host memory -- a CPU subgraph reads it there, and a GPU subgraph that streams it has a transfer step
in its graph right before its first reader (passes/placement_rewrite.py), so the GPU copy lives only until
its last reader. Activations move to the GPU, and
the outputs come back to the device the activations came from.

One ledger (`WeightHomes`) is shared by every graph of one compiled model, so the budget holds across graph
breaks and a weight read by two graphs has one home and one resident copy.
"""
from __future__ import annotations

import threading
import warnings
import weakref

import torch

from .pinning import PINS


def weight_key(t: torch.Tensor):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)


class WeightHomes:
    """Homes and GPU copies of a model's weights under one budget (bytes)."""

    def __init__(self, budget_bytes: int, device="cuda"):
        self.budget = budget_bytes
        self.device = torch.device(device)
        self.homes = {}            # weight key -> "gpu" | "host"
        self.resident = {}         # weight key -> (version, GPU tensor)
        self.pinned = {}           # weight key -> (version, the weight in pinned memory: itself or a copy)
        self.resident_bytes = 0    # bytes of weights given a GPU home (whether copied yet or not)
        self.lock = threading.Lock()
        self.moe = None            # runtime/placed_moe.ModelMoE: the model's hybrid MoE layers, if any
        self.experts_seen = 0      # expert candidates in any of the model's graphs (capture/placement.py)
        self.orphan_warned = False
        self._pins = []            # the tensors this ledger pinned: released (unpinned, let go) with it
        weakref.finalize(self, _release_all, self._pins)

    def claim_extra(self, nbytes: int) -> bool:
        """Reserve GPU bytes that are not a weight (the hybrid layers' streaming buffers), if the budget has them."""
        with self.lock:
            if self.resident_bytes + nbytes > self.budget:
                return False
            self.resident_bytes += nbytes
            return True

    def claim(self, t: torch.Tensor, want: str) -> str:
        """The home of weight t: its known home, else `want` ("gpu" only while the budget has room)."""
        key = weight_key(t)
        with self.lock:
            home = self.homes.get(key)
            if home is None:
                size = t.numel() * t.element_size()
                home = "gpu" if want == "gpu" and self.resident_bytes + size <= self.budget else "host"
                if home == "gpu":
                    self.resident_bytes += size
                self.homes[key] = home
            return home

    def home_of(self, t):
        return self.homes.get(weight_key(t))

    def on_gpu(self, t: torch.Tensor) -> torch.Tensor:
        """The resident copy of a GPU-homed weight (copied again only after the parameter changed)."""
        if t.device.type == "cuda":
            return t
        key = weight_key(t)
        have = self.resident.get(key)
        if have is not None and have[0] == t._version:
            return have[1]
        copy = t.detach().to(self.device, non_blocking=t.is_pinned())
        self.resident[key] = (t._version, copy)
        return copy

    def host(self, t: torch.Tensor) -> torch.Tensor:
        """t in pinned memory: its own storage registered with CUDA where possible, else one pinned copy --
        through the process-wide registry the hybrid MoE layer uses too, so a storage is registered once
        however many compiled models read it (a second registration is an error CUDA reports later)."""
        if t.device.type != "cpu" or t.is_pinned():
            return t
        key = weight_key(t)
        have = self.pinned.get(key)
        if have is not None and have[0] == t._version:
            return have[1]
        if have is None:
            self._pins.append(t.detach())
            pinned = PINS.pin(self._pins[-1])
        else:                      # changed since: the registry refreshes its copy (one reference per weight)
            pinned = PINS.pin(t.detach())
            PINS.release(t.detach())
        self.pinned[key] = (t._version, pinned)
        return pinned

    def gpu_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for _, c in self.resident.values())


class PlacedProgram:
    """Calls one of a graph's compiled variants with each argument where that variant reads it.

    variants: name -> (program, slots), slots[i] one of "activation", "resident", "host",
    "other" for graph input i. choose(args) -> variant name (from homes and the call's token count).
    """
    _boxed_call = True

    def __init__(self, variants: dict, choose, homes: WeightHomes, weight_slots, plan=None):
        self.variants = variants
        self.choose = choose
        self.homes = homes
        self.weight_slots = list(weight_slots)
        self.plan = plan
        self.calls = {name: 0 for name in variants}
        self.program = next(iter(variants.values()))[0]     # for reports: the first variant

    def __call__(self, args):
        args = list(args) if not isinstance(args, list) else args
        name = self.choose(args)
        program, slots = self.variants[name]
        if self.calls[name] == 1 and getattr(self, "orphan_routers", None):
            self._warn_orphan_routers()
        self.calls[name] += 1
        back = None
        homes = self.homes
        moved = []
        for i, (a, slot) in enumerate(zip(args, slots)):
            if not isinstance(a, torch.Tensor):
                moved.append(a)
            elif slot == "activation":
                if a.device.type != "cuda":
                    back = a.device
                    a = a.to(homes.device, non_blocking=True)
                moved.append(a)
            elif slot == "resident":
                moved.append(homes.on_gpu(a))
            elif slot == "host":
                moved.append(homes.host(a))
            else:
                moved.append(a)
        args.clear()
        outs = program(moved)
        if back is None:
            return outs
        return [o.to(back) if isinstance(o, torch.Tensor) and o.device.type == "cuda" else o for o in outs]


    def _warn_orphan_routers(self):
        """By a graph's second call every graph of the model has compiled: if this one routes to experts and no
        graph holds any, they ran outside the compiled graphs -- unplaced, where their weights are."""
        homes = self.homes
        if homes.experts_seen or homes.orphan_warned:
            return
        homes.orphan_warned = True
        r = self.orphan_routers[0]
        warnings.warn("fusebackend: gpu_memory_budget: a router (top-%s of %d experts%s) was compiled but no "
                      "compiled graph holds its experts: Dynamo ran them outside the graphs, so they are not "
                      "placed and compute where their weights are (host memory: on the CPU). transformers 5.x "
                      "runs experts so with experts_implementation='eager'; set "
                      "model.config._experts_implementation = 'grouped_mm' to have them placed"
                      % (r.top_k, r.experts, ", at %s" % r.label if r.label else ""), stacklevel=3)


def _release_all(tensors):
    for t in tensors:
        PINS.release(t)
    tensors.clear()
