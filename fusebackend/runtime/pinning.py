"""Host weights in page-locked memory: their own storage registered with CUDA where the allocator allows, else one
pinned copy; one process-wide registry, so a storage is registered once however many layers and compiled
models read it (a second registration of the same pages is an error CUDA reports later).

CUDA registers whole pages, and a host allocator packs tensors of a few MiB back to back on its heap: a weight
that shares a page with one registered already gets its one pinned copy. (Registering merged spans of a set of
weights was tried on the H200 on 2026-12-02 and left bfloat16 layers failing with 'invalid argument'; not
understood yet, so not done.)"""
from __future__ import annotations

import threading

import torch

_ALREADY_REGISTERED = 712      # cudaErrorHostMemoryAlreadyRegistered: someone else pinned it; usable, not ours
_PAGE = 4096


class _PinRegistry:
    """One pinned home per host storage however many layers share it (shared experts are pinned once).

    An entry holds the storage itself, so its address cannot be reused by another tensor while the entry lives
    (a pinned copy found by the address of a freed weight would be another weight's values). A pinned copy
    (registration refused) is refreshed when the tensor's version moved since it was taken."""

    def __init__(self):
        self.lock = threading.Lock()
        self.entries = {}           # storage data_ptr -> [pinned base (uint8), registered by us, refs, original
                                    #                      (uint8 view of the storage), version copied]
        self.ranges = []            # (first page, end page) of every range registered in place

    def pin(self, t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        with self.lock:
            ent = self.entries.get(ptr)
            if ent is None:
                orig = torch.empty(0, dtype=torch.uint8).set_(st)
                base, ours = orig, False
                if not t.is_pinned():                   # already page-locked memory is used as is
                    # CUDA registers whole pages: a storage sharing a page with a registered one is refused
                    # (and the refusal would linger as CUDA's last error), so it gets a copy instead
                    pages = (ptr // _PAGE, -(-(ptr + st.nbytes()) // _PAGE))
                    overlap = any(a < pages[1] and pages[0] < b for a, b in self.ranges)
                    code = None if overlap else _register(ptr, st.nbytes())
                    if code == 0:
                        self.ranges.append(pages)
                    if code is None:
                        base = orig.pin_memory()        # registration refused: one pinned copy, not more
                    ours = code == 0                    # ours to unregister only if we registered it
                ent = self.entries[ptr] = [base, ours, 0, orig, t._version]
            elif ent[0].data_ptr() != ptr and ent[4] != t._version:
                ent[0].copy_(ent[3])                    # the weight changed since its copy was taken
                ent[4] = t._version
            ent[2] += 1
        bst = ent[0].untyped_storage()
        if bst.data_ptr() == ptr:
            return t
        return torch.empty(0, dtype=t.dtype).set_(bst, t.storage_offset(), t.size(), t.stride())

    def release(self, t):
        """Drop one reference taken by pin(t) (t: the original tensor); unregister when the last one goes."""
        ptr = t.untyped_storage().data_ptr()
        with self.lock:
            ent = self.entries.get(ptr)
            if ent is None:
                return
            ent[2] -= 1
            if ent[2] <= 0:
                del self.entries[ptr]
                if ent[1]:
                    _unregister(ptr)
                    pages = (ptr // _PAGE, -(-(ptr + ent[3].numel()) // _PAGE))
                    if pages in self.ranges:
                        self.ranges.remove(pages)


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
