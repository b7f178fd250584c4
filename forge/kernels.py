"""Kernel choices. `linear(x, w, b)`: F.linear, or on CPU in fp32 optionally the oneDNN kernel.

PyTorch's CPU fp32 matmul goes to MKL's sgemm, which on non-Intel CPUs (e.g. AMD EPYC with
AVX-512) runs a generic code path; oneDNN's fp32 inner-product kernels use the full vector width
there and are about 2x faster on such machines (same IEEE fp32 arithmetic, only a different
summation order). bf16 / fp16 matmuls already go through oneDNN and are left to F.linear.

The oneDNN path is off by default (backend "aten"); `set_linear_backend("onednn")` turns it on
(`with linear_backend("onednn"):` for a block only, as a training run does) for every Forge linear layer (the tensor-parallel layers call this function), "auto" picks oneDNN
when the build has it. Autograd:  y = x W^T + b,  dx = g W,  dW = g^T x,  db = sum g.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

_BACKEND = "aten"


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def set_linear_backend(name: str) -> str:
    """Select "aten" (F.linear), "onednn" or "auto"; returns the backend now in use."""
    global _BACKEND
    if name not in ("aten", "onednn", "auto"):
        raise ValueError(f"linear backend {name!r} is not one of ['aten', 'auto', 'onednn']")
    if name == "auto":
        name = "onednn" if onednn_available() else "aten"
    if name == "onednn" and not onednn_available():
        raise RuntimeError("the oneDNN linear backend needs a PyTorch build with mkldnn")
    _BACKEND = name
    return name


def get_linear_backend() -> str:
    return _BACKEND


@contextlib.contextmanager
def linear_backend(name: str):
    """`set_linear_backend(name)` while the block runs (yields the backend in use), then the
    backend that was in use before, also when the block raises."""
    previous = _BACKEND
    try:
        yield set_linear_backend(name)
    finally:
        set_linear_backend(previous)


@torch.library.custom_op("forge::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (..., K), w (N, K), b (N,) or None -> x w^T + b (..., N) through oneDNN (an opaque op for
    torch.compile, which cannot lower the mkldnn op with a weight that is not a constant)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


@onednn_linear.register_fake
def _(x, w, b=None):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _setup_context(ctx, inputs, output):
    x, w, b = inputs
    ctx.save_for_backward(x, w)
    ctx.has_bias = b is not None


def _backward(ctx, g):
    x, w = ctx.saved_tensors
    g2 = g.reshape(-1, g.shape[-1])
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = onednn_linear(g2, w.t().contiguous()).view(*g.shape[:-1], w.shape[1])
    if ctx.needs_input_grad[1]:
        gw = onednn_linear(g2.t(), x.reshape(-1, x.shape[-1]).t())
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = g2.sum(0)
    return gx, gw, gb


onednn_linear.register_autograd(_backward, setup_context=_setup_context)


def _cpu_autocast() -> bool:
    """CPU autocast is on (F.linear then runs in the autocast dtype: leave it to F.linear)."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:                       # older torch
        return torch.is_autocast_cpu_enabled()


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, b), through oneDNN when that backend is on and x is fp32 on the CPU."""
    if (_BACKEND == "onednn" and x.device.type == "cpu" and x.dtype == torch.float32
            and w.dtype == torch.float32 and x.shape[-1] == w.shape[1] and x.numel()
            and not _cpu_autocast()):
        return onednn_linear(x, w, b)
    return F.linear(x, w, b)
