"""The pin registry's page bookkeeping (runtime/pinning.py) with CUDA's register/unregister recorded: weights
packed on the host heap share pages, so a set is registered as merged spans and each weight pinned in place."""
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
        span = next(s for s in calls["register"] if s[0] * pinning._PAGE == ptr)
        calls["unregister"].append(span)
        calls["unregistered"].add(span)
    def is_pinned(self):       # as CUDA answers: inside a span registered and not unregistered since
        st = self.untyped_storage()
        a, b = pinning._pages(st.data_ptr(), st.nbytes())
        return any(s[0] <= a and b <= s[1] for s in calls["register"] if s not in calls["unregistered"])
    monkeypatch.setattr(pinning, "_register", register)
    monkeypatch.setattr(pinning, "_unregister", unregister)
    monkeypatch.setattr(torch.Tensor, "is_pinned", is_pinned)
    return calls


def _packed(n=24, numel=700):
    """Small weights: the allocator puts them side by side, several to a page."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(numel, generator=g) for _ in range(n)]


def _share_pages(ts):
    pages = [pinning._pages(t.data_ptr(), t.numel() * 4) for t in ts]
    return any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(pages) for b in pages[i + 1:])


def test_prepared_weights_are_pinned_in_place_in_merged_spans(cuda_calls):
    reg = pinning._PinRegistry()
    ts = _packed()
    if not _share_pages(ts):
        pytest.skip("this allocator gave every weight its own pages")
    spans = reg.prepare(ts + [ts[0][:0]])
    assert 1 <= len(cuda_calls["register"]) == len(spans) < len(ts)
    before = [t.clone() for t in ts]
    pinned = [reg.pin(t) for t in ts]
    assert all(p.data_ptr() == t.data_ptr() for p, t in zip(pinned, ts))      # in place: no copy
    assert all(torch.equal(p, b) for p, b in zip(pinned, before))
    assert len(cuda_calls["register"]) == len(reg.clusters)
    reg.drop_unused(spans)                 # every span holds a weight: none dropped
    assert cuda_calls["unregister"] == []
    for t in ts[:-1]:
        reg.release(t)
    assert sorted(cuda_calls["unregister"]) == sorted(s for s in cuda_calls["register"] if s not in
                                                      [tuple(c[:2]) for c in reg.clusters])
    reg.release(ts[-1])
    assert sorted(cuda_calls["unregister"]) == sorted(cuda_calls["register"]) and reg.clusters == []


def test_without_prepare_a_weight_sharing_a_registered_page_gets_one_copy(cuda_calls, monkeypatch):
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self.clone())     # no CUDA here
    reg = pinning._PinRegistry()
    ts = _packed()
    pages = [pinning._pages(t.data_ptr(), t.numel() * 4) for t in ts]
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
    assert reg.entries == {} and reg.clusters == [] and len(cuda_calls["unregister"]) == 1


def test_a_prepared_span_no_weight_took_is_dropped(cuda_calls):
    reg = pinning._PinRegistry()
    ts = _packed(4, 5000)
    spans = reg.prepare(ts)
    assert spans and all(t.is_pinned() for t in ts)
    reg.drop_unused(spans)
    assert sorted(cuda_calls["unregister"]) == sorted(tuple(c[:2]) for c in spans) and reg.clusters == []
    assert not any(t.is_pinned() for t in ts)
