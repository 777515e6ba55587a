r"""Pretrain a small DINOv3 on procedural *normal* images with a self-supervised pretext task.

    python -m zsad_jax.pretrain.backbone --out pretrained/dinov3-small-procedural

writes a converted encoder checkpoint (``zsad_jax.encoders.checkpoint``: ``config.json`` +
``weights.safetensors``) that ``configs/demo.py`` loads as its frozen backbone, plus
``pretrain.json`` (the command, every option, the validation metrics, seconds).

What it sees (training side only): normal images rendered from the auxiliary families
(``zsad_jax.data.procedural_scenes``, fresh styles drawn per image) and the synthetic benchmark's
six *training* categories. No held-out category (the benchmark's wood/dots/washer/pill, the
``synthetic_novel`` family) and no defect generator is ever rendered; no image carries a label.

Pretext task (self-supervised anomaly synthesis, as CutPaste / NSA): with probability
``--p_corrupt`` an image gets one or two blobs of *normal* content pasted in from elsewhere, from
the same image (rotated, rescaled, flipped, re-tinted) or from another normal image of the pool.
The network learns to say where (per patch, linear probes on the per-image standardised tokens of
each tapped block, as AVA-DINO reads them) and whether (a linear probe on the CLS token of each
tapped block), and to reconstruct the clean patch pixels from the last block's tokens. The probes
and the decoder are thrown away; only the backbone is written.

Validation (``pretrain.json`` ``val``): on a fixed set of corrupted images from a separate seed,
the AUROC of the last probe's patch scores (``patch_AUROC``) and of the CLS probe
(``image_AUROC``), and the mean loss. After the full run the script also runs the same options at
the reduced scale ``REDUCED`` (about half a minute on 2 CPU cores) and records that run as
``reduced``; ``tests/test_demo_transfer.py`` re-runs it and compares. ``--no_reduced`` skips it
(``reduced`` is then null). A refusal (``--out`` already holds something) is one line
``error: ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from zsad_jax import metrics
from zsad_jax.data import (
    procedural,
    procedural_scenes,
    synthetic,
    synthetic_defects,
    synthetic_scenes,
)
from zsad_jax.data.procedural_defects import sample
from zsad_jax.data.synthetic_defects import _blob_sdf
from zsad_jax.data.synthetic_scenes import coverage
from zsad_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from zsad_jax.encoders import checkpoint, dinov3
from zsad_jax.errors import run_command
from zsad_jax.methods.ava_dino import standardize_tokens
from zsad_jax.nn import TORCH_DEFAULT_KERNEL_INIT, l2_normalize

DEFAULTS = {
    "seed": 0,
    "image_size": 128,
    "hidden_size": 96,
    "num_layers": 6,
    "num_heads": 4,
    "mlp_dim": 192,
    "patch_size": 8,
    "layer_scale": 1.0,
    "layers": "2,4,6",
    "pool": 2048,
    "val": 96,
    "steps": 1600,
    "batch": 16,
    "crop": 64,
    "crop_fraction": 0.75,
    "lr": 2e-3,
    "weight_decay": 0.05,
    "warmup": 100,
    "p_corrupt": 0.6,
    "recon_weight": 0.5,
    "image_weight": 0.5,
    "log_every": 50,
    "hold_out": "",
}
# The reduced-scale run recorded beside a full one (``pretrain.json`` ``reduced``) and re-run by
# tests/test_demo_transfer.py: the same options at a smaller scale. Its time is mostly compiling
# (three training programs and the validation one, whatever the scale); 8 steps still reach both
# batch shapes (6 on crops, 2 on whole images), the warmup and the cosine decay, and moving the
# learning rate by a quarter or the seed moves its validation loss by 4-9 %, past the test's 2 %
# (the earlier scale, 40 steps of batch 8, took about 3x as long and missed that learning rate).
REDUCED = {"steps": 8, "pool": 32, "val": 16, "batch": 4, "warmup": 2, "log_every": 2}
# The benchmark's training categories are drawn with this probability, else an auxiliary style.
P_BENCHMARK = 0.3
# Initial patch-probe bias: about the share of pasted patches (~5 %).
PATCH_PRIOR_LOGIT = -3.0
# Logit scale of the patch probe's cosine (AVA-DINO's maps use 100 on a difference of two).
PROBE_SCALE = 20.0


# --- data ---------------------------------------------------------------------------------------


def hold_out_families(value: str) -> tuple[str, ...]:
    """``--hold_out``'s auxiliary family names, checked: "" is none."""
    try:
        names = procedural.aux_families(value)
    except ValueError as e:
        raise ValueError(f"--hold_out {value}: {e}") from None
    if set(procedural_scenes.AUX_FAMILIES) <= set(names):
        raise ValueError(f"--hold_out {value}: holds out every auxiliary family; keep one or more")
    return names


def render_normal(
    rng: np.random.Generator, size: int, seed: int, hold_out: Sequence[str] = ()
) -> np.ndarray:
    """One normal training-side image (S, S, 3) uint8: a benchmark training category, or a fresh
    style of an auxiliary family not in ``hold_out``."""
    if rng.random() < P_BENCHMARK:
        names = synthetic.SYNTHETIC_TRAIN_CATEGORIES
        scene = synthetic_scenes.RENDERERS[names[int(rng.integers(len(names)))]](rng, size)
    else:
        # Without hold_out the same list, so the same draws as before the option existed.
        families = [f for f in procedural_scenes.AUX_FAMILIES if f not in hold_out]
        family = families[int(rng.integers(len(families)))]
        style = procedural.aux_style(family, int(rng.integers(1_000_000)), seed)
        scene = procedural_scenes.AUX_FAMILIES[family][1](style, rng, size)
    return synthetic_defects.finish(rng, scene.image)


def normal_pool(
    n: int, size: int, seed: int, stream: int = 0, hold_out: Sequence[str] = ()
) -> np.ndarray:
    """(n, S, S, 3) uint8 normal images; image i from ``SeedSequence((seed, stream, i))``."""
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence((int(seed), int(stream), i)))
        out[i] = render_normal(rng, size, seed, hold_out)
    return out


def corrupt(rng: np.random.Generator, image: np.ndarray, pool: np.ndarray, ref: int = 128):
    """Pastes 1-2 blobs of normal content into ``image`` (S, S, 3) float in [0, 1]; returns the
    image and its (S, S) float mask (1 inside a visible pasted blob). Blob sizes are fractions of
    ``ref`` pixels (the full image side, also when ``image`` is a crop)."""
    size = image.shape[0]
    x, y = synthetic_scenes.pixel_grid(size)
    out = image.copy()
    mask = np.zeros((size, size), np.float32)
    for _ in range(1 + int(rng.random() < 0.3)):
        for _attempt in range(6):
            cx, cy = rng.uniform(0.1, 0.9, 2) * size
            radius = rng.uniform(0.04, 0.14) * ref
            cov = coverage(
                _blob_sdf(rng, size, cx, cy, radius, roughness=rng.uniform(0.05, 0.3)),
                rng.choice([1.0, rng.uniform(1.0, 4.0)]),
            )
            if rng.random() < 0.5:
                source = out
            else:
                source = pool[int(rng.integers(len(pool)))].astype(np.float32) / 255.0
            sx, sy = rng.uniform(0.1, 0.9, 2) * source.shape[0]
            a, scale = rng.uniform(0, 2 * np.pi), math.exp(rng.uniform(-0.5, 0.5))
            flip = rng.choice([-1.0, 1.0])
            du, dv = (x - cx) / scale, flip * (y - cy) / scale
            patch = sample(
                source,
                sx + math.cos(a) * du - math.sin(a) * dv,
                sy + math.sin(a) * du + math.cos(a) * dv,
            )
            if rng.random() < 0.5:
                patch = patch * rng.uniform(0.75, 1.25, 3) + rng.uniform(-0.08, 0.08)
            alpha = cov * rng.uniform(0.6, 1.0)
            blended = out + (np.clip(patch, 0, 1) - out) * alpha[..., None]
            inside = cov >= 0.5
            change = np.abs(blended - out).max(-1)
            if inside.sum() >= 8 and float(change[inside].mean()) >= 0.05:
                out = blended
                mask = np.maximum(mask, inside.astype(np.float32))
                break
    return out, mask


def make_batch(
    rng: np.random.Generator,
    pool: np.ndarray,
    batch: int,
    p_corrupt: float,
    patch: int,
    crop: int | None = None,
):
    """A training batch: normalised corrupted images (B, S, S, 3), clean normalised images, patch
    targets (B, N) (fraction of each patch's pixels inside a pasted blob), image labels (B,).
    ``crop``: random ``crop x crop`` windows of the pool images instead (S = crop)."""
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    picks = rng.integers(len(pool), size=batch)
    images, clean, targets, labels = [], [], [], []
    for k in picks:
        base = pool[k].astype(np.float32) / 255.0
        if rng.random() < 0.5:  # flips and quarter turns of the clean image
            base = base[:, ::-1]
        base = np.rot90(base, int(rng.integers(4)))
        if crop:
            y0, x0 = rng.integers(0, base.shape[0] - crop + 1, 2)
            base = base[y0 : y0 + crop, x0 : x0 + crop]
        base = base.copy()
        if rng.random() < p_corrupt:
            img, mask = corrupt(rng, base, pool, ref=pool.shape[1])
        else:
            img, mask = base, np.zeros(base.shape[:2], np.float32)
        s = base.shape[0] // patch
        frac = mask.reshape(s, patch, s, patch).mean(axis=(1, 3)).reshape(-1)
        images.append((img - mean) / std)
        clean.append((base - mean) / std)
        targets.append(frac)
        labels.append(float(mask.any()))
    return (
        np.stack(images).astype(np.float32),
        np.stack(clean).astype(np.float32),
        np.stack(targets).astype(np.float32),
        np.asarray(labels, np.float32),
    )


# --- model --------------------------------------------------------------------------------------


class PatchProbe(nnx.Module):
    """Reads a patch score off standardised tokens the way AVA-DINO's heads can: a residual
    bottleneck without biases (LeakyReLU), L2-normalised, then a dot product, so the score
    depends on the token's direction only (``zsad_jax.methods.ava_dino`` ``DualAdapter`` + the
    cross-modal map). A plain linear probe cannot see "far from the image's other tokens in any
    direction", which is what a pasted blob first looks like; this one can."""

    def __init__(self, d: int, rngs: nnx.Rngs, bottleneck: int = 64):
        init = TORCH_DEFAULT_KERNEL_INIT
        self.fc1 = nnx.Linear(d, bottleneck, use_bias=False, kernel_init=init, rngs=rngs)
        self.fc2 = nnx.Linear(bottleneck, d, use_bias=False, kernel_init=init, rngs=rngs)
        self.direction = nnx.Param(nnx.initializers.normal(0.01)(rngs.params(), (d,)))
        self.bias = nnx.Param(jnp.full((), PATCH_PRIOR_LOGIT, jnp.float32))

    def __call__(self, z: jax.Array) -> jax.Array:
        """(B, N, D) standardised tokens -> (B, N) logits."""
        y = jax.nn.leaky_relu(self.fc2(jax.nn.leaky_relu(self.fc1(z), 0.01)), 0.01)
        v = l2_normalize(z + y)
        return PROBE_SCALE * (v @ self.direction[...]) + self.bias[...]


def dinov3_config(opts: dict):
    return dinov3.DinoV3Config(
        hidden_size=int(opts["hidden_size"]),
        num_layers=int(opts["num_layers"]),
        num_heads=int(opts["num_heads"]),
        mlp_dim=int(opts["mlp_dim"]),
        patch_size=int(opts["patch_size"]),
    )


def _layers(opts: dict) -> tuple[int, ...]:
    return tuple(int(i) for i in str(opts["layers"]).split(","))


def build(opts: dict):
    """(backbone, probes) with weights from ``opts["seed"]``."""
    rngs = nnx.Rngs(int(opts["seed"]))
    cfg = dinov3_config(opts)
    backbone = dinov3.DinoV3(cfg, rngs=rngs)
    # DINOv3's LayerScale starts at 1e-5, which for a few thousand steps from scratch leaves the
    # blocks (and their gradients) all but switched off; start the residual branches at this.
    for block in backbone.blocks:
        for scale in (block.layer_scale1, block.layer_scale2):
            scale.gamma[...] = jnp.full_like(scale.gamma[...], float(opts["layer_scale"]))
    d, p, n = cfg.hidden_size, cfg.patch_size, len(_layers(opts))

    small = nnx.initializers.normal(0.01)

    def probe(bias: float):
        # Starts at the base rate (a bias Adam would need thousands of steps to reach).
        return nnx.Linear(
            d, 1, kernel_init=small, bias_init=nnx.initializers.constant(bias), rngs=rngs
        )

    class Probes(nnx.Module):
        def __init__(self):
            self.patch = nnx.List([PatchProbe(d, rngs) for _ in range(n)])
            self.image = nnx.List([probe(0.0) for _ in range(n)])
            self.decoder = nnx.Linear(d, p * p * 3, rngs=rngs)

    return backbone, Probes()


def forward(backbone, probes, images, layers: Sequence[int]):
    """-> patch logits per layer (L, B, N), image logits (L, B), reconstruction (B, N, p*p*3)."""
    _, aux = backbone(images, layers=layers)
    prefix = backbone.num_prefix_tokens
    patch_logits, image_logits = [], []
    tokens = None
    for k, i in enumerate(layers):
        tokens = backbone.norm(aux["layers"][i])
        patches = standardize_tokens(tokens[:, prefix:])
        patch_logits.append(probes.patch[k](patches))
        image_logits.append(probes.image[k](tokens[:, 0])[..., 0])
    recon = probes.decoder(tokens[:, prefix:])
    return jnp.stack(patch_logits), jnp.stack(image_logits), recon


def _patchify(images, p: int):
    b, h, w, c = images.shape
    x = images.reshape(b, h // p, p, w // p, p, c)
    return jnp.transpose(x, (0, 1, 3, 2, 4, 5)).reshape(b, (h // p) * (w // p), p * p * c)


def losses(backbone, probes, batch, opts: dict):
    """(total loss, its parts) of ``batch``."""
    return losses_of(forward(backbone, probes, batch[0], _layers(opts)), batch, opts)


def losses_of(outputs, batch, opts: dict):
    """``losses`` from ``forward``'s outputs on ``batch``'s images."""
    _, clean, targets, labels = batch
    patch_logits, image_logits, recon = outputs
    patch_bce = jnp.mean(optax.sigmoid_binary_cross_entropy(patch_logits, targets[None]))
    image_bce = jnp.mean(optax.sigmoid_binary_cross_entropy(image_logits, labels[None]))
    rec = jnp.mean((recon - _patchify(clean, int(opts["patch_size"]))) ** 2)
    total = patch_bce + float(opts["image_weight"]) * image_bce + float(opts["recon_weight"]) * rec
    return total, {"patch_bce": patch_bce, "image_bce": image_bce, "recon": rec}


# --- training -----------------------------------------------------------------------------------


def validation_set(opts: dict, pool_val: np.ndarray):
    rng = np.random.default_rng(np.random.SeedSequence((int(opts["seed"]), 99)))
    return make_batch(rng, pool_val, len(pool_val), 0.5, int(opts["patch_size"]))


def evaluate_val(backbone, probes, val, opts: dict, batch: int = 32) -> dict[str, float]:
    """Patch and image AUROC of the last tapped block's probes, and the mean loss, on ``val``."""
    layers = _layers(opts)

    @jax.jit  # one program for the scores and the loss: one forward pass to compile, not two
    def scores_and_loss(part):
        outputs = forward(backbone, probes, part[0], layers)
        return outputs[0][-1], outputs[1][-1], losses_of(outputs, part, opts)[0]

    patch, image, loss = [], [], []
    n = len(val[0])
    for s in range(0, n, batch):
        part = tuple(v[s : s + batch] for v in val)
        pl, il, part_loss = scores_and_loss(part)
        patch.append(np.asarray(pl))
        image.append(np.asarray(il))
        loss.append(float(part_loss) * len(part[0]))
    patch_scores = np.concatenate(patch).reshape(-1)
    patch_labels = (val[2].reshape(-1) >= 0.5).astype(np.int32)
    return {
        "patch_AUROC": float(metrics.auroc(patch_scores, patch_labels)),
        "image_AUROC": float(metrics.auroc(np.concatenate(image), val[3].astype(np.int32))),
        "loss": float(np.sum(loss) / n),
    }


def pretrain(opts: dict, *, log=print) -> tuple[object, dict]:
    """Runs the pretraining of ``opts`` (``DEFAULTS`` keys); returns (backbone, record)."""
    start = time.time()
    opts = {**DEFAULTS, **opts}
    size, seed = int(opts["image_size"]), int(opts["seed"])
    hold_out = hold_out_families(opts["hold_out"])
    pool = normal_pool(int(opts["pool"]), size, seed, stream=0, hold_out=hold_out)
    pool_val = normal_pool(int(opts["val"]), size, seed, stream=1, hold_out=hold_out)
    val = validation_set(opts, pool_val)
    log(f"pool {pool.shape} + val {pool_val.shape} rendered in {time.time() - start:.1f} s")
    backbone, probes = build(opts)
    history = _train(backbone, probes, pool, opts, log=log, start=start)
    record = {
        "options": opts,
        "val": evaluate_val(backbone, probes, val, opts),
        "history": history,
        "seconds": round(time.time() - start, 1),
        "jax": jax.__version__,
        "numpy": np.__version__,
    }
    return backbone, record


def _train(backbone, probes, pool: np.ndarray, opts: dict, *, log, start: float) -> list[dict]:
    """Trains ``backbone`` and ``probes`` in place; the mean losses of each logging window."""
    steps = int(opts["steps"])
    both = nnx.List([backbone, probes])
    optimizer = nnx.Optimizer(both, _optimizer(opts), wrt=nnx.Param)
    step = _train_step(opts)
    rng = np.random.default_rng(np.random.SeedSequence((int(opts["seed"]), 1)))
    history = []
    running = []
    crop_steps = int(round(steps * float(opts["crop_fraction"])))
    for i in range(steps):
        batch = _training_batch(rng, pool, opts, cropped=i < crop_steps)
        running.append(step(both, optimizer, batch))
        if (i + 1) % int(opts["log_every"]) == 0 or i + 1 == steps:
            mean = _mean_losses(running)
            running = []
            history.append({"step": i + 1, **mean})
            log(json.dumps({"step": i + 1, **{k: round(v, 4) for k, v in mean.items()},
                            "seconds": round(time.time() - start, 1)}))  # fmt: skip
    return history


def _optimizer(opts: dict) -> optax.GradientTransformation:
    """AdamW on a warmup-cosine schedule (down to 1 % of ``lr``), gradients clipped to norm 1."""
    steps = int(opts["steps"])
    # The clamps keep the warmup shorter than the schedule, also for the tests' few-step runs.
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        float(opts["lr"]),
        min(int(opts["warmup"]), max(steps - 1, 1)),
        max(steps, 2),
        float(opts["lr"]) * 0.01,
    )
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, weight_decay=float(opts["weight_decay"])),
    )


def _train_step(opts: dict):
    """The step: ``(both, optimizer, batch) -> (loss, parts)``, updating in place.

    Two jitted programs: the loss and its gradients, compiled once per batch shape (the crops,
    then the whole images), and the optimizer update, which does not depend on the batch and so
    is compiled once; in one program with the gradients it was traced and compiled twice (4 s
    more on 2 CPU cores). At XLA's default options the numbers are the same bit for bit (the
    reduced run's losses and validation); under other compile options (the tests' -O0) the
    split can move them by float rounding."""

    @nnx.jit
    def gradients(both, batch):
        def loss_fn(both):
            return losses(both[0], both[1], batch, opts)

        return nnx.value_and_grad(loss_fn, has_aux=True)(both)

    @nnx.jit
    def update(both, optimizer, grads):
        optimizer.update(both, grads)

    def step(both, optimizer, batch):
        (loss, parts), grads = gradients(both, batch)
        update(both, optimizer, grads)
        return loss, parts

    return step


def _training_batch(rng: np.random.Generator, pool: np.ndarray, opts: dict, *, cropped: bool):
    """One step's batch; ``cropped``: twice the images at a quarter of the pixels (~2x cheaper
    steps, the first ``crop_fraction`` of training)."""
    if cropped:
        return make_batch(
            rng,
            pool,
            2 * int(opts["batch"]),
            float(opts["p_corrupt"]),
            int(opts["patch_size"]),
            crop=int(opts["crop"]),
        )
    return make_batch(
        rng, pool, int(opts["batch"]), float(opts["p_corrupt"]), int(opts["patch_size"])
    )


def _mean_losses(running: list) -> dict[str, float]:
    """The mean of each loss part over a logging window's steps, then the total's (``loss``)."""
    mean = {k: float(np.mean([float(p[k]) for _, p in running])) for k in running[0][1]}
    mean["loss"] = float(np.mean([float(v) for v, _ in running]))
    return mean


def save(backbone, out: str, record: dict, command: str) -> str:
    """Writes ``out`` as a converted dinov3 checkpoint plus ``pretrain.json``."""
    record = {**record, "command": command}
    with tempfile.TemporaryDirectory() as tmp:
        side = os.path.join(tmp, "pretrain.json")
        with open(side, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        checkpoint.save(
            out,
            "dinov3",
            backbone.config.to_dict(),
            {k: np.asarray(v) for k, v in checkpoint.flat_state(backbone).items()},
            source=f"zsad_jax.pretrain.backbone: {command}",
            extra_files=[side],
        )
    return out


# What each option sets (``--help``, which adds the default from ``DEFAULTS``).
OPTION_HELP = {
    "seed": "seed of the weights, the rendered images, the batches and the validation set",
    "image_size": "side of the rendered images in pixels (the demo reads 128)",
    "hidden_size": "token width of the DINOv3",
    "num_layers": "transformer blocks",
    "num_heads": "attention heads per block",
    "mlp_dim": "hidden width of each block's MLP",
    "patch_size": "patch side in pixels",
    "layer_scale": "initial LayerScale of every residual branch (DINOv3's own is 1e-5)",
    "layers": "tapped blocks (comma-separated, 1 = the first) whose tokens the probes read",
    "pool": "normal training images, rendered once before training",
    "val": "validation images (a separate seed stream), half of them corrupted",
    "steps": "training steps",
    "batch": "images per step (twice as many crops during the first --crop_fraction)",
    "crop": "side in pixels of the random crops trained on first",
    "crop_fraction": "share of the steps that train on crops",
    "lr": "peak learning rate (AdamW, warmup then cosine down to 1%%)",
    "weight_decay": "AdamW weight decay",
    "warmup": "linear warmup steps",
    "p_corrupt": "probability that a training image gets pasted blobs",
    "recon_weight": "weight of the clean-patch reconstruction loss",
    "image_weight": "weight of the image-level (CLS probe) loss",
    "log_every": "print the mean losses every this many steps",
    "hold_out": "auxiliary families (comma-separated) never rendered, so that a backbone can be "
    "judged on them (configs/demo.py:select)",
}

DESCRIPTION = """\
Pretrain the demo's small DINOv3 (configs/demo.py's frozen backbone) from random
weights on procedural normal images, and write it to --out as a converted dinov3
checkpoint (config.json + weights.safetensors) with pretrain.json (the command,
every option, the validation metrics, seconds).

What it sees: normal images only, from the auxiliary procedural families and the
synthetic benchmark's six training categories; never a held-out category
(wood/dots/washer/pill, synthetic_novel), a defect generator or a label.

Pretext task (self-supervised, as CutPaste / NSA): with probability --p_corrupt an
image gets one or two blobs of normal content pasted in (from itself, turned and
re-tinted, or from another pool image). Probes on the tapped blocks learn where
(per patch) and whether (CLS) content was pasted, and a decoder reconstructs the
clean patches; probes and decoder are thrown away, only the backbone is written."""

EPILOG = f"""\
Every run is followed by a reference run of the same options at the reduced scale
{", ".join(f"{k}={v}" for k, v in REDUCED.items())},
recorded in pretrain.json as "reduced" and re-run by tests/test_demo_transfer.py.
It adds about half a minute on 2 CPU cores (12 s when it was last recorded).
--no_reduced skips it: pretrain.json then records "reduced": null, and that test
has nothing to compare with.

The shipped backbone: --out pretrained/dinov3-small-procedural --steps 19200
(85 minutes on 2 CPU cores, then the reduced run)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m zsad_jax.pretrain.backbone",
        description=DESCRIPTION,
        epilog=EPILOG,
        # The paragraphs as written.
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", required=True, help="converted checkpoint folder to write (refused if it exists)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a converted checkpoint already at --out"
    )
    parser.add_argument(
        "--no_reduced",
        action="store_true",
        help="skip the reduced-scale reference run after training (see below)",
    )
    for key, value in DEFAULTS.items():
        help = f"{OPTION_HELP[key]} (default: %(default)s)"
        parser.add_argument(f"--{key}", type=type(value), default=value, help=help)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """The command; a refusal (``--out`` already there) raises, ``run_command`` makes it one
    line."""
    args = _parser().parse_args(argv)
    checkpoint.check_out_dir(args.out, overwrite=args.overwrite)  # not after the training
    hold_out_families(args.hold_out)
    opts = {k: getattr(args, k) for k in DEFAULTS}
    command = "python -m zsad_jax.pretrain.backbone " + " ".join(
        [f"--out {args.out}"]
        + [f"--{k} {v}" for k, v in opts.items() if v != DEFAULTS[k]]
        + (["--no_reduced"] if args.no_reduced else [])
    )
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    backbone, record = pretrain(opts, log=log)
    record["reduced"] = None if args.no_reduced else _reduced_run(opts, log)
    save(backbone, args.out, record, command)
    print(json.dumps({"out": args.out, "val": record["val"], "seconds": record["seconds"]}))


def _reduced_run(opts: dict, log) -> dict:
    """The reduced-scale reference run (same options, smaller scale) that the tests re-run."""
    log(
        f"reference run at the reduced scale ({REDUCED['steps']} steps, pool {REDUCED['pool']}) "
        "for tests/test_demo_transfer.py: about half a minute more on 2 CPU cores (--no_reduced "
        "skips it)"
    )
    _, reduced = pretrain({**opts, **REDUCED}, log=log)
    return {k: reduced[k] for k in ("options", "val", "seconds")}


if __name__ == "__main__":
    sys.exit(run_command(main))
