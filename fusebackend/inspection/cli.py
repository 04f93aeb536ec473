"""`fusebackend dump TARGET`: compile a model with the fuse backend and show every stage of the chain.

    fusebackend dump llama_layer                        # a model-zoo entry (`fusebackend models` lists them)
    fusebackend dump path/to/file.py:make_model         # make_model() -> (model, example_inputs)
    fusebackend dump gpt2_block --train --svg g.svg     # forward and backward graphs; one SVG per graph
    fusebackend dump mlp --options max_group_nodes=4 --source --out dumps/
    fusebackend dump llama_layer --device cuda --profile  # eager / Inductor / fuse per call: host, GPU, TKLQT

Exit codes: 0 done, 1 the compile or the model itself failed, 2 a usage error (one line on stderr says what
to fix).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
import warnings

from .cli_targets import RunError, UsageError, first_line, load_target, zoo

USAGE_ERROR, RUN_ERROR = 2, 1
DTYPES = {"float32": "float32", "f32": "float32", "fp32": "float32", "float": "float32",
          "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "f16": "float16", "half": "float16", "float64": "float64", "f64": "float64", "double": "float64"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError("%s (see `%s --help`)" % (message, self.prog))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fusebackend", description="fusebackend debugging tools")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="{dump,models}")
    d = sub.add_parser("dump", help="compile a model and show its graphs, fusion groups, fallbacks and kernels",
                       description="Compile TARGET with backend='fuse', run it once and show, for every compiled "
                                   "graph, the ATen graph, the fusion groups, batches, placement, fallbacks and "
                                   "(with --source) the generated kernels.",
                       epilog="examples:\n"
                              "  fusebackend dump llama_layer\n"
                              "  fusebackend dump gpt2_block --train --svg gpt2.svg\n"
                              "  fusebackend dump path/to/model.py:make --device cuda --dtype bf16 --out dumps/\n"
                              "  fusebackend dump mlp --options max_group_nodes=8 --source\n"
                              "Set FUSEBACKEND_DUMP_DIR=DIR to dump every graph of any torch.compile run.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("target", metavar="TARGET",
                   help="a model-zoo name (see `fusebackend models`) or path/to/file.py:factory, where "
                        "factory() returns (model, example_inputs)")
    d.add_argument("--device", help="cpu (default), cuda, cuda:1, ...")
    d.add_argument("--dtype", help="float32 (default), bfloat16, float16, float64")
    d.add_argument("--size", choices=["small", "bench"], default="small", help="zoo model size (default small)")
    d.add_argument("--seed", type=int, default=0, help="seed for weights and inputs (default 0)")
    d.add_argument("--options", action="append", default=[], metavar="KEY=VALUE",
                   help="a backend option (repeatable), e.g. --options max_group_nodes=8")
    d.add_argument("--hardware-profile", metavar="FILE",
                   help="plan placement with this hardware profile (JSON); sets the hardware_profile option")
    d.add_argument("--train", action="store_true", help="run forward and backward: dump the backward graph too")
    d.add_argument("--source", action="store_true", help="print the generated kernel sources")
    d.add_argument("--svg", metavar="FILE", help="draw the graph as SVG (FILE_<i>_<kind>.svg if several graphs)")
    d.add_argument("--dot", metavar="FILE", help="write Graphviz DOT text (same naming as --svg)")
    d.add_argument("--out", metavar="DIR", help="write every graph's .txt/.json/.svg/.dot and kernel sources")
    d.add_argument("--profile", action="store_true",
                   help="then time calls of eager, Inductor and fuse: wall, host, GPU busy and kernel launch-"
                        "plus-queue time (TKLQT) per call, and whether the call is launch- or GPU-bound")
    d.add_argument("--profile-reps", type=int, default=20, metavar="N", help="calls timed per backend (20)")
    d.add_argument("-q", "--quiet", action="store_true", help="do not print the text summary")
    d.add_argument("--traceback", action="store_true", help="show the full traceback when something fails")
    sub.add_parser("models", help="list the model-zoo entries", description="List the model-zoo entries.")
    return p


# ------------------------------------------------------------------------------------------- arguments

def parse_value(text: str):
    """JSON-ish: true/false, null/none, ints, floats, JSON lists/objects, else the string itself."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none"):
        return None
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    if t[:1] in "[{" and t:
        try:
            return json.loads(t)
        except ValueError:
            pass
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        return t[1:-1]
    return t


def parse_options(items) -> dict:
    from ..options import FuseOptions, OptionError
    opts = {}
    for item in items:
        if item.strip().startswith("{"):          # a JSON object of options: '{"gpu_memory_budget": "50%"}'
            try:
                opts.update(json.loads(item))
            except ValueError as e:
                raise UsageError("--options %r is not a JSON object: %s" % (item, e))
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError("--options %r: write KEY=VALUE, e.g. --options max_group_nodes=8" % item)
        opts[key.strip()] = parse_value(value)
    try:
        FuseOptions.from_dict(opts)
    except OptionError as e:
        raise UsageError("--options: %s" % str(e).replace("fusebackend: ", "", 1))
    except TypeError as e:
        raise UsageError("--options: %s" % e)
    return opts


def parse_device(text, plan_only=False):
    import torch
    if text is None:
        return None
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError("--device %r is not a device: use cpu, cuda or cuda:N" % text)
    if dev.type == "cuda" and plan_only:
        return dev
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device %s: CUDA is not available here; use --device cpu" % text)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError("--device %s: only %d CUDA device(s) here" % (text, torch.cuda.device_count()))
    return dev


def parse_dtype(text):
    import torch
    if text is None:
        return None
    name = DTYPES.get(text.lower())
    if name is None:
        raise UsageError("--dtype %r: use one of float32, bfloat16, float16, float64" % text)
    return getattr(torch, name)


# ------------------------------------------------------------------------------------------- running

def _root_cause(e):
    inner = getattr(e, "inner_exception", None)      # torch._dynamo BackendCompilerFailed
    return inner if isinstance(inner, BaseException) else e


def _loss(out):
    import torch
    import torch.utils._pytree as pytree
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not leaves:
        raise UsageError("--train: no output of the model requires grad (does it have trainable parameters?)")
    return sum(t.float().sum() for t in leaves)


def _split_inputs(inputs):
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (list, tuple)):
        return tuple(inputs), {}
    return (inputs,), {}


def compile_and_run(model, inputs, options, train, dynamo_config):
    """Compile with backend='fuse', run once (and backward with train); returns the GraphReports."""
    import torch
    from ..capture import records as report_mod
    from ..capture.backend import fuse
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=fuse, options=options) if options else torch.compile(model, backend=fuse)
    args, kwargs = _split_inputs(inputs)
    if train and isinstance(model, torch.nn.Module):
        model.train()
    grad = torch.enable_grad() if train else torch.no_grad()
    # Compile the backward graph with the forward one, in this thread (else autograd compiles it lazily,
    # on a device thread for CUDA, where this thread's report capture cannot see it).
    eager_bw = (torch._functorch.config.patch(force_non_lazy_backward_lowering=True) if train
                else contextlib.nullcontext())
    with report_mod.collect() as reps, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fusebackend: ")     # fallbacks are listed in the dump
        with torch._dynamo.config.patch(**dynamo_config), eager_bw, grad:
            out = compiled(*args, **kwargs)
            if train:
                _loss(out).backward()
    return list(reps)


def _numbered(path: str, data: dict, many: bool) -> str:
    if not many:
        return path
    stem, ext = os.path.splitext(path)
    return "%s_%d_%s%s" % (stem, data["index"], data["kind"], ext)


def cmd_dump(args) -> int:
    import torch
    from .dump import graph_data, render_text, write_files
    from .dump_dot import render_dot
    from .dump_svg import render_svg
    options = parse_options(args.options)
    if args.hardware_profile:
        options["hardware_profile"] = args.hardware_profile
        parse_options([json.dumps(options)])
    # --device cuda with a budget on a machine without a GPU: plan placement on fake CUDA tensors
    plan_only = options.get("gpu_memory_budget") is not None and not torch.cuda.is_available()
    device, dtype = parse_device(args.device, plan_only), parse_dtype(args.dtype)
    if plan_only and (device is None or device.type != "cuda"):
        raise UsageError("gpu_memory_budget plans a CUDA placement: add --device cuda")
    if plan_only:
        device = None        # the model stays on the CPU; its graphs are planned on fake CUDA tensors
    for flag, path in (("--svg", args.svg), ("--dot", args.dot)):
        if path and os.path.dirname(path) and not os.path.isdir(os.path.dirname(path)):
            raise UsageError("%s %s: folder %s does not exist" % (flag, path, os.path.dirname(path)))
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError("--out %s is a file, not a folder" % args.out)
    if args.profile and (args.train or plan_only):
        raise UsageError("--profile times inference calls on a real device: drop %s"
                         % ("--train" if args.train else "gpu_memory_budget (no GPU here to run it)"))
    if args.profile_reps < 1:
        raise UsageError("--profile-reps %d: give at least 1" % args.profile_reps)
    model, inputs, dynamo_config = load_target(args.target, args.size, device, dtype, args.seed)
    try:
        if plan_only:
            from ..capture.placement import plan_only as planning
            with planning():
                reports = compile_and_run(model, inputs, options, args.train, dynamo_config)
        else:
            reports = compile_and_run(model, inputs, options, args.train, dynamo_config)
    except UsageError:
        raise
    except Exception as e:
        if args.traceback:
            raise
        cause = _root_cause(e)
        raise RunError("compiling/running %s failed: %s: %s (rerun with --traceback for details)"
                       % (args.target, type(cause).__name__, first_line(cause)))
    if not reports:
        raise RunError("%s ran without compiling any graph (nothing for Dynamo to capture?)" % args.target)
    datas = [graph_data(rep, i) for i, rep in enumerate(reports)]
    if not args.quiet:
        dev = str(device or "cpu")
        dt = str(dtype or torch.float32).replace("torch.", "")
        print("fusebackend dump %s (size %s, %s, %s, %s): %d compiled graph(s)"
              % (args.target, args.size, dev, dt, "train" if args.train else "inference", len(datas)))
        if plan_only:
            print("(placement planned on fake CUDA tensors with profile %s: nothing was compiled)"
                  % (options.get("hardware_profile") or "reference H200"))
        for d in datas:
            print()
            sys.stdout.write(render_text(d, sources=args.source))
    if args.profile:
        from .call_profile import compare_backends, format_profiles
        pos, kw = _split_inputs(inputs)
        with torch._dynamo.config.patch(**dynamo_config):
            profiles = compare_backends(model, pos, options, reps=args.profile_reps, kwargs=kw)
        print()
        print(format_profiles(profiles))
    many = len(datas) > 1
    written = []
    for d in datas:
        if args.svg:
            written.append(_write(_numbered(args.svg, d, many), render_svg(d)))
        if args.dot:
            written.append(_write(_numbered(args.dot, d, many), render_dot(d)))
        if args.out:
            written += write_files(d, args.out)
    if written:
        where = args.out if args.out and len(written) > 2 else ", ".join(written)
        print("fusebackend dump: wrote %d file(s): %s" % (len(written), where), file=sys.stderr)
    return 0


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def cmd_models(args) -> int:
    models = zoo()
    width = max(len(n) for n in models.ZOO)
    for name, entry in models.ZOO.items():
        print("%-*s  %s%s" % (width, name, entry.description, "" if entry.trainable else " (not trainable)"))
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    tb = "--traceback" in (sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise UsageError("choose a command: `fusebackend dump TARGET` or `fusebackend models` "
                             "(see `fusebackend --help`)")
        return {"dump": cmd_dump, "models": cmd_models}[args.command](args)
    except SystemExit as e:                      # --help
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:
        print("fusebackend: error: %s" % e, file=sys.stderr)
        return USAGE_ERROR
    except RunError as e:
        print("fusebackend: error: %s" % e, file=sys.stderr)
        return RUN_ERROR
    except KeyboardInterrupt:
        print("fusebackend: interrupted", file=sys.stderr)
        return 130
    except Exception as e:                        # a bug in this tool: say so in one line unless asked
        if tb:
            traceback.print_exc()
        else:
            print("fusebackend: internal error: %s: %s (rerun with --traceback)" % (type(e).__name__, first_line(e)),
                  file=sys.stderr)
        return RUN_ERROR


if __name__ == "__main__":
    sys.exit(main())
