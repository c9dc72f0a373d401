"""2-D convolution (NHWC x HWIO) whose kernel gradient can be computed as one matmul per kernel tap.

XLA:CPU runs the kernel-gradient convolution of a 3x3 conv (``f01b_i01o->01bf``: the output gradient used
as a 32x32 "window" over the input) on a generic path that reaches a fraction of the matmul rate; in a
GoT train step on CPU these convolutions took ~60% of the step (profile in ``benchmarks/train_step.py``'s
docstring). ``dW[kh, kw] = sum_{b,y,x} X_pad[b, s*y + kh, s*x + kw, :]^T dY[b, y, x, :]`` is the same sum as
``k*k`` matmuls of strided input slices against the output gradient, which CPUs run at full rate.

:func:`conv2d` chooses by ``weight_grad``: ``"xla"`` (plain autodiff of ``lax.conv_general_dilated``: what
TPUs and GPUs should run), ``"matmul"`` (the tap-wise kernel gradient through ``jax.custom_vjp``; the input
gradient and the forward pass stay XLA's) or ``"auto"`` (``"matmul"`` when the default backend is the CPU).
The forward values are identical in every mode; the gradients agree to float32 rounding
(``tests/test_conv_grad.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

WEIGHT_GRAD_MODES = ("auto", "xla", "matmul")
_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, stride: int, pad):
    return lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=_DN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_tapwise(x, w, stride: int, pad):
    return _conv(x, w, stride, pad)


def _fwd(x, w, stride, pad):
    return _conv(x, w, stride, pad), (x, w)


def kernel_grad_tapwise(x, g, kernel_shape, stride: int, pad):
    """``dL/dW`` (HWIO, float32) of ``_conv(x, W, stride, pad)`` given ``g = dL/dy``: one matmul per kernel tap."""
    kh_n, kw_n, cin, cout = kernel_shape
    xp = jnp.pad(x, ((0, 0), tuple(pad[0]), tuple(pad[1]), (0, 0)))
    ho, wo = g.shape[1], g.shape[2]
    taps = []
    for kh in range(kh_n):
        for kw in range(kw_n):
            patch = lax.slice(xp, (0, kh, kw, 0),
                              (xp.shape[0], kh + stride * (ho - 1) + 1, kw + stride * (wo - 1) + 1, cin),
                              (1, stride, stride, 1))
            taps.append(jnp.einsum("bhwi,bhwo->io", patch, g, preferred_element_type=jnp.float32))
    return jnp.stack(taps).reshape(kh_n, kw_n, cin, cout)


def _bwd(stride, pad, res, g):
    x, w = res
    (dx,) = jax.linear_transpose(lambda x_: _conv(x_, w, stride, pad), x)(g)  # no forward recompute
    dw = kernel_grad_tapwise(x, g, w.shape, stride, pad).astype(w.dtype)
    return dx, dw


_conv_tapwise.defvjp(_fwd, _bwd)


def resolve_weight_grad(mode: str) -> str:
    if mode not in WEIGHT_GRAD_MODES:
        raise ValueError(f"conv weight_grad must be one of {WEIGHT_GRAD_MODES}, got {mode!r}")
    if mode == "auto":
        return "matmul" if jax.default_backend() == "cpu" else "xla"
    return mode


def conv2d(x, w, stride: int = 1, pad=((1, 1), (1, 1)), *, weight_grad: str = "auto"):
    """``lax.conv_general_dilated`` over NHWC / HWIO with explicit ``pad`` ((lo, hi), (lo, hi)); see the module
    docstring for ``weight_grad``."""
    pad = tuple((int(lo), int(hi)) for lo, hi in pad)
    if resolve_weight_grad(weight_grad) == "matmul":
        return _conv_tapwise(x, w, int(stride), pad)
    return _conv(x, w, int(stride), pad)
