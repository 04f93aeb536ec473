"""Dynamic dims at run time: symbol values come from the graph's SymInt inputs; dim text is evaluated."""
from __future__ import annotations

import re

_SAFE = re.compile(r"^[\w\s\*\+\-\(\),]+$")
_FUNCS = {"Max": max, "Min": min}             # sympy's spelling in size expressions


def names_in(dim) -> set:
    """The symbols a dim's text reads (its functions aside); none for an int."""
    return set() if isinstance(dim, int) else set(re.findall(r"[A-Za-z_]\w*", dim)) - set(_FUNCS)


class _Values(dict):
    """Symbol values, each read from the environment when first needed (later values may not exist yet)."""

    def __init__(self, sym, env):
        super().__init__()
        self.sym, self.env = sym, env

    def __missing__(self, key):
        if key in self.sym.symbols:
            value = int(self.env[self.sym.symbols[key]])
        else:
            name, item, dim = self.sym.sources[key]
            t = self.env[name] if item is None else self.env[name][item]
            value = int(t.shape[dim])
        self[key] = value
        return value


class SymbolEval:
    """Evaluates dims held as symbol text (e.g. 's0*64'): symbols come from SymInt inputs, or (data-dependent
    sizes) from the shape of the value that first carries them."""

    def __init__(self, symbols: dict, sources: dict | None = None):
        self.symbols = dict(symbols)              # symbol text -> placeholder name
        self.sources = dict(sources or {})        # symbol text -> (node, item, dim)
        self._code: dict = {}

    def can_eval(self, dim) -> bool:
        if isinstance(dim, int):
            return True
        return bool(_SAFE.match(dim)) and names_in(dim) <= set(self.symbols) | set(self.sources)

    def values(self, env) -> dict:
        return _Values(self, env)

    def dim(self, d, values) -> int:
        if isinstance(d, int):
            return d
        code = self._code.get(d)
        if code is None:
            code = self._code[d] = compile(d, "<dim>", "eval")
        return int(eval(code, {"__builtins__": {}, **_FUNCS}, values))

    def dims(self, dims, values) -> tuple:
        return tuple(self.dim(d, values) for d in dims)
