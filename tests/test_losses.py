"""Losses against direct NumPy/PyTorch computations of the official formulas on fixed inputs."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from extras import optional

from zsad_jax import losses

# None without the convert extra; the tests that use it are marked torch (tests/extras.py).
torch = optional("torch")
F = optional("torch.nn.functional")

RNG = np.random.default_rng(0)


def _probs(shape):
    return RNG.uniform(0.02, 0.98, size=shape).astype(np.float32)


def _mask(shape, frac=0.3):
    return (RNG.uniform(size=shape) < frac).astype(np.float32)


def _torch_binary_focal(p, t, gamma):
    ce = F.binary_cross_entropy(p, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    return (ce * (1 - p_t) ** gamma).mean()


@pytest.mark.torch
@pytest.mark.parametrize("gamma", [2.0, 4.0])
def test_binary_focal_value_and_grad_match_torch(gamma):
    p, t = _probs((3, 5, 5)), _mask((3, 5, 5))
    tp = torch.tensor(p, requires_grad=True)
    ref = _torch_binary_focal(tp, torch.tensor(t), gamma)
    ref.backward()
    val, grad = jax.value_and_grad(lambda x: losses.binary_focal_loss(x, t, gamma=gamma))(p)
    np.testing.assert_allclose(val, ref.item(), rtol=1e-5)
    np.testing.assert_allclose(grad, tp.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_binary_focal_accepts_0_255_and_bool_targets():
    p, t = _probs((2, 4, 4)), _mask((2, 4, 4))
    ref = losses.binary_focal_loss(p, t)
    np.testing.assert_allclose(losses.binary_focal_loss(p, (t * 255).astype(np.uint8)), ref)
    np.testing.assert_allclose(losses.binary_focal_loss(p, t * 255.0), ref)
    np.testing.assert_allclose(losses.binary_focal_loss(p, t.astype(bool)), ref)


@pytest.mark.torch
def test_binary_focal_normal_target_reproduces_official_in_place_rewrite():
    """The official AF-CLIP step: pixel focal loss, then the alignment loss rewrites its targets
    (``main.py:patch_alignment_loss``: ``new_gts = copy.copy(gts)``, ``new_gts[new_gts == 0] = -1``;
    the gradient of normal patches is then pushed down harder than the logged loss says).

    ``copy.copy`` of a torch tensor shares storage (a Tensor has no ``__copy__``; ``__reduce_ex__``
    rebuilds it on the same storage with a fresh version counter), so ``new[new == 0] = -1``
    changes the targets autograd saved for the focal loss (in ``F.binary_cross_entropy`` and
    ``inputs * targets``) without an in-place error. This runs that sequence in torch and checks
    that the loss value is the clean one while the gradient is reproduced by ``normal_target=-1``.
    The L1 term needs no switch: its backward ``sign(p - t)`` is the same for t = 0 and t = -1
    because p > 0.
    """
    p, t = _probs((2, 6, 6)), _mask((2, 6, 6))
    tp = torch.tensor(p, requires_grad=True)
    gts = torch.tensor(t)
    loss = _torch_binary_focal(tp, gts, 4.0)
    clean_value = loss.item()
    new_gts = copy.copy(gts.reshape(2, -1))
    new_gts[new_gts == 0] = -1
    assert (gts == -1).any(), "torch no longer shares storage under copy.copy"
    loss.backward()

    value, grad = jax.value_and_grad(
        lambda x: losses.binary_focal_loss(x, t, gamma=4.0, normal_target=-1.0)
    )(p)
    np.testing.assert_allclose(value, clean_value, rtol=1e-6)
    np.testing.assert_allclose(grad, tp.grad.numpy(), rtol=1e-4, atol=1e-7)
    clean_grad = jax.grad(lambda x: losses.binary_focal_loss(x, t, gamma=4.0))(p)
    assert np.abs(np.asarray(clean_grad) - tp.grad.numpy()).max() > 1e-3


def _torch_focal_two_class(probs_nchw, target, gamma=2.0, smooth=1e-5):
    c = probs_nchw.shape[1]
    logit = probs_nchw.reshape(probs_nchw.shape[0], c, -1).permute(0, 2, 1).reshape(-1, c)
    idx = target.reshape(-1, 1).long()
    one_hot = torch.zeros(idx.shape[0], c).scatter_(1, idx, 1)
    one_hot = one_hot.clamp(smooth / (c - 1), 1 - smooth)
    pt = (one_hot * logit).sum(1) + smooth
    return (-torch.pow(1 - pt, gamma) * pt.log()).mean()


@pytest.mark.torch
def test_focal_two_class_matches_torch_transcription():
    logits = RNG.normal(size=(2, 7, 7, 2)).astype(np.float32)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    t = _mask((2, 7, 7))
    ref = _torch_focal_two_class(torch.tensor(probs).permute(0, 3, 1, 2), torch.tensor(t))
    np.testing.assert_allclose(losses.focal_loss_two_class(probs, t), ref.item(), rtol=1e-5)


def test_dice_matches_numpy():
    p, t = _probs((3, 6, 6)), _mask((3, 6, 6))
    pf, tf = p.reshape(3, -1), t.reshape(3, -1)
    ref = 1 - np.mean((2 * (pf * tf).sum(1) + 1) / (pf.sum(1) + tf.sum(1) + 1))
    np.testing.assert_allclose(losses.dice_loss(p, t), ref, rtol=1e-5)


def test_pixel_losses_skip_images_without_masks():
    p, t = _probs((3, 4, 4)), _mask((3, 4, 4))
    valid = np.array([True, False, True])
    keep = valid.nonzero()[0]
    for fn in (
        losses.binary_focal_loss,
        losses.focal_loss_two_class,
        losses.dice_loss,
        losses.l1_loss,
    ):
        x = np.stack([1 - p, p], -1) if fn is losses.focal_loss_two_class else p
        np.testing.assert_allclose(fn(x, t, valid=valid), fn(x[keep], t[keep]), rtol=1e-6)
        assert float(fn(x, t, valid=np.zeros(3, bool))) == 0.0


def _alignment_reference(tokens, gts):
    """Official semantics with the explicit N x N similarity matrix."""
    g = np.where(gts > 0, 1.0, -1.0)
    if not (g == -1).any():
        return 0.0
    m = g[:, :, None] * g[:, None, :]
    total = 0.0
    for x in tokens:
        x = x / np.linalg.norm(x, axis=-1, keepdims=True)
        s = np.einsum("bnd,bmd->bnm", x, x)
        gap = s[m == -1].mean() - s[m == 1].mean() if (m == -1).any() else np.nan
        total += gap if gap > 0 else 0.0
    return total / len(tokens)


def test_patch_alignment_matches_explicit_similarity_matrix():
    rng = np.random.default_rng(1)
    tokens = rng.normal(size=(3, 2, 16, 8)).astype(np.float32)
    gts = (rng.uniform(size=(2, 16)) < 0.2).astype(np.float32)
    gts[:, 0] = 1
    # In set 1, diverse normal tokens sharing a direction u and anomalous tokens equal to u make
    # mixed pairs more similar on average than same-state pairs, so that set's term is positive.
    u = np.eye(8, dtype=np.float32)[0]
    tokens[1] = np.where(gts[:, :, None] > 0, u, u + 2.0 * tokens[1])
    ref = _alignment_reference(tokens, gts)
    assert ref > 0
    np.testing.assert_allclose(losses.patch_alignment_loss(tokens, gts), ref, rtol=1e-5)


def test_patch_alignment_is_zero_not_nan_without_mixed_pairs():
    tokens = jnp.asarray(RNG.normal(size=(2, 2, 9, 4)), jnp.float32)
    for gts in (np.zeros((2, 9)), np.ones((2, 9))):
        value, grad = jax.value_and_grad(losses.patch_alignment_loss)(tokens, gts)
        assert float(value) == 0.0 and np.isfinite(np.asarray(grad)).all()


@pytest.mark.torch
def test_routing_and_cross_entropy_match_numpy():
    wn = RNG.uniform(size=5).astype(np.float32)
    y = np.array([0, 1, 1, 0, 1])
    ref = np.mean((wn - (1 - y)) ** 2) + np.mean(((1 - wn) - y) ** 2)
    np.testing.assert_allclose(losses.routing_loss(wn, 1 - wn, y), ref, rtol=1e-6)
    logits = RNG.normal(size=(5, 2)).astype(np.float32)
    ref_ce = F.cross_entropy(torch.tensor(logits), torch.tensor(y)).item()
    np.testing.assert_allclose(losses.cross_entropy(logits, y), ref_ce, rtol=1e-6)
    p = _probs((5,))
    ref_bce = F.binary_cross_entropy(torch.tensor(p), torch.tensor(y, dtype=torch.float32)).item()
    np.testing.assert_allclose(losses.binary_cross_entropy(p, y), ref_bce, rtol=1e-6)
