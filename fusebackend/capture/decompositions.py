"""The decomposition table handed to AOT autograd: core ATen, plus row patterns spelled in fusable ops.

Core ATen keeps softmax, log_softmax, layer norm and var as single ops; we decompose them into
reductions and pointwise ops so the vertical pass can build one row kernel from each.
"""
from __future__ import annotations

import functools

import torch
from torch._decomp import core_aten_decompositions, get_decompositions

from . import decomp_gemv, decomp_outer, decomp_pad_mm

aten = torch.ops.aten
HALF = (torch.float16, torch.bfloat16)


def _norm_dims(x, dims):
    if dims is None:
        return list(range(x.dim()))
    dims = [dims] if isinstance(dims, int) else list(dims)
    return [d % max(1, x.dim()) for d in dims] if dims else list(range(x.dim()))


def _count(x, dims):
    n = 1
    for d in dims:
        n *= x.shape[d]
    return n


def var_correction(x, dim=None, *, correction=None, keepdim=False):
    dims = _norm_dims(x, dim)
    corr = 1 if correction is None else correction
    # half types: in float32, rounded once, as ATen's kernel does (a float16 sum of squares overflows to inf
    # where the variance itself fits: fuzz seed 18)
    xf = aten._to_copy.default(x, dtype=torch.float32) if x.dtype in HALF else x
    mean = aten.mean.dim(xf, dims, True)
    d = aten.sub.Tensor(xf, mean)
    ss = aten.sum.dim_IntList(aten.mul.Tensor(d, d), dims, keepdim)
    v = aten.div.Tensor(ss, max(0, _count(x, dims) - corr))
    return aten._to_copy.default(v, dtype=x.dtype) if x.dtype in HALF else v


def var_mean_correction(x, dim=None, *, correction=None, keepdim=False):
    dims = _norm_dims(x, dim)
    v = var_correction(x, dims, correction=correction, keepdim=keepdim)
    return v, aten.mean.dim(x, dims, keepdim)


def native_layer_norm(x, normalized_shape, weight, bias, eps):
    dims = list(range(x.dim() - len(normalized_shape), x.dim()))
    xf = aten._to_copy.default(x, dtype=torch.float32) if x.dtype in HALF else x
    mean = aten.mean.dim(xf, dims, True)
    d = aten.sub.Tensor(xf, mean)
    var = aten.mean.dim(aten.mul.Tensor(d, d), dims, True)
    rstd = aten.rsqrt.default(aten.add.Tensor(var, eps))
    out = aten.mul.Tensor(d, rstd)
    if weight is not None:
        out = aten.mul.Tensor(out, weight)
    if bias is not None:
        out = aten.add.Tensor(out, bias)
    out = aten._to_copy.default(out, dtype=x.dtype) if x.dtype in HALF else out
    if x.device.type == "cpu" and x.dtype in HALF:   # ATen's CPU kernel returns stats in the input dtype
        mean = aten._to_copy.default(mean, dtype=x.dtype)
        rstd = aten._to_copy.default(rstd, dtype=x.dtype)
    return out, mean, rstd


def batch_norm_inference(x, weight, bias, running_mean, running_var, momentum, eps):
    """Inference batch norm as a per-channel affine in pointwise ops, so it fuses with the ReLU (and pool)
    after it instead of being its own ATen pass over the tensor. In float32 for half types, rounded once, as
    ATen's kernel computes it. The saved statistics are what eager returns on that device (unused in
    inference: the graph drops them)."""
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    f32 = torch.float32 if x.dtype in HALF else x.dtype
    mean = aten._to_copy.default(running_mean, dtype=f32) if running_mean.dtype != f32 else running_mean
    var = aten._to_copy.default(running_var, dtype=f32) if running_var.dtype != f32 else running_var
    invstd = aten.rsqrt.default(aten.add.Tensor(var, eps))
    out = aten.mul.Tensor(aten.sub.Tensor(x, aten.view.default(mean, shape)), aten.view.default(invstd, shape))
    if weight is not None:
        out = aten.mul.Tensor(out, aten.view.default(weight, shape))
    if bias is not None:
        out = aten.add.Tensor(out, aten.view.default(bias, shape))
    out = aten._to_copy.default(out, dtype=x.dtype) if out.dtype != x.dtype else out
    if x.device.type == "cpu":
        empty = aten.new_zeros.default(x, [0])
        return out, empty, empty
    return out, aten.clone.default(mean), invstd


def safe_softmax(x, dim, dtype=None):
    """softmax, 0 on rows that are all -inf (SDPA's math path). Core ATen tests the rows with an `all`
    reduction and a zeros_like tensor -- a second reduction and a full-size fill; a row is all -inf exactly
    when its max is -inf, which the softmax computes anyway: one row kernel."""
    out = aten._softmax.default(x if dtype is None else aten._to_copy.default(x, dtype=dtype), dim, False)
    keep = aten.ne.Scalar(aten.amax.default(x, [dim], True), float("-inf"))
    return aten.where.ScalarOther(keep, out, 0.0)


def frac(x):
    """x - trunc(x), as ATen's kernel computes it. Core ATen's x - floor(|x|) * sign(x) gives -0 for -0 (and for
    a negative integer's trunc, -0), where eager gives +0: a later division or signbit sees the sign (GPU fuzz,
    seeds 71 and 72)."""
    return aten.sub.Tensor(x, aten.trunc.default(x))


def _first_of(decomps):
    """One decomposition trying each of `decomps` in turn (NotImplemented: the next; all declined: ATen)."""
    def decomposed(*args, **kwargs):
        for f in decomps:
            out = f(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return NotImplemented
    return decomposed


@functools.lru_cache(None)
def table(gemv_max_rows: int = 0, pad_matmul: bool = False) -> dict:
    """gemv_max_rows > 0: GPU half-type matrix products with at most that many rows become fusable row
    reductions (decomp_gemv.py); pad_matmul: large ones with sizes off a multiple of 8 are padded
    (decomp_pad_mm.py)."""
    # Attention stays one opaque ATen call (its kernels beat any decomposition; and the CPU flash-attention
    # decomposition in core ATen gives wrong gradients under AOT autograd, seen with torch 2.13).
    d = {k: v for k, v in core_aten_decompositions().items() if "scaled_dot_product" not in str(k)}
    d.update(get_decompositions([
        aten._softmax, aten._log_softmax, aten._softmax_backward_data, aten._log_softmax_backward_data,
        aten.native_layer_norm_backward, aten.gelu_backward, aten.silu_backward, aten.sigmoid_backward,
        aten.tanh_backward,
    ]))
    d[aten.var.correction] = var_correction
    d[aten.var_mean.correction] = var_mean_correction
    d[aten.native_layer_norm.default] = native_layer_norm
    d[aten._safe_softmax.default] = safe_softmax
    d[aten._native_batch_norm_legit_no_training.default] = batch_norm_inference
    d[aten.frac.default] = frac
    mms = [decomp_outer.mm] + ([decomp_gemv.mm_decomposition(gemv_max_rows)] if gemv_max_rows > 0 else []) + \
        ([decomp_pad_mm.decomposition()] if pad_matmul else [])
    d[aten.mm.default] = _first_of(mms)
    d[aten.bmm.default] = decomp_outer.bmm
    if pad_matmul:
        d[aten.view.default] = decomp_pad_mm.view_decomposition()
    if gemv_max_rows > 0:
        d[aten.addmm.default] = decomp_gemv.addmm_decomposition(gemv_max_rows)
    return d
