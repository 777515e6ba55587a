"""Resize, smoothing and neighbour aggregation against torch, scipy and direct formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from extras import optional
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from zsad_jax.layers import (
    aggregate_neighbours,
    gaussian_blur2d,
    gaussian_filter,
    gaussian_filter_np,
    gaussian_kernel,
    resize_bilinear,
)

# None without the convert extra; the tests that use it are marked torch (tests/extras.py).
torch = optional("torch")
F = optional("torch.nn.functional")

RNG = np.random.default_rng(11)


def _uniform(shape):
    return RNG.uniform(size=shape).astype(np.float32)


def _torch_resize_nhwc(x, size, align_corners):
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
    out = F.interpolate(t, size=size, mode="bilinear", align_corners=align_corners, antialias=False)
    return np.moveaxis(out.numpy(), 1, -1)


# ----------------------------------------------------------------------------- resize


@pytest.mark.torch
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize(
    ("in_size", "out_size"),
    [((37, 37), (518, 518)), ((518, 518), (37, 37)), ((24, 37), (37, 50)), ((9, 5), (4, 13))],
)
def test_resize_matches_torch_interpolate(in_size, out_size, align_corners):
    x = _uniform((2, *in_size, 3))
    ours = jax.jit(lambda v: resize_bilinear(v, out_size, align_corners))(jnp.asarray(x))
    ref = _torch_resize_nhwc(x, out_size, align_corners)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-6, rtol=0)


@pytest.mark.torch
@pytest.mark.parametrize("align_corners", [False, True])
def test_resize_maps_without_channel_axis_and_under_jit(align_corners):
    maps = _uniform((3, 37, 37))
    resize = jax.jit(lambda m: resize_bilinear(m, 518, align_corners=align_corners))
    ours = resize(jnp.asarray(maps))
    ref = _torch_resize_nhwc(maps[..., None], (518, 518), align_corners)[..., 0]
    assert ours.shape == (3, 518, 518)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-6, rtol=0)


@pytest.mark.torch
def test_resize_downsample_differs_from_antialiased_jax_image_resize():
    # Why this layer exists: jax.image.resize antialiases, torch (antialias=False) does not.
    x = _uniform((1, 518, 518, 1))
    ours = np.asarray(resize_bilinear(jnp.asarray(x), 37))
    np.testing.assert_allclose(ours, _torch_resize_nhwc(x, (37, 37), False), atol=1e-6)
    smoothed = np.asarray(jax.image.resize(jnp.asarray(x), (1, 37, 37, 1), "bilinear"))
    assert np.max(np.abs(smoothed - ours)) > 1e-2


@pytest.mark.torch
@pytest.mark.parametrize("align_corners", [False, True])
def test_resize_gradient_matches_torch_autograd(align_corners):
    x = _uniform((2, 7, 5, 2))
    cotangent = _uniform((2, 11, 16, 2))
    resize = lambda v: resize_bilinear(v, (11, 16), align_corners)  # noqa: E731
    pull = jax.jit(lambda c: jax.vjp(resize, jnp.asarray(x))[1](c)[0])
    ours = pull(jnp.asarray(cotangent))
    t = torch.tensor(np.moveaxis(x, -1, 1), requires_grad=True)
    out = F.interpolate(t, size=(11, 16), mode="bilinear", align_corners=align_corners)
    out.backward(torch.from_numpy(np.ascontiguousarray(np.moveaxis(cotangent, -1, 1))))
    np.testing.assert_allclose(np.asarray(ours), np.moveaxis(t.grad.numpy(), 1, -1), atol=1e-5)


@pytest.mark.torch
def test_resize_keeps_low_precision_dtype():
    x = _uniform((1, 6, 6, 2))
    out = jax.jit(lambda v: resize_bilinear(v, (12, 9)))(jnp.asarray(x, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    ref = _torch_resize_nhwc(x, (12, 9), False)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=1e-2)


def test_resize_rejects_bad_input():
    with pytest.raises(ValueError, match="layers/resize.py"):
        resize_bilinear(jnp.zeros((4, 4)), 8)
    with pytest.raises(TypeError, match="layers/resize.py"):
        resize_bilinear(jnp.zeros((1, 4, 4), jnp.int32), 8)


# ----------------------------------------------------------------------------- smoothing


def _scipy_per_map(maps, sigma, truncate=4.0):
    return np.stack([scipy.ndimage.gaussian_filter(m, sigma, truncate=truncate) for m in maps])


def test_gaussian_filter_np_matches_scipy_on_518_maps():
    """AF-CLIP's post-processing: sigma 4 on 518x518 maps (radius 16).

    Speed (2-core shared CPU box, load average ~6, 256 float32 maps, best of 3): scipy's
    gaussian_filter in a per-map loop 9.9 ms/map; gaussian_filter_np 3.7 ms/map (workers=1),
    4.6 ms/map (workers=2); jax gaussian_filter jitted on CPU 12.6 ms/map.
    """
    maps = _uniform((6, 518, 518))  # two chunks of maps, so the threaded path runs
    ref = _scipy_per_map(maps, 4)
    for workers in (1, 2):
        ours = gaussian_filter_np(maps, sigma=4, workers=workers)
        assert ours.dtype == np.float32 and ours.shape == maps.shape
        np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("shape", "sigma", "truncate"),
    [
        ((2, 5, 7), 4.0, 4.0),
        ((1, 40, 33), 1.5, 4.0),
        ((2, 3, 70, 35), 2.0, 3.0),
        ((9, 9), 0.7, 4.0),
    ],
)
def test_gaussian_filter_np_matches_scipy_any_size(shape, sigma, truncate):
    # (2, 5, 7) with radius 16: scipy's reflection wraps several times and must still match.
    maps = _uniform(shape)
    flat = maps.reshape(-1, *shape[-2:])
    ref = _scipy_per_map(flat, sigma, truncate).reshape(shape)
    np.testing.assert_allclose(gaussian_filter_np(maps, sigma, truncate), ref, atol=1e-6)
    ours64 = gaussian_filter_np(maps.astype(np.float64), sigma, truncate)
    ref64 = _scipy_per_map(flat.astype(np.float64), sigma, truncate).reshape(shape)
    assert ours64.dtype == np.float64
    np.testing.assert_allclose(ours64, ref64, atol=1e-12)


@pytest.mark.parametrize(
    ("shape", "sigma"), [((2, 64, 80), 4.0), ((2, 5, 7), 4.0), ((3, 37, 37), 1.0)]
)
def test_gaussian_filter_jax_matches_scipy(shape, sigma):
    maps = _uniform(shape)
    ours = jax.jit(lambda m: gaussian_filter(m, sigma))(jnp.asarray(maps))
    np.testing.assert_allclose(np.asarray(ours), _scipy_per_map(maps, sigma), atol=1e-6)


def test_gaussian_filter_jax_gradient_is_the_adjoint_filter():
    # The filter is linear: its vjp must equal the transpose of scipy's filter matrix.
    size = (6, 7)
    basis = np.eye(size[0] * size[1]).reshape(-1, *size)
    matrix = _scipy_per_map(basis, 1.2).reshape(len(basis), -1).T  # column j = filter(e_j)
    cotangent = _uniform((1, *size))
    primal = jnp.zeros((1, *size), jnp.float32)
    pull = jax.jit(lambda c: jax.vjp(lambda m: gaussian_filter(m, 1.2), primal)[1](c)[0])
    ours = pull(jnp.asarray(cotangent))
    expected = (matrix.T @ cotangent.reshape(-1)).reshape(1, *size)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-6)


def _kornia_reference(x_nchw, kernel_size, sigma, border_type):
    """kornia.filters.gaussian_blur2d from its documented formula (kornia is not installed).

    1-D taps: exp(-(i - k // 2)^2 / (2 sigma^2)), i = 0..k-1, normalised to sum 1; kernel_size is
    (kH, kW) and sigma (sigma_y, sigma_x); pad k // 2 with torch F.pad(border_type), correlate with
    the W kernel, then pad and correlate with the H kernel (filter2d_separable), per channel.
    """
    (kh, kw), (sy, sx) = kernel_size, sigma
    t = torch.from_numpy(x_nchw)
    channels = t.shape[1]

    def taps(k, s):
        i = torch.arange(k, dtype=torch.float32) - k // 2
        g = torch.exp(-(i**2) / (2 * s**2))
        return g / g.sum()

    mode = border_type  # kornia hands border_type to torch's F.pad unchanged
    kx = taps(kw, sx).view(1, 1, 1, kw).repeat(channels, 1, 1, 1)
    t = F.conv2d(F.pad(t, (kw // 2, kw // 2, 0, 0), mode=mode), kx, groups=channels)
    ky = taps(kh, sy).view(1, 1, kh, 1).repeat(channels, 1, 1, 1)
    t = F.conv2d(F.pad(t, (0, 0, kh // 2, kh // 2), mode=mode), ky, groups=channels)
    return t.numpy()


@pytest.mark.torch
@pytest.mark.parametrize(
    ("kernel_size", "sigma", "border_type"),
    [
        ((7, 7), (1.0, 1.0), "reflect"),  # ACD-CLIP industrial
        ((9, 9), (1.5, 1.5), "reflect"),  # ACD-CLIP medical
        ((5, 3), (1.2, 0.8), "reflect"),
        ((7, 7), (1.0, 1.0), "replicate"),
        ((7, 5), (2.0, 1.0), "constant"),
        ((3, 7), (1.0, 3.0), "circular"),
    ],
)
def test_gaussian_blur2d_matches_kornia_formula(kernel_size, sigma, border_type):
    x = _uniform((2, 37, 30, 2))
    ours = jax.jit(lambda v: gaussian_blur2d(v, kernel_size, sigma, border_type))(jnp.asarray(x))
    ref = _kornia_reference(
        np.ascontiguousarray(np.moveaxis(x, -1, 1)), kernel_size, sigma, border_type
    )
    np.testing.assert_allclose(np.asarray(ours), np.moveaxis(ref, 1, -1), atol=1e-6)


@pytest.mark.torch
def test_gaussian_blur2d_scalar_arguments_and_maps():
    maps = _uniform((2, 37, 37))
    ours = jax.jit(lambda m: gaussian_blur2d(m, 7, 1.0))(jnp.asarray(maps))
    ref = _kornia_reference(maps[:, None], (7, 7), (1.0, 1.0), "reflect")[:, 0]
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-6)


def test_smoothing_rejects_bad_arguments():
    with pytest.raises(ValueError, match="layers/smoothing.py"):
        gaussian_blur2d(jnp.zeros((1, 8, 8, 1)), 4, 1.0)  # even kernel
    with pytest.raises(ValueError, match="layers/smoothing.py"):
        gaussian_blur2d(jnp.zeros((1, 3, 8, 1)), 9, 1.0)  # reflect pad wider than the map
    with pytest.raises(ValueError, match="layers/smoothing.py"):
        gaussian_blur2d(jnp.zeros((1, 8, 8, 1)), 3, 1.0, border_type="mirror")
    with pytest.raises(ValueError, match="layers/smoothing.py"):
        gaussian_filter_np(np.zeros((4, 4)), sigma=0)


# ----------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize(("size", "sigma"), [(1, 4.0), (3, 4.0), (5, 4.0), (9, 8.0), (4, 1.0)])
def test_gaussian_kernel_direct_formula(size, sigma):
    kernel = gaussian_kernel(size, sigma)
    c = (size - 1) / 2
    direct = np.array(
        [
            [math.exp(-((i - c) ** 2 + (j - c) ** 2) / (2 * sigma**2)) for j in range(size)]
            for i in range(size)
        ]
    )
    direct /= direct.sum()
    assert kernel.shape == (size, size) and kernel.dtype == np.float32
    np.testing.assert_allclose(kernel.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(kernel, direct, rtol=1e-6)


def _torch_unfold_aggregate(tokens, grid, size, sigma):
    """AF-CLIP's aggregation written with F.unfold (zero padding r // 2, weighted sum, CLS kept)."""
    t = torch.from_numpy(tokens)
    if size == 1:
        return tokens
    cls_token, patches = t[:, :1], t[:, 1:]
    b, n, d = patches.shape
    h, w = grid
    x = patches.reshape(b, h, w, d).permute(0, 3, 1, 2)
    cols = F.unfold(x, kernel_size=size, padding=size // 2, stride=1)  # (b, d * size^2, h * w)
    cols = cols.permute(0, 2, 1).reshape(-1, d, size * size).permute(0, 2, 1)
    c = (size - 1) / 2
    coords = torch.arange(size, dtype=torch.float64) - c
    weights = torch.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2 * sigma**2))
    weights = (weights / weights.sum()).float().reshape(1, size * size, 1)
    out = torch.sum(cols * weights, dim=1).reshape(b, n, d)
    return torch.cat([cls_token, out], dim=1).numpy()


@pytest.mark.torch
@pytest.mark.parametrize("grid", [(37, 37), (6, 9)])
def test_aggregate_neighbours_matches_torch_unfold(grid):
    sizes = (1, 3, 5)
    tokens = RNG.standard_normal((2, 1 + grid[0] * grid[1], 16)).astype(np.float32)
    outs = jax.jit(lambda t: aggregate_neighbours(t, grid, sizes, sigma=4.0))(jnp.asarray(tokens))
    assert len(outs) == len(sizes)
    for size, ours in zip(sizes, outs, strict=True):
        ref = _torch_unfold_aggregate(tokens, grid, size, 4.0)
        assert ours.shape == tokens.shape
        np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-6, rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(ours[:, 0]), tokens[:, 0])


def test_aggregate_neighbours_rejects_bad_grid_and_sizes():
    tokens = jnp.zeros((1, 1 + 12, 4))
    with pytest.raises(ValueError, match="layers/aggregation.py"):
        aggregate_neighbours(tokens, (3, 3))
    with pytest.raises(ValueError, match="layers/aggregation.py"):
        aggregate_neighbours(tokens, (3, 4), sizes=(1, 2))


# ----------------------------------------------------------------------------- sharding


def test_all_layers_jit_with_batch_sharded_over_eight_devices():
    mesh = jax.make_mesh((8,), ("data",))
    batch = NamedSharding(mesh, P("data"))
    grid_maps = _uniform((8, 37, 37, 2))
    tokens = _uniform((8, 1 + 37 * 37, 8))
    layers = {
        "resize": lambda m, t: resize_bilinear(m, 74, align_corners=True),
        "filter": lambda m, t: gaussian_filter(m[..., 0], 4.0),
        "blur_reflect": lambda m, t: gaussian_blur2d(m, 7, 1.0),
        "blur_replicate": lambda m, t: gaussian_blur2d(m, 5, 1.0, "replicate"),
        "aggregate": lambda m, t: aggregate_neighbours(t, (37, 37))[-1],
    }

    def all_layers(m, t):  # one jit for all layers: one compile instead of five
        return {name: layer(m, t) for name, layer in layers.items()}

    with jax.set_mesh(mesh):
        sharded = (jax.device_put(grid_maps, batch), jax.device_put(tokens, batch))
        outs = jax.jit(all_layers)(*sharded)
    refs = jax.jit(all_layers)(jnp.asarray(grid_maps), jnp.asarray(tokens))
    for name, out in outs.items():
        np.testing.assert_allclose(np.asarray(out), np.asarray(refs[name]), atol=1e-6, err_msg=name)
        assert out.sharding.is_equivalent_to(batch, out.ndim), name
