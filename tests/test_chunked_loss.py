"""The fused, chunked head + cross-entropy gives the materialised path's losses and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxmodel.train.chunked_loss import fused_cross_entropy
from maxmodel.train.loss import cross_entropy_sums


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_fused_matches_materialised(z_loss):
    k = jax.random.split(jax.random.key(0), 4)
    b, length, d, v = 2, 12, 16, 40
    h = jax.random.normal(k[0], (b, length, d))
    w = jax.random.normal(k[1], (d, v)) * 0.3
    targets = jax.random.randint(k[2], (b, length), 0, v)
    mask = (jax.random.uniform(k[3], (b, length)) > 0.2).astype(jnp.float32)

    def reference(h, w):
        nll, z, _ = cross_entropy_sums(h @ w, targets, mask, z_loss)
        return nll + z, nll

    def fused(h, w):
        return fused_cross_entropy(h, w, targets, mask, z_loss, 4)

    (ref_total, ref_nll), ref_grads = jax.value_and_grad(reference, argnums=(0, 1), has_aux=True)(h, w)
    (total, nll), grads = jax.value_and_grad(fused, argnums=(0, 1), has_aux=True)(h, w)
    np.testing.assert_allclose(total, ref_total, rtol=1e-5)
    np.testing.assert_allclose(nll, ref_nll, rtol=1e-5)
    np.testing.assert_allclose(fused(h, w)[0], ref_total, rtol=1e-5)  # the primal path without gradients
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    # the cotangent scales the gradient (microbatch sums and loss scaling rely on it)
    g3 = jax.grad(lambda h: 3.0 * fused(h, w)[0])(h)
    np.testing.assert_allclose(g3, 3.0 * ref_grads[0], rtol=1e-5, atol=1e-6)
