"""bf16 mixed precision on CPU: models.layers.lowp_matmul / matmul_tn (weight gradients from float32-accumulated
bf16 products) against float32 references on the same bf16-rounded inputs."""
import jax
import jax.numpy as jnp
import numpy as np

from maxmodel.models.layers import dense, matmul_tn
from maxmodel.train.chunked_loss import fused_cross_entropy


def _rand(key, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32).astype(dtype)


def test_matmul_tn_bf16_matches_float32_of_rounded_inputs():
    a, b = _rand(0, (256, 64), jnp.bfloat16), _rand(1, (256, 96), jnp.bfloat16)
    got = matmul_tn(a, b)
    want = a.astype(jnp.float32).T @ b.astype(jnp.float32)
    assert got.dtype == jnp.float32 and got.shape == (64, 96)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


def test_dense_bf16_gradients_in_the_weights_dtype():
    x, w = _rand(2, (4, 32, 64), jnp.bfloat16), _rand(3, (64, 48)) * 0.1

    def loss(x, w):
        return jnp.sum(dense(x, w).astype(jnp.float32) ** 2)

    def ref(x, w):  # float32 throughout on the bf16-rounded weight
        return jnp.sum((x.astype(jnp.float32) @ w.astype(jnp.bfloat16).astype(jnp.float32)) ** 2)
    y = dense(x, w)
    assert y.dtype == jnp.bfloat16
    dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    rx, rw = jax.grad(ref, argnums=(0, 1))(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(dw), np.asarray(rw), rtol=3e-2, atol=3e-2 * float(jnp.abs(rw).max()))
    np.testing.assert_allclose(np.asarray(dx.astype(jnp.float32)), np.asarray(rx), rtol=3e-2,
                               atol=3e-2 * float(jnp.abs(rx).max()))


def test_fused_loss_bf16_head_gradient_matches_float32():
    h, w = _rand(4, (2, 64, 32), jnp.bfloat16), _rand(5, (32, 200)).astype(jnp.bfloat16) * 0.2
    targets = jax.random.randint(jax.random.key(6), (2, 64), 0, 200)
    mask = jnp.ones((2, 64), jnp.float32)

    def loss(h, w):
        return fused_cross_entropy(h, w, targets, mask, 1e-4, 16)[0]
    dh, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(h, w)
    rh, rw = jax.grad(loss, argnums=(0, 1))(h.astype(jnp.float32), w.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(dw.astype(jnp.float32)), np.asarray(rw), rtol=2e-2,
                               atol=2e-2 * float(jnp.abs(rw).max()))
    np.testing.assert_allclose(np.asarray(dh.astype(jnp.float32)), np.asarray(rh), rtol=2e-2,
                               atol=2e-2 * float(jnp.abs(rh).max()))
