"""Shape helpers shared by the fusion passes (dims are ints or symbol text)."""
from __future__ import annotations


def fits(shape: tuple, domain: tuple) -> bool:
    """True when `shape` broadcasts to `domain` (right-aligned; each dim equal or 1)."""
    if len(shape) > len(domain):
        return False
    off = len(domain) - len(shape)
    return all(s == 1 or s == domain[off + i] for i, s in enumerate(shape))


def outer_shapes(domain: tuple, reduce_dims: tuple) -> tuple:
    """The two shapes a per-row value can have: reduced dims kept as 1, and reduced dims dropped."""
    keep = tuple(1 if i in reduce_dims else s for i, s in enumerate(domain))
    drop = tuple(s for i, s in enumerate(domain) if i not in reduce_dims)
    return keep, drop


def is_per_row(shape: tuple, domain: tuple, reduce_dims: tuple) -> bool:
    """A value that is constant along the reduced dims (evaluated once per row)."""
    if shape in outer_shapes(domain, reduce_dims)[1:] and len(shape) != len(domain):
        return True
    off = len(domain) - len(shape)
    return all(shape[d - off] == 1 for d in reduce_dims if d - off >= 0)


def squeeze_ones(shape: tuple) -> tuple:
    return tuple(s for s in shape if s != 1)
