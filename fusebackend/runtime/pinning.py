"""Host weights in page-locked memory: their own storage registered with CUDA where the allocator allows, else one
pinned copy; one process-wide registry, so a storage is registered once however many layers and compiled
models read it (a second registration of the same pages is an error CUDA reports later)."""
from __future__ import annotations

import threading

import torch

_ALREADY_REGISTERED = 712      # cudaErrorHostMemoryAlreadyRegistered: someone else pinned it; usable, not ours
_PAGE = 4096


def _pages(ptr, nbytes):
    return ptr // _PAGE, -(-(ptr + nbytes) // _PAGE)


class _PinRegistry:
    """One pinned home per host storage.

    CUDA registers whole pages, and a host allocator packs tensors of a few MiB back to back on its heap, so two
    weights often share a page: registered one by one, the second is refused. `prepare(tensors)` registers the
    merged page span of a set of weights once (a cluster), and each of them is then pinned in place inside it;
    a cluster is unregistered when its last weight is released.

    An entry holds the storage itself, so its address cannot be reused by another tensor while the entry lives
    (a pinned copy found by the address of a freed weight would be another weight's values). A pinned copy
    (registration refused) is refreshed when the tensor's version moved since it was taken."""

    def __init__(self):
        self.lock = threading.Lock()
        self.entries = {}           # storage data_ptr -> [pinned base (uint8), cluster or None, refs, original
                                    #                      (uint8 view of the storage), version copied]
        self.clusters = []          # [first page, end page, weights pinned in it] of every span we registered

    def _cluster_of(self, pages):
        """The cluster holding these pages whole, False if one overlaps them only in part, None if none does."""
        for c in self.clusters:
            if c[0] <= pages[0] and pages[1] <= c[1]:
                return c
            if c[0] < pages[1] and pages[0] < c[1]:
                return False
        return None

    def _register_span(self, pages):
        code = _register(pages[0] * _PAGE, (pages[1] - pages[0]) * _PAGE)
        if code == 0:
            c = [pages[0], pages[1], 0]
            self.clusters.append(c)
            return c
        return None if code is None else True          # True: pinned by someone else, usable as is

    def prepare(self, tensors):
        """Register, as few spans, the pages of those of `tensors` not yet pinned (overlapping spans merged).
        Returns the spans registered; pass them to drop_unused once the tensors are pinned: a registered span
        no weight holds could be freed and remapped under CUDA's feet."""
        made = []
        with self.lock:
            spans = []
            for t in tensors:
                st = t.untyped_storage()
                if t.device.type != "cpu" or st.data_ptr() in self.entries or not st.nbytes() or t.is_pinned():
                    continue
                spans.append(list(_pages(st.data_ptr(), st.nbytes())))
            merged = []
            for s in sorted(spans):
                if merged and s[0] < merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], s[1])
                else:
                    merged.append(s)
            for s in merged:
                if self._cluster_of(tuple(s)) is None:
                    c = self._register_span(tuple(s))
                    if isinstance(c, list):
                        made.append(c)
        return made

    def pin(self, t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        with self.lock:
            ent = self.entries.get(ptr)
            if ent is None:
                orig = torch.empty(0, dtype=torch.uint8).set_(st)
                base, cluster = orig, None
                pages = _pages(ptr, st.nbytes())
                found = self._cluster_of(pages) if st.nbytes() else None
                if isinstance(found, list):             # inside a span we registered (ours report is_pinned too)
                    cluster = found
                elif t.is_pinned():                     # someone else's page-locked memory, used as is
                    pass
                elif found is False:                    # shares a page with one of our spans: cannot register
                    base = orig.pin_memory()
                else:
                    c = self._register_span(pages)
                    if c is None:
                        base = orig.pin_memory()        # refused: one pinned copy, not more
                    elif isinstance(c, list):
                        cluster = c
                if cluster is not None:
                    cluster[2] += 1
                ent = self.entries[ptr] = [base, cluster, 0, orig, t._version]
            elif ent[0].data_ptr() != ptr and ent[4] != t._version:
                ent[0].copy_(ent[3])                    # the weight changed since its copy was taken
                ent[4] = t._version
            ent[2] += 1
        bst = ent[0].untyped_storage()
        if bst.data_ptr() == ptr:
            return t
        return torch.empty(0, dtype=t.dtype).set_(bst, t.storage_offset(), t.size(), t.stride())

    def release(self, t):
        """Drop one reference taken by pin(t) (t: the original tensor); a cluster is unregistered when the last
        weight in it goes."""
        ptr = t.untyped_storage().data_ptr()
        with self.lock:
            ent = self.entries.get(ptr)
            if ent is None:
                return
            ent[2] -= 1
            if ent[2] > 0:
                return
            del self.entries[ptr]
            c = ent[1]
            if c is not None:
                c[2] -= 1
                if c[2] <= 0:
                    self.clusters.remove(c)
                    _unregister(c[0] * _PAGE)

    def drop_unused(self, spans):
        """Unregister those of `spans` (from prepare) that no weight ended up in."""
        with self.lock:
            for c in spans:
                if c[2] <= 0 and any(x is c for x in self.clusters):
                    self.clusters.remove(c)
                    _unregister(c[0] * _PAGE)


def _register(ptr, nbytes):
    """cudaHostRegister in place; returns the code when usable (0 or already registered), else None."""
    try:
        rt = torch.cuda.cudart()
        code = int(rt.cudaHostRegister(ptr, nbytes, 0))
    except Exception:           # a build without the binding: fall back to a copy
        return None
    if code != 0:               # a refused registration must not surface later as a kernel launch's error
        clear = getattr(rt, "cudaGetLastError", None)
        if clear is not None:
            clear()
    return code if code in (0, _ALREADY_REGISTERED) else None


def _unregister(ptr):
    rt = torch.cuda.cudart()
    if int(rt.cudaHostUnregister(ptr)) != 0:        # must not surface later as another call's error
        clear = getattr(rt, "cudaGetLastError", None)
        if clear is not None:
            clear()


PINS = _PinRegistry()
