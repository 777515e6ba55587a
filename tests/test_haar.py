"""Hand-written Haar DWT/IDWT against PyWavelets (test-only dependency) on random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import pywt
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from zsad_jax.layers import haar_dwt2, haar_idwt2

RNG = np.random.default_rng(7)
SHAPES = [(2, 8, 6, 3), (2, 38, 38, 4), (2, 37, 37, 4), (1, 5, 8, 2), (3, 6, 9, 1), (1, 1, 1, 2)]


def _random(shape):
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES)
def test_subbands_equal_pywavelets_dwt2(shape):
    x = _random(shape)
    # pywt's default mode="symmetric" defines the odd-size coefficients we promise to equal.
    ref_ll, (ref_h, ref_v, ref_d) = pywt.dwt2(x.astype(np.float64), "haar", axes=(1, 2))
    ll, (lh, hl, hh) = haar_dwt2(jnp.asarray(x))
    expected_shape = (shape[0], (shape[1] + 1) // 2, (shape[2] + 1) // 2, shape[3])
    for ours, ref in ((ll, ref_ll), (lh, ref_h), (hl, ref_v), (hh, ref_d)):
        assert ours.shape == ref.shape == expected_shape
        np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_idwt2_equals_pywavelets_idwt2_before_crop(shape):
    x = _random(shape)
    coeffs = pywt.dwt2(x.astype(np.float64), "haar", axes=(1, 2))
    ref = pywt.idwt2(coeffs, "haar", axes=(1, 2))  # even size: pywt leaves the crop to callers
    ll = jnp.asarray(coeffs[0], jnp.float32)
    details = tuple(jnp.asarray(c, jnp.float32) for c in coeffs[1])
    ours = haar_idwt2(ll, details)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_perfect_reconstruction_every_size(shape):
    x = _random(shape)
    ll, details = haar_dwt2(jnp.asarray(x))
    back = haar_idwt2(ll, details, size=shape[1:3])
    assert back.shape == x.shape
    assert np.max(np.abs(np.asarray(back) - x)) <= 1e-6


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[1] % 2 == 0 and s[2] % 2 == 0])
def test_orthonormal_energy_preserved_for_even_sizes(shape):
    x = RNG.standard_normal(shape)  # float64 on the host, float32 in JAX
    ll, (lh, hl, hh) = haar_dwt2(jnp.asarray(x, jnp.float32))
    energy = sum(float(jnp.sum(jnp.square(b.astype(jnp.float32)))) for b in (ll, lh, hl, hh))
    np.testing.assert_allclose(energy, np.sum(x**2), rtol=1e-5)


def test_gradients_are_correct():
    x = jnp.asarray(_random((1, 5, 6, 2)))

    def forward_and_back(v):
        ll, (lh, hl, hh) = haar_dwt2(v)
        # Non-linear mix of bands so the check is not only about a linear map.
        return haar_idwt2(jnp.tanh(ll), (lh * hl, hh, jnp.sin(lh)), size=(5, 6))

    # Jitted: check_grads calls the function many times, eager dispatch would dominate.
    check_grads(jax.jit(haar_dwt2), (x,), order=1, modes=("fwd", "rev"), atol=1e-2, rtol=1e-2)
    check_grads(
        jax.jit(forward_and_back), (x,), order=1, modes=("fwd", "rev"), atol=1e-2, rtol=1e-2
    )


def test_vjp_is_the_inverse_for_even_sizes():
    # An orthonormal transform's adjoint is its inverse, so reverse mode must reproduce idwt2.
    x = jnp.asarray(_random((2, 6, 8, 3)))
    bands = jax.eval_shape(haar_dwt2, x)
    cotangent = jax.tree.map(lambda b: jnp.asarray(_random(b.shape)), bands)
    grad = jax.jit(lambda c: jax.vjp(haar_dwt2, x)[1](c)[0])(cotangent)
    ll, details = cotangent
    np.testing.assert_allclose(grad, haar_idwt2(ll, details), atol=1e-6)


def test_jit_with_batch_sharded_over_eight_devices():
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",))
    x = _random((8, 37, 37, 6))
    sharded = jax.device_put(x, NamedSharding(mesh, P("data")))

    @jax.jit
    def round_trip(v):
        ll, details = haar_dwt2(v)
        return ll, haar_idwt2(ll, details, size=(37, 37))

    ll, back = round_trip(sharded)
    with jax.set_mesh(mesh):  # the project's way of running sharded code
        ll_in_mesh, _ = round_trip(sharded)
    np.testing.assert_array_equal(np.asarray(ll_in_mesh), np.asarray(ll))
    ref_ll, _ = pywt.dwt2(x.astype(np.float64), "haar", axes=(1, 2))
    np.testing.assert_allclose(np.asarray(ll), ref_ll, atol=1e-6)
    np.testing.assert_allclose(np.asarray(back), x, atol=1e-6)
    # Pure reshapes and adds: the batch stays split, nothing is gathered onto one device.
    assert back.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), back.ndim)
    assert ll.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), ll.ndim)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_dtypes_kept_and_close(dtype):
    x = _random((2, 7, 6, 3))
    ll, details = haar_dwt2(jnp.asarray(x, dtype))
    assert ll.dtype == dtype and all(b.dtype == dtype for b in details)
    ref_ll, _ = pywt.dwt2(x.astype(np.float64), "haar", axes=(1, 2))
    np.testing.assert_allclose(np.asarray(ll, np.float32), ref_ll, atol=5e-2, rtol=2e-2)
    back = haar_idwt2(ll, details, size=(7, 6))
    np.testing.assert_allclose(np.asarray(back, np.float32), x, atol=5e-2, rtol=2e-2)


def test_bad_inputs_name_the_file():
    with pytest.raises(ValueError, match="layers/haar.py"):
        haar_dwt2(jnp.zeros((4, 4)))
    ll, (lh, hl, hh) = haar_dwt2(jnp.zeros((1, 4, 4, 1)))
    with pytest.raises(ValueError, match="layers/haar.py"):
        haar_idwt2(ll, (lh, hl, hh[:, :1]))
    with pytest.raises(ValueError, match="layers/haar.py"):
        haar_idwt2(ll, (lh, hl, hh), size=(2, 4))
