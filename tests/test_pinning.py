"""The pin registry's page bookkeeping (runtime/pinning.py) with CUDA's register/unregister recorded: a weight is
registered in place where its pages are its own; one that shares a page with a registered weight gets one pinned
copy, refreshed when the weight changes; the last release unregisters."""
import pytest
import torch

from fusebackend.runtime import pinning


@pytest.fixture
def cuda_calls(monkeypatch):
    calls = {"register": [], "unregister": []}

    def register(ptr, nbytes):
        span = (ptr // pinning._PAGE, -(-(ptr + nbytes) // pinning._PAGE))
        for a, b in calls["register"]:
            if a < span[1] and span[0] < b and (a, b) not in calls["unregistered"]:
                return None         # CUDA refuses pages registered twice
        calls["register"].append(span)
        return 0

    calls["unregistered"] = set()

    def unregister(ptr):
        span = next(s for s in calls["register"] if s[0] <= ptr // pinning._PAGE < s[1]
                    and s not in calls["unregistered"])
        calls["unregister"].append(span)
        calls["unregistered"].add(span)
    def is_pinned(self):       # as CUDA answers: inside a span registered and not unregistered since
        st = self.untyped_storage()
        a, b = _pages(st.data_ptr(), st.nbytes())
        return any(s[0] <= a and b <= s[1] for s in calls["register"] if s not in calls["unregistered"])
    monkeypatch.setattr(pinning, "_register", register)
    monkeypatch.setattr(pinning, "_unregister", unregister)
    monkeypatch.setattr(torch.Tensor, "is_pinned", is_pinned)
    return calls


def _pages(ptr, nbytes):
    return ptr // pinning._PAGE, -(-(ptr + nbytes) // pinning._PAGE)


def _packed(n=24, numel=700):
    """Small weights: the allocator puts them side by side, several to a page."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(numel, generator=g) for _ in range(n)]


def test_a_weight_is_pinned_in_place_and_unregistered_by_its_last_release(cuda_calls):
    reg = pinning._PinRegistry()
    w = _packed(1, 5000)[0]
    assert reg.pin(w).data_ptr() == w.data_ptr() and reg.pin(w).data_ptr() == w.data_ptr()
    assert len(cuda_calls["register"]) == 1 and w.is_pinned()
    reg.release(w)
    assert cuda_calls["unregister"] == [] and w.is_pinned()          # one reference left
    reg.release(w)
    assert cuda_calls["unregister"] == cuda_calls["register"] and not w.is_pinned()
    assert reg.entries == {} and reg.ranges == []


def test_a_weight_sharing_a_registered_page_gets_one_copy(cuda_calls, monkeypatch):
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self.clone())     # no CUDA here
    reg = pinning._PinRegistry()
    ts = _packed()
    pages = [_pages(t.data_ptr(), t.numel() * 4) for t in ts]
    pair = next(((i, j) for i in range(len(ts)) for j in range(i + 1, len(ts))
                 if pages[i][0] < pages[j][1] and pages[j][0] < pages[i][1]
                 and not (pages[i][0] <= pages[j][0] and pages[j][1] <= pages[i][1])), None)
    if pair is None:
        pytest.skip("no two weights share part of a page here")
    first, second = ts[pair[0]], ts[pair[1]]
    assert reg.pin(first).data_ptr() == first.data_ptr()
    copy = reg.pin(second)
    assert copy.data_ptr() != second.data_ptr() and torch.equal(copy, second)
    second.add_(1.0)                       # the weight moved on: the next pin refreshes its copy
    assert torch.equal(reg.pin(second), second)
    reg.release(second), reg.release(second), reg.release(first)
    assert reg.entries == {} and reg.ranges == [] and len(cuda_calls["unregister"]) == 1
