"""Capture with a GPU memory budget: the graph traced on host-resident weights is compiled for the GPU.

The Dynamo graph is retargeted to fake CUDA tensors (capture/fake_cuda.py) and captured by AOT autograd;
each inference graph then goes through the placement passes (patterns -> plan -> rewrite) before the usual
fusion passes, and runs as a PlacedProgram. Without a GPU, `plan_model` does the same on fake tensors and
stops before compiling: `fusebackend dump --device cuda` prints the plan on a CPU machine.
"""
from __future__ import annotations

import functools
import itertools
import os
import re
import threading
import warnings
import weakref

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._guards import detect_fake_mode

from . import decompositions, fake_cuda, records
from .kernels import build_kernels
from ..graph import lower
from ..graph.moe_op import OP as MOE_OP
from ..options import FuseOptions, resolve_budget
from ..passes import plan_groups
from ..passes.hardware_profile import reference_h200
from ..passes.pattern_moe_layer import find_moe_layers
from ..passes.patterns import find_patterns
from ..passes.hybrid_predict import choice_cost_ms, predict_hybrid, routed_pairs
from ..passes.placement import PlacementError, best_offloaded, expert_modes, plan_placement, routed_token_hint
from ..passes.placement_moe import rewrite_layer
from ..passes.placement_rewrite import place_on_cpu, stream_weights
from ..passes.sentinel_masks import drop_impossible_masks
from ..runtime import build_program
from ..runtime.placed import PlacedProgram, WeightHomes

# id(options dict) -> the WeightHomes ledger of one compiled model, held weakly: the model's PlacedPrograms
# hold it (and its resident GPU copies); when they go (torch._dynamo.reset(), the model freed), it goes too.
# The ledger keeps its options dict alive, so while it lives that id cannot be reused by another dict.
_SESSIONS = weakref.WeakValueDictionary()
_LOCK = threading.Lock()
_PLAN_ONLY = threading.local()
_MOE_KEYS = itertools.count(1)
STAGING_SLOTS = 2           # expert-sized streaming buffers a model's hybrid MoE layers share (double-buffering)


def _hybrid_wanted() -> bool:
    # FUSEBACKEND_HYBRID_MOE=0 keeps the simple placed execution (each expert where the plan put it)
    return os.environ.get("FUSEBACKEND_HYBRID_MOE", "1") != "0"


def user_label(placeholder: str) -> str:
    """Dynamo's name for a lifted parameter as the user's module path:
    L_self_modules_layers_modules_0_modules_mlp_parameters_weight_ -> layers.0.mlp.weight."""
    name = re.sub(r"^[Ll]_(self_)?", "", placeholder).rstrip("_")
    return re.sub(r"(^|_)(modules|parameters|buffers)_", ".", name).lstrip(".")


def _ledger(options, budget):
    with _LOCK:
        homes = _SESSIONS.get(id(options))
        if homes is None or homes.options is not options:
            homes = WeightHomes(budget)
            homes.options = options
            _SESSIONS[id(options)] = homes
        return homes


def _profile(opts):
    if opts.hardware_profile is None and getattr(_PLAN_ONLY, "on", False):
        return reference_h200()
    from ..runtime.hardware import load_profile
    return load_profile(opts.hardware_profile)


def fuse_placed(gm, example_inputs, opts: FuseOptions, options):
    """The backend's path when `gpu_memory_budget` is set."""
    plan_only = getattr(_PLAN_ONLY, "on", False)
    if not plan_only and not torch.cuda.is_available():
        warnings.warn("fusebackend: option 'gpu_memory_budget' is ignored: no CUDA device")
        return None
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs):
        raise PlacementError("fusebackend: option 'gpu_memory_budget' places an inference graph; this one "
                             "trains (its inputs require grad): run the model under torch.no_grad() or "
                             "torch.inference_mode(), or leave the option out")
    profile = _profile(opts)
    device_bytes = (torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available()
                    else profile.gpu_memory_bytes)
    homes = _ledger(options, resolve_budget(opts.gpu_memory_budget, device_bytes))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    labels = [user_label(n.name) for n in placeholders]
    weight_idx = [i for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter)]
    runnable = torch.fx.GraphModule(gm, gm.graph.__deepcopy__()) if plan_only else None
    fake = fake_cuda.fake_inputs(detect_fake_mode(example_inputs), example_inputs, gm)
    ctx = dict(opts=opts, profile=profile, homes=homes, labels=labels, weight_idx=weight_idx,
               weights=[example_inputs[i] for i in weight_idx], plan_only=plan_only,
               examples=list(example_inputs))
    compiler = functools.partial(_compile_graph, ctx)
    compiled = aot_autograd(fw_compiler=compiler, inference_compiler=compiler,
                            decompositions=decompositions.table(opts.gemv_max_rows, opts.pad_matmul))(
        fake_cuda.retarget(gm, emulate_cuda_build=not torch.cuda.is_available()), fake)
    return runnable.forward if plan_only else compiled


def _compile_graph(ctx, gm, example_inputs):
    opts, profile, homes = ctx["opts"], ctx["profile"], ctx["homes"]
    fg = lower(gm)
    drop_impossible_masks(fg)          # transformers 5.17's sentinel masks hide its grouped experts
    fg.input_labels = {name: ctx["labels"][i] for i, name in enumerate(fg.inputs) if i < len(ctx["labels"])}
    patterns = find_patterns(fg)
    homes.experts_seen += len(patterns.experts)
    names = [fg.inputs[i] for i in ctx["weight_idx"]]
    sizes = {w: fg.node(w).meta.numel * fg.node(w).meta.dtype.itemsize for w in names}
    known = {w: homes.home_of(t) for w, t in zip(names, ctx["weights"]) if homes.home_of(t)}
    layers = find_moe_layers(fg, patterns) if _hybrid_wanted() else []
    held = getattr(homes, "moe", None)
    slot = 0 if not layers or (held is not None and held.staging_slots) else max(
        c.weight_bytes for L in layers for c in L.experts)
    rows_hint = _rows_hint(ctx, fg, patterns)
    hint, pairs = routed_token_hint(fg, patterns, rows_hint), routed_pairs(fg, patterns, rows_hint)
    shares = {l: dict(enumerate(v)) for l, v in (opts.routing_profile or {}).items()}

    def planned(slots):
        p = plan_placement(fg, patterns, profile, homes.budget, names, sizes,
                           already_resident=homes.resident_bytes, popularity=opts.routing_profile,
                           fixed_homes=known, token_hint=hint, staging_slot_bytes=slot, staging_slots=slots,
                           sliced_layers=[L.layer for L in layers if L.layout == 1])
        p.hybrid_layers = [L.layer for L in layers]
        p.shared_staging_slots = held.staging_slots if held is not None else 0
        predict_hybrid(p, patterns, profile, pairs, shares)
        return p
    # streaming buffers or resident experts: the budget goes to whichever the schedule says is faster, over
    # this call and the decode steps that follow it (the first graph fixes the model's buffers for all of them)
    candidates = [planned(n) for n in range(STAGING_SLOTS, -1, -1)] if slot else [planned(0)]
    decode_rows = next((a.batch for a in patterns.attention if isinstance(a.batch, int)), 1)
    plan = min(candidates, key=lambda p: choice_cost_ms(p, patterns, profile, pairs, decode_rows, shares))
    rep = records.GraphReport(kind="inference", graph=fg)
    rep.placement, rep.patterns = plan, patterns
    rep.ledger = homes          # planning only: the reports keep the model's ledger alive between its graphs
    if not plan.per_call:           # homes are this graph's for good: claim them now (never over budget)
        names_gpu = _expert_names(plan.expert_homes)      # resident slices of 3-D weights: the layer's copies
        sliced = sum(s.bytes for s in plan.subgraphs if s.home == "gpu" and s.name in names_gpu)
        if (plan.staging_slots or sliced) and not homes.claim_extra(plan.staging_bytes + sliced):
            raise PlacementError("fusebackend: option 'gpu_memory_budget' (%d bytes) cannot hold the %d streaming "
                                 "buffers of %d bytes after the graphs compiled before it"
                                 % (homes.budget, plan.staging_slots, plan.staging_bytes // plan.staging_slots))
        for w, t in zip(names, ctx["weights"]):
            if homes.claim(t, plan.input_homes[w]) != plan.input_homes[w]:
                raise PlacementError("fusebackend: option 'gpu_memory_budget' (%d bytes) cannot hold weight "
                                     "%s after the graphs compiled before it" % (homes.budget, fg.input_labels[w]))
    bindings = _hybrid(fg, layers, plan, homes, profile, ctx["plan_only"])
    variants = _variants(gm, fg, plan, patterns, names)
    if ctx["plan_only"]:
        groups, batches = plan_groups(variants[next(iter(variants))][0], opts.max_group_nodes)
        rep.groups, rep.batches = groups, batches
        records.record(rep, opts)
        return _never_run
    built = {}
    for key, (vfg, slots) in variants.items():
        groups, batches = plan_groups(vfg, opts.max_group_nodes)
        kernels = build_kernels(vfg, groups, opts, rep)
        built[key] = (build_program(vfg, groups, kernels, opts, batches), slots)
        if key == next(iter(variants)):
            rep.graph, rep.groups, rep.batches = vfg, groups, batches
    program = PlacedProgram(built, _chooser(plan, patterns, profile, homes, names, fg), homes,
                            [fg.inputs.index(w) for w in names], plan)
    program.moe_bindings = bindings      # the handlers of its moe_experts ops live as long as it does
    program.orphan_routers = [] if patterns.experts else list(patterns.routers)
    rep.moe = homes.moe if bindings else None
    rep.program = built[next(iter(built))][0]
    records.record(rep, opts)
    return program


def _hybrid(fg, layers, plan, homes, profile, plan_only):
    """Each complete MoE layer becomes one moe_experts op bound to a hybrid layer of the model."""
    if not layers:
        return []
    if not plan_only and getattr(homes, "moe", None) is None:
        from ..runtime.placed_moe import ModelMoE
        homes.moe = ModelMoE(profile, plan.staging_slots)
    out = []
    for layer in layers:
        key = next(_MOE_KEYS)
        resident = _resident_experts(layer, plan)
        rewrite_layer(fg, layer, key)
        if not plan_only:
            from ..runtime.placed_moe import bind
            out.append(bind(homes.moe, key, resident))
    return out


def _expert_names(expert_homes) -> set:
    return {"layer%d.expert%d" % k for k, h in expert_homes.items() if h == "gpu"}


def _resident_experts(layer, plan) -> list:
    """Expert ids whose weights the plan homed on the GPU (3-D weights: each expert's slice on its own)."""
    if layer.layout == 1:
        return [c.expert for c in layer.experts if plan.expert_homes.get((layer.layer, c.expert)) == "gpu"]
    return [e for e, trio in enumerate(layer.expert_weights)
            if all(plan.input_homes.get(u.input) == "gpu" for u in trio)]


def _rows_hint(ctx, fg, patterns):
    """The example call's row count of the first expert's activation input (graphs without a router)."""
    for c in patterns.experts:
        if c.entry.name in fg.inputs:
            t = ctx["examples"][fg.inputs.index(c.entry.name)]
            if isinstance(t, torch.Tensor) and t.dim() >= 1:
                return int(t.shape[0])
    return None


def _slots(fg, names, plan, mode_of):
    owned = {w: s for s in plan.subgraphs for w in s.weights}
    out = []
    for name in fg.inputs:
        if name not in names:
            out.append("activation")
        elif fg.users(name) and all(fg.node(u).target is MOE_OP for u in fg.users(name)):
            out.append("other")        # the hybrid layer homes it (pinned, or its own resident copy)
        elif name not in owned or plan.input_homes.get(name) == "gpu":
            out.append("resident")
        else:
            out.append(mode_of(owned[name]))
    return out


def _variants(gm, fg, plan, patterns, names) -> dict:
    """name -> (FusionGraph, argument slots). A graph whose one expert's weights change per call gets a
    resident, a streamed and a CPU variant; others get the one placed graph."""
    if plan.per_call:
        expert = plan.subgraphs[0] if plan.subgraphs and plan.subgraphs[0].kind != "attention" else None
        if expert is None:
            return {"placed": (fg, _slots(fg, names, plan, lambda s: "resident"))}
        cpu_fg = lower(gm)
        place_on_cpu(cpu_fg, expert.nodes, expert.weights)
        gpu_slots = _slots(fg, names, plan, lambda s: "resident")
        gpu_slots = ["resident" if s != "activation" else s for s in gpu_slots]
        return {"resident": (fg, gpu_slots),
                "streamed": (stream_weights(lower(gm), expert.weights),
                             ["host" if n in expert.weights else s for n, s in zip(fg.inputs, gpu_slots)]),
                "cpu": (cpu_fg, ["host" if n in expert.weights else s for n, s in zip(fg.inputs, gpu_slots)])}
    for s in plan.subgraphs:
        if not all(n in fg.g for n in s.nodes):
            continue                   # rewritten into a hybrid MoE op
        if s.mode == "cpu":
            place_on_cpu(fg, s.nodes, [w for w in s.weights if _only_read_by(fg, w, s.nodes)])
        elif s.mode == "streamed":
            stream_weights(fg, s.weights)
    return {"placed": (fg, _slots(fg, names, plan, lambda s: "host"))}


def _only_read_by(fg, name, nodes) -> bool:
    return all(u in nodes for u in fg.users(name))


def _chooser(plan, patterns, profile, homes, names, fg):
    if not plan.per_call:
        return lambda args: "placed"
    expert = next((c for c in patterns.experts), None)
    row = plan.subgraphs[0]
    slots = [fg.inputs.index(w) for w in row.weights]
    entry = fg.inputs.index(expert.entry.name) if expert.entry.name in fg.inputs else None
    memo = {}

    def choose(args):
        wanted = [homes.claim(args[i], "gpu") for i in slots]
        if all(h == "gpu" for h in wanted):
            return "resident"
        tokens = int(args[entry].shape[0]) if entry is not None else row.tokens
        mode = memo.get(tokens)
        if mode is None:
            mode = memo[tokens] = best_offloaded(expert_modes(profile, expert, max(tokens, 1)))
        return "cpu" if mode == "cpu" else "streamed"
    return choose


def _never_run(*args):
    raise RuntimeError("fusebackend: a graph planned on fake CUDA tensors is never run")


class plan_only:
    """Within it, a compile with `gpu_memory_budget` plans on fake CUDA tensors and runs the CPU graph."""

    def __enter__(self):
        self.prev = getattr(_PLAN_ONLY, "on", False)
        _PLAN_ONLY.on = True

    def __exit__(self, *exc):
        _PLAN_ONLY.on = self.prev
        return False

