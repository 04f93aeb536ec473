"""Where `fusebackend dump TARGET` gets its model: a model-zoo entry or path/to/file.py:factory; and the two
errors every part of the CLI raises."""
from __future__ import annotations

import importlib.util
import inspect
import os
import sys


class UsageError(Exception):
    """A mistake the user can fix: reported as one line, exit code 2."""


class RunError(Exception):
    """The model or the compile failed: reported as one line, exit code 1."""


def first_line(e) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def zoo():
    try:
        import models
    except ImportError:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if not os.path.isdir(os.path.join(root, "models")):
            raise UsageError("the model zoo (package `models`) is not importable: run from the repository root, "
                             "`pip install -e .`, or give TARGET as path/to/file.py:factory")
        sys.path.insert(0, root)
        import models
    return models


def _is_file_target(target: str) -> bool:
    return ":" in target or target.endswith(".py") or os.sep in target or "/" in target


def _load_file_target(target, size, device, dtype, seed):
    path, sep, factory = target.rpartition(":")
    if not sep:
        path, factory = target, ""
    if not factory:
        raise UsageError("TARGET %r names no factory: write it as %s:FACTORY (a callable returning "
                         "(model, example_inputs))" % (target, path or target))
    if not path:
        raise UsageError("TARGET %r names no file: write it as path/to/file.py:%s" % (target, factory))
    if not os.path.isfile(path):
        raise UsageError("no such file: %s (TARGET is a zoo name or path/to/file.py:factory)" % path)
    mod_name = "_fusebackend_target_%d" % (abs(hash(os.path.abspath(path))) % 10**8)
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise UsageError("cannot import %s as Python: give a .py file" % path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise UsageError("importing %s failed: %s: %s" % (path, type(e).__name__, first_line(e)))
    finally:
        sys.path.pop(0)
    fn = getattr(module, factory, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == mod_name)
        raise UsageError("%s has no callable %r%s" % (path, factory,
                                                      "; it defines: %s" % ", ".join(found) if found else ""))
    wanted = {"size": size, "device": device, "dtype": dtype, "seed": seed}
    try:
        params = inspect.signature(fn).parameters
        var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
        kwargs = {k: v for k, v in wanted.items() if v is not None and (var_kw or k in params)}
    except (TypeError, ValueError):
        kwargs = {}
    try:
        result = fn(**kwargs)
    except Exception as e:
        raise RunError("%s:%s() failed: %s: %s" % (path, factory, type(e).__name__, first_line(e)))
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise UsageError("%s:%s() must return (model, example_inputs), got %s"
                         % (path, factory, type(result).__name__))
    model, inputs = result
    if not callable(model):
        raise UsageError("%s:%s() returned a model that is not callable (%s)" % (path, factory, type(model).__name__))
    # a module-level DYNAMO_CONFIG dict: torch._dynamo.config settings the model compiles under
    cfg = dict(getattr(module, "DYNAMO_CONFIG", None) or {})
    return _convert(model, inputs, None if "device" in kwargs else device, None if "dtype" in kwargs else dtype), cfg


def _convert(model, inputs, device, dtype):
    """Move a factory's model/inputs where --device/--dtype ask, when the factory did not take them."""
    import torch
    if device is None and dtype is None:
        return model, inputs

    def move(t):
        if isinstance(t, torch.Tensor):
            cast = dtype is not None and t.is_floating_point()
            return t.to(device=device or t.device, dtype=dtype if cast else t.dtype)
        return t
    if isinstance(model, torch.nn.Module):
        model = model.to(device=device) if device is not None else model
        model = model.to(dtype=dtype) if dtype is not None else model
    if isinstance(inputs, dict):
        return model, {k: move(v) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return model, type(inputs)(move(v) for v in inputs)
    return model, move(inputs)


def load_target(target, size, device, dtype, seed):
    """(model, inputs, dynamo_config) for TARGET."""
    import torch
    if _is_file_target(target):
        (model, inputs), cfg = _load_file_target(target, size, device, dtype, seed)
        return model, inputs, cfg
    models = zoo()
    entry = models.ZOO.get(target)
    if entry is None:
        raise UsageError("unknown model %r: zoo models are %s (or give path/to/file.py:factory)"
                         % (target, ", ".join(models.ZOO)))
    if size not in entry.configs:
        raise UsageError("zoo model %r has no size %r; sizes: %s" % (target, size, ", ".join(entry.configs)))
    try:
        model, inputs = entry.make(size=size, device=device or "cpu", dtype=dtype or torch.float32, seed=seed)
    except ImportError as e:
        raise UsageError("zoo model %r cannot be built here: %s" % (target, first_line(e)))
    except Exception as e:
        raise RunError("building zoo model %r failed: %s: %s" % (target, type(e).__name__, first_line(e)))
    return model, inputs, dict(entry.dynamo_config)
