"""Helpers shared by the zoo tests: which backend to test, comparisons, one training step."""
from __future__ import annotations

import copy
import importlib
import os

import pytest
import torch

# Which backend the zoo tests compile with. "fuse" is the point; "aot_eager" or "inductor" are useful to check
# the tests themselves (or to compare) while the fuse backend is missing or broken.
BACKEND_ENV = "FUSEBACKEND_ZOO_BACKEND"

F32_RTOL = 1e-5  # ||compiled - eager|| / ||eager|| for float32 (DESIGN.md, correctness rules)
LOW_PRECISION_FACTOR = 3.0  # bf16/fp16: compiled may be this many times further from float64 than eager is
LOW_PRECISION_FLOOR = 2.0**-8  # ... and never needs to beat one bf16 rounding step


def backend_name() -> str:
    return os.environ.get(BACKEND_ENV, "fuse")


def require_backend(name: str) -> None:
    """Fail clearly when the named backend is not registered with Dynamo."""
    if name == "fuse":
        # Registration happens on import where the package is not pip-installed (no entry point).
        for module in ("fusebackend", "fusebackend.capture.backend"):
            try:
                importlib.import_module(module)
            except ImportError:
                pass
    known = torch._dynamo.list_backends(exclude_tags=())
    if name not in known:
        pytest.fail(
            f"torch.compile backend {name!r} is not registered (known: {', '.join(known)}). "
            f"Set {BACKEND_ENV}=aot_eager to run the zoo tests against another backend.",
            pytrace=False,
        )


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64; 0 when both are zero."""
    a, e = actual.detach().double(), expected.detach().double()
    diff = (a - e).norm().item()
    ref = e.norm().item()
    if ref == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / ref


def assert_rel_close(actual, expected, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != eager {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != eager {expected.dtype}"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def assert_low_precision_close(actual, eager, ref64, what: str) -> None:
    """bf16/fp16: compiled must be about as close to a float64 reference as eager is."""
    assert actual.shape == eager.shape and actual.dtype == eager.dtype, (
        f"{what}: {tuple(actual.shape)} {actual.dtype} != eager {tuple(eager.shape)} {eager.dtype}"
    )
    eager_err = rel_err(eager, ref64)
    compiled_err = rel_err(actual, ref64)
    bound = max(LOW_PRECISION_FACTOR * eager_err, LOW_PRECISION_FLOOR)
    assert compiled_err <= bound, (
        f"{what}: compiled is {compiled_err:.3e} from the float64 reference, eager {eager_err:.3e} "
        f"(allowed {bound:.3e})"
    )


def float64_reference(model: torch.nn.Module, inputs: tuple) -> torch.Tensor:
    """The same weights (exactly, as float64 holds any bf16/fp16 value) run in float64 by eager PyTorch."""
    ref_model = copy.deepcopy(model).double()
    ref_inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    with torch.no_grad():
        return ref_model(*ref_inputs)


def train_step(model: torch.nn.Module, inputs: tuple, out_weight: torch.Tensor, run=None) -> dict:
    """One forward + backward through `run` (default: the model itself; e.g. a torch.compile wrapper of it).

    Returns everything a correct backend must reproduce. The loss is computed in out_weight's dtype
    (float32, or float64 for a reference step).
    """
    inputs = tuple(t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs)
    out = (model if run is None else run)(*inputs)
    # A random weighting of the output, so every output element's gradient differs (a plain sum or mean
    # would hide transposed or broadcast mistakes in the backward).
    terms = out.to(out_weight.dtype) * out_weight
    loss = terms.sum()
    loss.backward()
    return {
        "out": out.detach(),
        "loss": loss.detach(),
        # The loss is a sum with cancellation, so its own relative error can be far above the output's;
        # it is compared against the sum of the magnitudes of its terms instead.
        "loss_scale": terms.detach().abs().sum(),
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "input_grads": [t.grad for t in inputs],
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
    }


def float64_train_step(model: torch.nn.Module, inputs: tuple, out_weight: torch.Tensor) -> dict:
    ref_model = copy.deepcopy(model).double().train()
    ref_inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    return train_step(ref_model, ref_inputs, out_weight.double())


def _flatten(step: dict) -> dict:
    """name -> tensor (or None) for everything compared one by one."""
    flat = {"forward output": step["out"]}
    flat.update({f"grad of {n}": g for n, g in step["grads"].items()})
    flat.update({f"grad of input {i}": g for i, g in enumerate(step["input_grads"])})
    flat.update({f"buffer {n} after the step": b for n, b in step["buffers"].items()})
    return flat


def assert_train_step_close(actual: dict, expected: dict, tol: float, reference=None) -> None:
    """Every output, gradient and buffer within `tol` relative norm of eager.

    Some quantities are ill-conditioned: e.g. the gradient of an attention key bias is exactly zero in exact
    arithmetic (softmax ignores a per-row constant), so eager and compiled both hold rounding noise. When
    `reference()` (a float64 step) is given, a quantity that misses `tol` still passes if compiled is no
    further from float64 than LOW_PRECISION_FACTOR times eager's own distance.
    """
    loss_err = (actual["loss"].double() - expected["loss"].double()).abs().item()
    loss_bound = tol * expected["loss_scale"].item()
    assert loss_err <= loss_bound, f"loss: |compiled - eager| = {loss_err:.3e} > {loss_bound:.3e} (tol x sum|terms|)"
    got, want = _flatten(actual), _flatten(expected)
    ref = None
    for what, e in want.items():
        a = got[what]
        assert (a is None) == (e is None), f"{what}: compiled {'has' if a is not None else 'lacks'} it, eager not"
        if e is None:
            continue
        assert a.shape == e.shape and a.dtype == e.dtype, f"{what}: {a.shape} {a.dtype} != eager {e.shape} {e.dtype}"
        if not e.is_floating_point():
            assert torch.equal(a, e), f"{what}: {a} != eager {e}"
            continue
        err = rel_err(a, e)
        if err <= tol:
            continue
        assert reference is not None, f"{what}: relative error {err:.3e} > {tol:.1e}"
        ref = ref or _flatten(reference())
        r = ref[what].double()
        eager_dist = (e.double() - r).norm().item()
        compiled_dist = (a.double() - r).norm().item()
        assert compiled_dist <= LOW_PRECISION_FACTOR * eager_dist, (
            f"{what}: relative error {err:.3e} > {tol:.1e} vs eager; vs float64, compiled is {compiled_dist:.3e} "
            f"away and eager {eager_dist:.3e} (relative to |float64| = {r.norm().item():.3e})"
        )
