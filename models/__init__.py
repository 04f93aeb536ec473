"""The model zoo: small models for tests, the same models at realistic sizes for benchmarks.

    from models import ZOO, get
    model, inputs = get("llama_layer").make(size="small", device="cpu", dtype=torch.float32, seed=0)
    fresh = get("llama_layer").make_inputs(size="small", seed=1)

Every entry has `make`, `make_inputs`, `trainable`, `description` and `configs` (size -> shape config).
"""
from __future__ import annotations

from . import cnn, gpt2, hf, llama, mixtral, mlp, vit
from .registry import SIZES, ZooEntry

ZOO: dict[str, ZooEntry] = {}
for _entry in [mlp.ENTRY, *gpt2.ENTRIES, llama.ENTRY, *mixtral.ENTRIES, vit.ENTRY, cnn.ENTRY, *hf.entries()]:
    ZOO[_entry.name] = _entry
del _entry


def get(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"no zoo model {name!r}; known: {', '.join(ZOO)}") from None


__all__ = ["ZOO", "SIZES", "ZooEntry", "get"]
