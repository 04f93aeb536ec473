"""Dynamic dims at run time: symbol values come from the graph's SymInt inputs; dim text is evaluated."""
from __future__ import annotations

import re

_SAFE = re.compile(r"^[\w\s\*\+\-\(\)]+$")


class SymbolEval:
    """Evaluates dims held as symbol text (e.g. 's0*64') from the SymInt placeholders in the environment."""

    def __init__(self, symbols: dict):
        self.symbols = dict(symbols)              # symbol text -> placeholder name
        self._code: dict = {}

    def can_eval(self, dim) -> bool:
        if isinstance(dim, int):
            return True
        names = set(re.findall(r"[A-Za-z_]\w*", dim))
        return bool(_SAFE.match(dim)) and names <= set(self.symbols)

    def values(self, env) -> dict:
        return {sym: int(env[name]) for sym, name in self.symbols.items()}

    def dim(self, d, values) -> int:
        if isinstance(d, int):
            return d
        code = self._code.get(d)
        if code is None:
            code = self._code[d] = compile(d, "<dim>", "eval")
        return int(eval(code, {"__builtins__": {}}, values))

    def dims(self, dims, values) -> tuple:
        return tuple(self.dim(d, values) for d in dims)
