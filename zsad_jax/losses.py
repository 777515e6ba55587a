"""Training losses of the four methods, shared where the methods share them.

Every loss returns a float32 scalar. Pixel losses take an optional ``valid`` (B,) boolean: images
with image-level labels only (``has_mask`` False) are left out of the pixel terms, and a batch
without any valid image contributes 0 (never NaN). With every image valid each loss equals the
official one.

Targets may be given as 0/1 floats, 0/255 integers or booleans: integer and boolean targets are
binarised with ``> 0``, float targets with ``>= 0.5`` (so 0/255 floats work too).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zsad_jax.nn import l2_normalize


def binary_target(targets: jax.Array) -> jax.Array:
    """0/1 float32 targets from 0/1, 0/255 or boolean input (see module docstring)."""
    if jnp.issubdtype(targets.dtype, jnp.floating):
        return (targets >= 0.5).astype(jnp.float32)
    return (targets > 0).astype(jnp.float32)


def _image_weights(valid: jax.Array | None, batch: int) -> jax.Array:
    return jnp.ones((batch,), jnp.float32) if valid is None else valid.astype(jnp.float32)


def _weighted_mean(per_image: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean of per-image values over the images with weight 1; 0 when there are none."""
    return jnp.sum(per_image * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def binary_focal_loss(
    probs: jax.Array,
    targets: jax.Array,
    *,
    gamma: float = 4.0,
    normal_target: float = 0.0,
    valid: jax.Array | None = None,
) -> jax.Array:
    """AF-CLIP's focal loss on probabilities: ``BCE(p, t) * (1 - p_t)**gamma``, mean (alpha off).

    Args:
      probs: (B, ...) anomaly probabilities in (0, 1).
      targets: (B, ...) binary targets.
      gamma: focusing exponent (AF-CLIP: 4).
      normal_target: the target the *gradient* uses for normal elements. 0 is the clean loss. -1
        reproduces the official AF-CLIP backward: its patch alignment loss rewrites the saved pixel
        targets in place (0 -> -1) after the forward pass, so torch's BCE backward
        ``(p - t) / (p (1 - p))`` and the ``p * t`` term of ``p_t`` see -1 while the loss value is
        the one computed with 0 (see configs/af_clip.py for the evidence). The value never changes.
      valid: optional (B,) mask of images that take part.

    Returns:
      float32 scalar.
    """
    p = probs.astype(jnp.float32)
    t = binary_target(targets)
    # torch's binary_cross_entropy clamps each log term at -100.
    log_p = jnp.maximum(jnp.log(p), -100.0)
    log_1mp = jnp.maximum(jnp.log1p(-p), -100.0)
    ce = -(t * log_p + (1.0 - t) * log_1mp)
    p_t = p * t + (1.0 - p) * (1.0 - t)
    if normal_target != 0.0:
        # Zero-valued terms whose gradients are those of the rewritten targets:
        # d ce / dp gains -t'/(p(1-p)) = -t' d/dp logit(p); d p_t / dp gains t'.
        normal = 1.0 - t
        logit = log_p - log_1mp
        ce = ce - normal_target * normal * (logit - jax.lax.stop_gradient(logit))
        p_t = p_t + normal_target * normal * (p - jax.lax.stop_gradient(p))
    loss = ce * (1.0 - p_t) ** gamma
    per_image = loss.reshape(loss.shape[0], -1).mean(axis=1)
    return _weighted_mean(per_image, _image_weights(valid, loss.shape[0]))


def focal_loss_two_class(
    probs: jax.Array,
    targets: jax.Array,
    *,
    gamma: float = 2.0,
    smooth: float = 1e-5,
    valid: jax.Array | None = None,
) -> jax.Array:
    """The dense focal loss AVA-DINO and ACD-CLIP use (Hsuxu's Loss_ToolBox), alpha = 1.

    ``one_hot`` is clamped to [smooth, 1 - smooth]; ``p_t = sum(one_hot * p) + smooth``;
    loss ``-(1 - p_t)**gamma * log(p_t)``, mean over all pixels.

    Args:
      probs: (B, H, W, 2) softmax probabilities (normal, anomalous), channel last.
      targets: (B, H, W) binary mask.
    """
    p = probs.astype(jnp.float32)
    t = binary_target(targets)
    one_hot = jnp.stack([1.0 - t, t], axis=-1)
    one_hot = jnp.clip(one_hot, smooth, 1.0 - smooth)
    p_t = jnp.sum(one_hot * p, axis=-1) + smooth
    loss = -((1.0 - p_t) ** gamma) * jnp.log(p_t)
    per_image = loss.reshape(loss.shape[0], -1).mean(axis=1)
    return _weighted_mean(per_image, _image_weights(valid, loss.shape[0]))


def dice_loss(
    pred: jax.Array, targets: jax.Array, *, smooth: float = 1.0, valid: jax.Array | None = None
) -> jax.Array:
    """Soft binary Dice: ``1 - mean_b (2 sum(p t) + s) / (sum p + sum t + s)``.

    ``targets`` are used as given (float), so ``1 - mask`` works for the normal channel.
    """
    b = pred.shape[0]
    p = pred.astype(jnp.float32).reshape(b, -1)
    t = targets.astype(jnp.float32).reshape(b, -1)
    dice = (2.0 * jnp.sum(p * t, axis=1) + smooth) / (
        jnp.sum(p, axis=1) + jnp.sum(t, axis=1) + smooth
    )
    # mean_b(1 - dice_b) == 1 - mean_b(dice_b), and is 0 when no image is valid.
    return _weighted_mean(1.0 - dice, _image_weights(valid, b))


def l1_loss(pred: jax.Array, targets: jax.Array, *, valid: jax.Array | None = None) -> jax.Array:
    """Mean absolute error (AF-CLIP's pixel L1 term), targets binarised."""
    err = jnp.abs(pred.astype(jnp.float32) - binary_target(targets))
    per_image = err.reshape(err.shape[0], -1).mean(axis=1)
    return _weighted_mean(per_image, _image_weights(valid, err.shape[0]))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy of (B, C) logits with integer labels, mean over the batch."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))


def binary_cross_entropy(probs: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean BCE on probabilities (torch semantics: log terms clamped at -100)."""
    p = probs.astype(jnp.float32)
    t = binary_target(labels)
    log_p = jnp.maximum(jnp.log(p), -100.0)
    log_1mp = jnp.maximum(jnp.log1p(-p), -100.0)
    return -jnp.mean(t * log_p + (1.0 - t) * log_1mp)


def patch_alignment_loss(
    token_sets: jax.Array, patch_targets: jax.Array, *, valid: jax.Array | None = None
) -> jax.Array:
    """AF-CLIP's patch alignment loss, averaged over token sets.

    Per token set: tokens L2-normalised, ``S = T T^T`` over the patches of each image, pairs
    labelled +1 (same state) or -1 (normal with anomalous) by ``outer(g, g)`` with g = +-1;
    ``max(0, mean(S[-1 pairs]) - mean(S[+1 pairs]))`` with both means over the whole batch.

    The pair sums are computed without forming S: over same-state pairs ``sum S = |sum_a|^2 +
    |sum_n|^2`` and over mixed pairs ``2 sum_a . sum_n``, where ``sum_a``/``sum_n`` are the sums of
    an image's anomalous/normal normalised tokens: O(N D) instead of O(N^2 D), same value.

    A batch with no mixed pair (all normal, or all anomalous) gives 0, as the official code does
    (its NaN mean is compared with 0).

    Args:
      token_sets: (S, B, N, D) patch tokens (no CLS) of each token set.
      patch_targets: (B, N) binary patch labels.
      valid: optional (B,) images with pixel ground truth.
    """
    x = l2_normalize(token_sets)
    g = binary_target(patch_targets)
    w = _image_weights(valid, g.shape[0])[:, None]
    anomalous, normal = g * w, (1.0 - g) * w
    sum_a = jnp.einsum("bn,sbnd->sbd", anomalous, x)
    sum_n = jnp.einsum("bn,sbnd->sbd", normal, x)
    same = jnp.sum(sum_a**2, axis=(1, 2)) + jnp.sum(sum_n**2, axis=(1, 2))
    mixed = 2.0 * jnp.sum(sum_a * sum_n, axis=(1, 2))
    n_a, n_n = anomalous.sum(axis=1), normal.sum(axis=1)
    same_count = jnp.sum(n_a**2 + n_n**2)
    mixed_count = jnp.sum(2.0 * n_a * n_n)
    gap = mixed / jnp.maximum(mixed_count, 1.0) - same / jnp.maximum(same_count, 1.0)
    per_set = jnp.where(mixed_count > 0, jnp.maximum(gap, 0.0), 0.0)
    return jnp.mean(per_set)


def routing_loss(w_normal: jax.Array, w_anomalous: jax.Array, labels: jax.Array) -> jax.Array:
    """AVA-DINO's routing loss: ``MSE(w_n, 1 - y) + MSE(w_a, y)`` on layer-averaged weights (B,)."""
    y = binary_target(labels)
    return jnp.mean((w_normal - (1.0 - y)) ** 2) + jnp.mean((w_anomalous - y) ** 2)
