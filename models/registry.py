"""The zoo's entry type and the seeding rules every model family shares."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

SIZES = ("small", "bench")


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    # fork_rng so that building a model never disturbs the caller's RNG streams.
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        yield


def _jitter_1d_params(model: nn.Module, gen: torch.Generator) -> None:
    """Norm weights start at 1 and biases near 0: a backend that drops them would still pass.

    A small random offset on every 1-D parameter makes such bugs visible.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and p.is_floating_point():
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                p.add_(0.1 * noise.to(device=p.device, dtype=p.dtype))


def input_generator(seed: int) -> torch.Generator:
    """Inputs are drawn on the CPU so a seed gives the same inputs on every device."""
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo.

    configs: size name -> a config object (a dataclass for the plain-PyTorch models).
    build(cfg) -> nn.Module, float32, on the current default device.
    inputs(cfg, gen) -> tuple of CPU tensors, floating ones in float32.
    dynamo_config: torch._dynamo.config settings to compile this entry under
        (`with torch._dynamo.config.patch(**entry.dynamo_config): ...` around compiling and the first call).
    """

    name: str
    description: str
    trainable: bool
    configs: Mapping[str, Any]
    build: Callable[[Any], nn.Module]
    inputs: Callable[[Any, torch.Generator], tuple]
    dynamo_config: Mapping[str, Any] = field(default_factory=dict)

    def config(self, size: str = "small") -> Any:
        if size not in self.configs:
            raise ValueError(f"zoo model {self.name!r}: size must be one of {sorted(self.configs)}, got {size!r}")
        return self.configs[size]

    def make_inputs(self, size="small", device="cpu", dtype=torch.float32, seed=0) -> tuple:
        """Fresh example inputs only (integer inputs keep their dtype)."""
        cfg = self.config(size)
        out = []
        for t in self.inputs(cfg, input_generator(seed)):
            t = t.to(dtype) if t.is_floating_point() else t
            out.append(t.to(device))
        return tuple(out)

    def make(self, size="small", device="cpu", dtype=torch.float32, seed=0) -> tuple[nn.Module, tuple]:
        """(model in eval mode, example inputs); the same seed gives the same weights on a device."""
        cfg = self.config(size)
        dev = torch.device(device)
        # Build directly on the target device: bench-size weights are too big to initialise on the CPU.
        with _seeded(seed, dev), dev:
            model = self.build(cfg)
        _jitter_1d_params(model, torch.Generator().manual_seed(seed + 1))
        model = model.to(dtype=dtype).eval()
        return model, self.make_inputs(size, dev, dtype, seed)
