"""The tap-wise kernel gradient of got_jax.models.sdxl.conv against XLA's autodiff of the same convolution.

Same inputs, float32: forward values bit-identical in every mode; input and kernel gradients within
1e-5 of the largest gradient entry (the sums run in another order). Covers 3x3 stride 1, the VAE's
stride-2 conv with asymmetric (0, 1) padding, 1x1 convs and a non-square image; bfloat16 inputs within
2e-2 (bf16 rounding of the same float32-accumulated sums). The UNet's gradients against PyTorch go through
this path on the CPU in tests/test_train_step.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from got_jax.models.options import ModelOptions
from got_jax.models.sdxl import conv as C

CASES = [  # (batch, height, width, cin, cout, k, stride, pad)
    (2, 8, 8, 5, 7, 3, 1, ((1, 1), (1, 1))),
    (2, 9, 6, 4, 3, 3, 2, ((0, 1), (0, 1))),
    (3, 5, 7, 6, 4, 1, 1, ((0, 0), (0, 0))),
    (1, 16, 12, 8, 8, 3, 2, ((1, 1), (1, 1))),
]


@pytest.mark.parametrize("case", CASES, ids=[f"k{c[5]}s{c[6]}p{c[7][0]}" for c in CASES])
def test_tapwise_kernel_grad_equals_xla_autodiff(case):
    b, h, w, cin, cout, k, s, pad = case
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, h, w, cin)), jnp.float32)
    kern = jnp.asarray(rng.standard_normal((k, k, cin, cout)) * 0.3, jnp.float32)

    def loss(mode):
        def f(x_, k_):
            y = C.conv2d(x_, k_, s, pad, weight_grad=mode)
            return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape) / y.size), y
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(x, kern)

    (l_x, y_x), (gx_x, gk_x) = loss("xla")
    (l_m, y_m), (gx_m, gk_m) = loss("matmul")
    np.testing.assert_array_equal(np.asarray(y_m), np.asarray(y_x))
    for a, r in ((gx_m, gx_x), (gk_m, gk_x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=0, atol=1e-5 * float(np.abs(r).max()))
    assert float(np.abs(np.asarray(gk_x)).max()) > 0


def test_bfloat16_and_auto_mode():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.bfloat16)
    kern = jnp.asarray(rng.standard_normal((3, 3, 4, 6)) * 0.3, jnp.bfloat16)
    grads = {m: jax.grad(lambda k_: jnp.sum(C.conv2d(x, k_, weight_grad=m).astype(jnp.float32) ** 2))(kern)
             for m in ("xla", "matmul")}
    assert grads["matmul"].dtype == jnp.bfloat16
    ref = np.asarray(grads["xla"], np.float32)
    np.testing.assert_allclose(np.asarray(grads["matmul"], np.float32), ref, rtol=0, atol=2e-2 * np.abs(ref).max())
    assert C.resolve_weight_grad("auto") == ("matmul" if jax.default_backend() == "cpu" else "xla")
    with pytest.raises(ValueError, match="weight_grad"):
        C.conv2d(x, kern, weight_grad="fast")
    with pytest.raises(ValueError, match="conv_weight_grad"):
        ModelOptions(conv_weight_grad="fast")


def test_matmul_mode_really_replaces_the_kernel_gradient_convolution():
    """The jaxpr of the matmul mode's gradient holds one convolution fewer (only the forward and the input
    gradient) and k*k dot_generals instead."""
    x = jnp.ones((1, 6, 6, 2))
    kern = jnp.ones((3, 3, 2, 3))

    def count(mode):
        jaxpr = jax.make_jaxpr(jax.grad(lambda x_, k_: jnp.sum(C.conv2d(x_, k_, weight_grad=mode)), argnums=(0, 1)))(
            x, kern)
        text = str(jaxpr)
        return text.count("conv_general_dilated"), text.count("dot_general")

    convs_x, dots_x = count("xla")
    convs_m, dots_m = count("matmul")
    assert (convs_x, convs_m) == (3, 2) and dots_m - dots_x == 9, (convs_x, convs_m, dots_x, dots_m)
