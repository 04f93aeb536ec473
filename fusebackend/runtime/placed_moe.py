"""The `fusebackend::moe_experts` ops of a placed model, bound to hybrid CPU/GPU MoE layers.

The placement pass rewrote each complete MoE layer into one op (passes/placement_moe.py); here each op's key
gets a HybridMoELayer (runtime/hybrid_moe.py), made on the op's first call from the expert weights that call
passes (the user's host tensors, pinned in place). Its resident experts are the ones the plan gave a GPU home;
the rest are scheduled per call between the CPU worker and the copy stream by the cost model. One staging pool
(the budget's reserve for streaming) and one cost correction serve every layer of the model, and while a
layer waits for its CPU experts the link prefetches the next layer's likely experts.

FUSEBACKEND_MOE_TRACE=N keeps the last N calls' decisions per layer (explain and `dump` print them).
"""
from __future__ import annotations

import os
import threading
import warnings
import weakref

import torch

from ..graph.moe_op import HANDLERS, expert_triples, reference_moe
from .cost_correction import CostCorrection
from .cpu_worker import CudaApi, StagingPool
from .hybrid_moe import HybridMoELayer


def trace_cap() -> int:
    try:
        return max(0, int(os.environ.get("FUSEBACKEND_MOE_TRACE", "0")))
    except ValueError:
        return 0


class ModelMoE:
    """Every hybrid MoE layer of one compiled model (held by its weight ledger), in first-call order."""

    def __init__(self, profile, staging_slots: int):
        self.profile, self.staging_slots = profile, staging_slots
        self.layers = []                   # _Binding, in the order their layers first ran
        self.shared = {}                   # expert weights' identity -> HybridMoELayer, one per MoE layer
        self.pools = {}                    # (H, F, dtype) -> StagingPool shared by the model's layers
        self.correction = CostCorrection()
        self.lock = threading.Lock()
        self.api = None

    def pool(self, hidden, ffn, dtype):
        if not self.staging_slots:
            return None
        key = (hidden, ffn, dtype)
        if key not in self.pools:
            self.pools[key] = StagingPool(self.api, hidden, ffn, dtype, self.staging_slots)
        return self.pools[key]

    def after(self, binding):
        """The prefetch hook of `binding`'s calls: the next layer's likely experts, while this one waits."""
        i = self.layers.index(binding) if binding in self.layers else -1
        nxt = self.layers[i + 1].layer if 0 <= i < len(self.layers) - 1 else None
        if nxt is None or nxt.pool is None:
            return None
        cur = binding.layer                # its expected end bounds the link's idle window (prefetch_gain)
        return lambda: nxt.prefetch(nxt.likely(len(nxt.pool.bufs)), until=cur.expected_end)

    def traces(self) -> list:
        seen, out = set(), []
        for b in self.layers:              # a layer shared by several graphs' ops is reported once
            if b.layer is not None and b.layer.tracing and id(b.layer) not in seen:
                seen.add(id(b.layer))
                out.append((b.key, b.layer.collect_trace()))
        return out


class _Binding:
    """The handler of one moe_experts key: builds its HybridMoELayer on the first call."""

    def __init__(self, model: ModelMoE, key: int, resident):
        self.model, self.key, self.resident = model, key, list(resident)
        self.layer, self.ident, self.failed = None, None, None

    def forward(self, hidden, idx, weights, experts, layout=0):
        if self.failed is not None:
            return reference_moe(hidden, idx, weights, experts, layout)
        try:
            ident = tuple(t.data_ptr() for t in experts[:1])
            if self.layer is None or ident != self.ident:
                self._build(hidden, expert_triples(experts, layout), ident)
            hook = self.model.after(self)
            with torch.profiler.record_function("fusebackend.hybrid_moe"):     # its share of a profiled call
                return self.layer.forward(hidden, idx, weights.reshape(idx.shape), after_issue=hook)
        except torch.cuda.OutOfMemoryError:
            raise                        # a budget overrun is the caller's to see, not to hide in a fallback
        except Exception as e:           # the layer cannot run: its formula, each expert copied as it is read
            self.failed = "%s: %s" % (type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            warnings.warn("fusebackend: the hybrid MoE layer (moe_experts key %d) failed (%s); it runs as plain "
                          "ATen calls from now on, streaming each routed expert's weights" % (self.key, self.failed))
            return reference_moe(hidden, idx, weights, experts, layout)

    def _build(self, hidden, trios, ident):
        m = self.model
        with m.lock:
            if m.api is None:
                m.api = CudaApi(hidden.device)
            ffn, h = trios[0][0].shape
            cap = trace_cap()
            full = (ident, len(trios)) + tuple(t.data_ptr() for t in trios[-1])
            layer = m.shared.get(full)
            if layer is None:
                pool = m.pool(h, ffn, trios[0][0].dtype)
                layer = HybridMoELayer(trios, resident=self.resident, profile=m.profile, api=m.api,
                                       staging=pool, staging_slots=0, scheduler=None if pool else _cpu_only,
                                       correction=m.correction, trace=bool(cap), trace_cap=cap or 1024)
                m.shared[full] = layer
                # its pinned homes and resident copies are released with the model's ledger
                weakref.finalize(m, layer.close)
            else:
                # another graph of the model (prefill and decode graphs) runs the same MoE layer: one set of
                # resident experts, one popularity score; experts this graph's plan homed on the GPU join them
                more = [e for e in self.resident if e not in layer.gpu]
                if more:
                    layer.capacity += len(more)
                    layer.set_resident(sorted(layer.gpu) + more, max_swaps=len(more))
                    layer.swaps -= len(more)
            old = self.layer
            self.layer, self.ident = layer, ident
            if old is not None and old is not layer and all(b.layer is not old for b in m.layers):
                # the op's weights were replaced and no other graph runs the old ones: let their pins go
                m.shared = {k: v for k, v in m.shared.items() if v is not old}
                old.close()
            if self not in m.layers:
                m.layers.append(self)


def bind(model: ModelMoE, key: int, resident) -> _Binding:
    """Install the handler of op key `key`; the caller keeps the returned binding alive (HANDLERS is weak)."""
    b = _Binding(model, key, resident)
    HANDLERS[key] = b
    return b


def _cpu_only(profile, experts, hidden, ffn, dtype, allow_split=False, link_busy_s=0.0, cpu_fixed_s=0.0):
    """The scheduler of a layer with no staging room (the budget held none): the link is never chosen."""
    from ..passes.cost_schedule import schedule_experts
    return schedule_experts(profile, experts, hidden, ffn, dtype, allow_split=False, link=False,
                            cpu_fixed_s=cpu_fixed_s)
