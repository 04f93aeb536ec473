"""Dynamic shapes: SymInt sizes are kernel arguments; recompiles stay bounded; odd strides stay correct."""
import torch
import torch.nn.functional as F

from numerics import assert_matches


def softmax_rows(x, w):
    return torch.softmax(x.view(-1, x.shape[-1]) * w, -1)


def ln_gelu(x, w, b):
    return F.gelu(F.layer_norm(x, (x.shape[-1],), w, b))


def test_dynamic_true_one_graph_for_many_batch_sizes():
    from fusebackend.runtime import cpu_compiler
    compiled = torch.compile(softmax_rows, backend="fuse", dynamic=True)
    w = torch.randn(64)
    compiled(torch.randn(5, 3, 64), w)
    kernels = len(cpu_compiler._loaded)
    torch._dynamo.utils.counters.clear()
    for b in (7, 2, 19, 33):
        assert_matches(softmax_rows, compiled, (torch.randn(b, 3, 64), w))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0      # no recompiles
    assert len(cpu_compiler._loaded) == kernels                            # no new kernels


def test_mark_dynamic_batch_dim():
    compiled = torch.compile(ln_gelu, backend="fuse")
    w, b = torch.randn(96), torch.randn(96)
    for n in (4, 9, 13, 27):
        x = torch.randn(n, 96)
        torch._dynamo.mark_dynamic(x, 0)
        assert_matches(ln_gelu, compiled, (x, w, b))


def test_recompiles_are_bounded_without_dynamic():
    compiled = torch.compile(softmax_rows, backend="fuse")
    w = torch.randn(32)
    torch._dynamo.utils.counters.clear()
    for n in (2, 3, 4, 5, 6, 7, 8, 9):
        assert_matches(softmax_rows, compiled, (torch.randn(n, 32), w))
    # Dynamo marks the changing dim dynamic after the second size: at most a handful of graphs
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3


def test_input_strides_unlike_the_traced_ones():
    f = lambda x, w: torch.softmax(x * w, -1)
    compiled = torch.compile(f, backend="fuse")
    w = torch.randn(48)
    assert_matches(f, compiled, (torch.randn(32, 48), w))          # traced: contiguous
    assert_matches(f, compiled, (torch.randn(48, 32).t(), w))      # transposed layout
    assert_matches(f, compiled, (torch.randn(32, 96)[:, ::2], w))  # strided last dim
