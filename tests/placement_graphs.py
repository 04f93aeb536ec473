"""ATen FusionGraphs of a model as fuse's capture would see them, for the placement tests (no compiling).

    graphs = trace_graphs(model, inputs, dynamo_config=None, device="cpu")   # or device="cuda"

The model runs once under Dynamo on the CPU. Each graph Dynamo hands over is captured by AOT autograd with
fuse's decomposition table (FuseOptions defaults) in inference mode and lowered to a FusionGraph, in the
order Dynamo compiles them; the graph itself then runs as plain FX on the CPU, so the model's own control
flow (graph breaks, recompiles) happens as in a real run. device="cuda" retargets each graph to fake CUDA
tensors first (capture/fake_cuda.py, as bench/plan_cuda.py does), so the graphs are those fuse would plan
for a GPU, on a machine without one.

Each FusionGraph gets `input_labels`: placeholder name -> the user's name for that input where Dynamo
lifted a parameter or buffer ("layers.0.mlp.experts.gate_up_proj"), as capture may set it; and `calls`:
how many times the traced forward ran that graph (a graph-broken layer's graph serves every layer, an
expert's FFN graph every expert the loop runs).
"""
from __future__ import annotations

import re

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._guards import detect_fake_mode

from fusebackend.capture import decompositions
from fusebackend.graph import FusionGraph, lower
from fusebackend.options import FuseOptions

# tiny dims shared by the HF builders: 2 layers, GQA (4 query heads, 2 KV heads, head dim 8), 4 experts top-2
TINY = dict(vocab=128, hidden=32, layers=2, heads=4, kv_heads=2, ffn=64, experts=4, shared_ffn=48)


def _fake_cuda():
    # (moved: bench/fake_cuda.py is now fusebackend/capture/fake_cuda.py -- the placement planner uses it)
    from fusebackend.capture import fake_cuda
    return fake_cuda


def _retarget(fake_cuda, gm):
    return fake_cuda.retarget(gm)


def user_name(placeholder: str) -> str:
    """Dynamo's placeholder name for a lifted parameter, as the module path the user wrote:
    L_self_modules_layers_modules_0_modules_mlp_parameters_weight_ -> layers.0.mlp.weight."""
    name = re.sub(r"^[Ll]_(self_)?", "", placeholder).rstrip("_")
    name = re.sub(r"(^|_)(modules|parameters|buffers)_", ".", name)
    return name.lstrip(".")


def _labels(gm: torch.fx.GraphModule) -> list:
    """One label per Dynamo placeholder (None for activations and sizes)."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            lifted = re.search(r"_(parameters|buffers)_", n.name)
            out.append(user_name(n.name) if lifted else None)
    return out


def trace_graphs(model, inputs, dynamo_config=None, device: str = "cpu") -> list:
    """FusionGraphs of every forward graph Dynamo makes of model(*inputs), in compile order."""
    if device not in ("cpu", "cuda"):
        raise ValueError("trace_graphs: device must be 'cpu' or 'cuda', got %r" % (device,))
    fake_cuda = _fake_cuda() if device == "cuda" else None
    opts = FuseOptions()
    graphs: list[FusionGraph] = []

    def capture(gm, example_inputs):
        labels = _labels(gm)
        runnable = torch.fx.GraphModule(gm, gm.graph.__deepcopy__())     # the CPU graph runs the model

        def lowered(aten_gm, aten_inputs):
            fg = lower(aten_gm)
            # AOT's inference graph keeps Dynamo's inputs in order (one placeholder each)
            if len(labels) == len(fg.inputs):
                fg.input_labels = {p: lab for p, lab in zip(fg.inputs, labels) if lab}
            graphs.append(fg)

            def not_run(*args):
                raise RuntimeError("placement_graphs: a traced graph is never run")
            return not_run

        start = len(graphs)
        traced, example = gm, example_inputs
        if fake_cuda is not None:
            example = fake_cuda.fake_inputs(detect_fake_mode(example_inputs), example_inputs)
            traced = _retarget(fake_cuda, gm)
        aot_autograd(fw_compiler=lowered, inference_compiler=lowered,
                     decompositions=decompositions.table(opts.gemv_max_rows, opts.pad_matmul))(traced, example)
        mine = graphs[start:]
        for fg in mine:
            fg.calls = 0

        def run(*args):
            for fg in mine:
                fg.calls += 1
            return runnable.forward(*args)
        return run

    torch._dynamo.reset()
    try:
        with torch.no_grad(), torch._dynamo.config.patch(**(dynamo_config or {})):
            torch.compile(model, backend=capture)(*inputs)
    finally:
        torch._dynamo.reset()
    return graphs


def tiny_hf(family: str, experts_implementation: str = "eager", batch: int = 2, seq: int = 8,
            dtype=torch.float32, seed: int = 0):
    """(model, (input_ids,)) of a tiny random HF model, logits out, no KV cache: family is "mixtral",
    "qwen2_moe", "llama" or "gpt2". experts_implementation picks HF 5.x's experts forward ("eager" loop,
    "batched_mm", "grouped_mm"); SDPA attention."""
    import transformers as tf
    from models.hf import TensorOutput
    t = TINY
    common = dict(vocab_size=t["vocab"], num_hidden_layers=t["layers"], max_position_embeddings=seq,
                  tie_word_embeddings=False, attention_dropout=0.0)
    decoder = dict(common, hidden_size=t["hidden"], intermediate_size=t["ffn"], num_attention_heads=t["heads"],
                   num_key_value_heads=t["kv_heads"])
    if family == "mixtral":
        cls, config = tf.MixtralForCausalLM, tf.MixtralConfig(
            num_local_experts=t["experts"], num_experts_per_tok=2, router_jitter_noise=0.0, **decoder)
    elif family == "qwen2_moe":
        cls, config = tf.Qwen2MoeForCausalLM, tf.Qwen2MoeConfig(
            num_experts=t["experts"], num_experts_per_tok=2, moe_intermediate_size=t["ffn"],
            shared_expert_intermediate_size=t["shared_ffn"], norm_topk_prob=True, **decoder)
    elif family == "llama":
        cls, config = tf.LlamaForCausalLM, tf.LlamaConfig(**decoder)
    elif family == "gpt2":
        cls, config = tf.GPT2LMHeadModel, tf.GPT2Config(
            vocab_size=t["vocab"], n_positions=seq, n_embd=t["hidden"], n_layer=t["layers"], n_head=t["heads"],
            n_inner=t["ffn"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)
    else:
        raise ValueError("tiny_hf: unknown family %r" % (family,))
    config._attn_implementation = "sdpa"
    config._experts_implementation = experts_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TensorOutput(cls(config), "logits").to(dtype).eval()
        ids = torch.randint(0, t["vocab"], (batch, seq))
    return model, (ids,)
