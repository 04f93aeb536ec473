"""Takes (graph/indexing.py): embedding, gather, index_select and x[idx] read their source where an index
tensor points, inside fused kernels -- the embeddings and the layer norm of a BERT input are one kernel. An
index out of range raises IndexError, as eager does."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import numerics
import fusebackend


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def bert_embeddings(ids, types, word, pos, typ, w, b):
    s = ids.shape[1]
    h = F.embedding(ids, word) + F.embedding(types, typ) + F.embedding(torch.arange(s), pos)
    return F.layer_norm(h, (word.shape[1],), w, b, 1e-12)


def _bert_args(dtype=torch.float32, g=None):
    g = g or _g()
    return (torch.randint(0, 100, (3, 12), generator=g), torch.randint(0, 2, (3, 12), generator=g),
            torch.randn(100, 64, generator=g).to(dtype), torch.randn(12, 64, generator=g).to(dtype),
            torch.randn(2, 64, generator=g).to(dtype), torch.randn(64, generator=g).to(dtype),
            torch.randn(64, generator=g).to(dtype))


def _kernels(fn, *args):
    rep = fusebackend.explain(fn, *args)
    return [g for g in rep.groups if g["kind"] in ("pointwise", "reduction")], rep


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bert_embeddings_and_layer_norm_are_one_kernel(dtype):
    kernels, rep = _kernels(bert_embeddings, *_bert_args(dtype))
    assert len(kernels) == 1 and rep.num_aten_calls == 0, rep.groups
    assert sum(o.startswith("embedding") for o in kernels[0]["ops"]) == 3
    torch._dynamo.reset()
    numerics.assert_matches(bert_embeddings, torch.compile(bert_embeddings, backend="fuse"), _bert_args(dtype, _g(1)))


CASES = {
    "gather": (lambda x, i: torch.gather(x.exp(), 1, i) * 2 + x[:, :3],
               lambda g: (torch.randn(4, 5, generator=g), torch.randint(0, 5, (4, 3), generator=g))),
    "gather_dim0_int32": (lambda x, i: torch.gather(x, 0, i) - 1,
                          lambda g: (torch.randn(6, 5, generator=g), torch.randint(0, 6, (2, 5), generator=g).int())),
    "index_select": (lambda x, i: torch.index_select(x, 1, i).sigmoid(),
                     lambda g: (torch.randn(3, 6, 5, generator=g), torch.tensor([5, 0, 2, 2]))),
    "index_negative": (lambda x, i: x[i] + 1, lambda g: (torch.randn(6, 5, generator=g), torch.tensor([[-1, 0], [2, 5]]))),
    "embedding_bf16": (lambda i, w: F.embedding(i, w) * 3,
                       lambda g: (torch.randint(0, 40, (2, 7), generator=g), torch.randn(40, 24, generator=g).bfloat16())),
    # several index tensors, broadcast together, negative ones wrapped; the dims left follow
    "index_two_broadcast": (lambda s, i, j: s[i, j] * 2,
                            lambda g: (torch.randn(5, 6, 7, generator=g), torch.randint(-5, 5, (3, 1), generator=g),
                                       torch.randint(-6, 6, (4,), generator=g))),
    "index_all_dims_int32": (lambda s, i, j: s[i, j].exp(),
                             lambda g: (torch.randn(4, 9, generator=g), torch.randint(0, 4, (2, 3), generator=g).int(),
                                        torch.randint(0, 9, (2, 3), generator=g))),
    "packed_sequence_mask": (lambda c, x: torch.where(_packed_mask(c), x, float("-inf")),
                             lambda g: (torch.randint(0, 2, (3, 16), generator=g).cumsum(-1),
                                        torch.randn(3, 2, 16, 16, generator=g))),
}


def _packed_mask(c):
    """HF's mask for packed sequences: causal, and query and key in the same sequence (c: sequence ids)."""
    b = torch.arange(c.shape[0]).view(-1, 1, 1, 1)
    q = torch.arange(c.shape[1]).view(1, 1, -1, 1)
    kv = torch.arange(c.shape[1]).view(1, 1, 1, -1)
    return (c[b, q] == c[b, kv]) & (kv <= q)


@pytest.mark.parametrize("name", sorted(CASES))
def test_takes_fuse_and_match_eager(name):
    fn, make = CASES[name]
    kernels, rep = _kernels(fn, *make(_g()))
    assert len(kernels) == 1 and rep.num_aten_calls == 0, rep.groups
    torch._dynamo.reset()
    numerics.assert_matches(fn, torch.compile(fn, backend="fuse"), make(_g(1)))


def test_gather_from_a_softmax_is_not_read_at_another_row():
    """A take whose source comes from the row kernel's reduction cannot be computed by that kernel."""
    fn = lambda x, i: torch.gather(torch.softmax(x, -1), 0, i) + 1
    args = (torch.randn(8, 16, generator=_g()), torch.randint(0, 8, (8, 16), generator=_g(1)))
    torch._dynamo.reset()
    numerics.assert_matches(fn, torch.compile(fn, backend="fuse"), args)


@pytest.mark.parametrize("bad", [
    (lambda i, w: F.embedding(i, w) + 1, lambda: (torch.tensor([[1, 40]]), torch.randn(40, 8))),
    (lambda x, i: torch.gather(x, 1, i) * 2, lambda: (torch.randn(4, 5), torch.tensor([[0], [1], [-1], [2]]))),
    (lambda x, i: torch.index_select(x, 0, i) * 2, lambda: (torch.randn(6, 5), torch.tensor([6]))),
    (lambda x, i: x[i] * 2, lambda: (torch.randn(6, 5), torch.tensor([-7]))),
    (lambda x, i: x[i, i + 1] * 2, lambda: (torch.randn(6, 5), torch.tensor([1, 4]))),      # 4 + 1 >= 5
])
def test_index_out_of_range_raises_like_eager(bad):
    fn, make = bad
    with pytest.raises((IndexError, RuntimeError)):
        fn(*make())
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="fuse")
    good = make()
    good = (good[0], good[1].clamp(0, 3)) if good[0].dtype.is_floating_point else (good[0].clamp(0, 3), good[1])
    compiled(*good)                                            # compiles; in range it runs
    with pytest.raises(IndexError, match="out of range"):
        compiled(*make())
    out = compiled(*good)                                      # the flag was cleared: the next call is fine
    torch.testing.assert_close(out, fn(*good))
