"""The optimiser recipes of ``config.optim`` against ``torch.optim`` fed the same gradients.

Each case is one method's official recipe (methods.md §1.6, §2.5, §3.7): the parameters after every
step must match PyTorch's to float32 rounding.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from extras import optional

from configs.common import base_config
from zsad_jax import optim

# None without the convert extra; the tests that use it are marked torch (tests/extras.py).
torch = optional("torch")


def _params(names, seed=0):
    r = np.random.default_rng(seed)
    return {n: r.normal(size=(3, 4)).astype(np.float32) for n in names}


def _grads(names, steps, scale, seed=1):
    r = np.random.default_rng(seed)
    return [
        {n: (scale * r.normal(size=(3, 4))).astype(np.float32) for n in names} for _ in range(steps)
    ]


def _run_ours(optim_cfg, params, grads, *, steps_per_epoch, total_steps):
    opt = optim.build_optimizer(
        optim_cfg, sorted(params), steps_per_epoch=steps_per_epoch, total_steps=total_steps
    )
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state = opt.tx.init(p)
    update = jax.jit(opt.tx.update)
    out = []
    for g in grads:
        updates, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, p)
        p = optax.apply_updates(p, updates)
        out.append({k: np.asarray(v) for k, v in p.items()})
    return out


def _run_torch(
    make_opt, params, grads, *, per_step=None, per_epoch=None, steps_per_epoch=1, clip=()
):
    """``clip``: lists of parameter names, each clipped with clip_grad_norm_(..., 1.0)."""
    tparams = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    opt = make_opt(tparams)
    sched_step = per_step(opt) if per_step else None
    sched_epoch = per_epoch(opt) if per_epoch else None
    out = []
    for i, g in enumerate(grads):
        opt.zero_grad()
        for k, v in g.items():
            tparams[k].grad = torch.tensor(v)
        for group in clip:
            torch.nn.utils.clip_grad_norm_([tparams[k] for k in group], 1.0)
        opt.step()
        if sched_step:
            sched_step.step()
        if sched_epoch and (i + 1) % steps_per_epoch == 0:
            sched_epoch.step()
        out.append({k: v.detach().numpy().copy() for k, v in tparams.items()})
    return out


def _assert_close(ours, ref, lr):
    """Equal up to float32 rounding: optax forms Adam's bias corrections ``1 - b**t`` in float32
    (torch in float64), a relative difference of ~1e-5 in the first updates, so the tolerance is a
    small fraction of one update (``lr``)."""
    assert len(ours) == len(ref)
    for step, (a, b) in enumerate(zip(ours, ref, strict=True)):
        for k in b:
            np.testing.assert_allclose(
                a[k], b[k], rtol=1e-5, atol=1e-4 * lr, err_msg=f"step {step} {k}"
            )


@pytest.mark.torch
def test_af_clip_recipe_adam_betas_constant():
    cfg = base_config("af_clip").optim
    cfg.lr, cfg.b1, cfg.b2 = 1e-4, 0.5, 0.999
    names = ["adaptor.fc.kernel", "prompt.ctx"]
    params, grads = _params(names), _grads(names, 6, 0.1)
    ours = _run_ours(cfg, params, grads, steps_per_epoch=3, total_steps=6)
    ref = _run_torch(
        lambda p: torch.optim.Adam(p.values(), lr=1e-4, betas=(0.5, 0.999)), params, grads
    )
    _assert_close(ours, ref, 1e-4)
    # The reference moves the weights: the comparison is not between two unchanged copies.
    assert np.abs(ref[-1]["prompt.ctx"] - params["prompt.ctx"]).max() > 1e-4


@pytest.mark.torch
def test_ava_dino_recipe_adamw_with_linear_warmup():
    cfg = base_config("ava_dino").optim
    cfg.name, cfg.lr, cfg.weight_decay = "adamw", 1e-2, 1e-2
    cfg.schedule, cfg.warmup_fraction = "warmup_constant", 0.03
    names = ["adapter.down", "adapter.up"]
    total = 200  # warm-up over int(0.03 * 200) = 6 steps, then constant
    params, grads = _params(names), _grads(names, 9, 1.0)
    ours = _run_ours(cfg, params, grads, steps_per_epoch=20, total_steps=total)
    warmup = int(0.03 * total)
    ref = _run_torch(
        lambda p: torch.optim.AdamW(p.values(), lr=1e-2, betas=(0.9, 0.999), weight_decay=1e-2),
        params,
        grads,
        per_step=lambda o: torch.optim.lr_scheduler.LambdaLR(
            o, lambda s: float(s) / max(1, warmup) if s < warmup else 1.0
        ),
    )
    _assert_close(ours, ref, 1e-2)
    # Step 0 runs at lr 0 in both (LambdaLR starts at 0): AdamW leaves the weights unchanged.
    np.testing.assert_array_equal(ours[0]["adapter.up"], params["adapter.up"])


@pytest.mark.torch
def test_acd_clip_recipe_param_groups_step_decay_and_per_module_clipping():
    cfg = base_config("acd_clip").optim
    cfg.schedule, cfg.decay_rate, cfg.decay_every_epochs = "step", 0.9, 1
    cfg.lr = 1.0  # not used: every parameter is in a group
    cfg.lr_groups = [
        {"pattern": r"^text_adapter\.", "lr": 5e-2},
        {"pattern": r"^image_adapter\.", "lr": 1e-1},
    ]
    cfg.grad_clip = 1.0
    cfg.clip_only = r"m_[it]_w\.\d+"
    text = ["text_adapter.m_t_w.0.weight", "text_adapter.fc.weight"]
    image = [
        "image_adapter.m_i_w.0.weight",
        "image_adapter.m_i_w.1.weight",
        "image_adapter.conv.weight",
    ]
    params = _params(text + image)
    # Module norms are ~1.4 and ~14 on the boosted steps (clipped to 1 each); fc and conv are never
    # clipped. One shared norm over the three modules would give other updates.
    grads = _grads(text + image, 8, 0.4)
    for g in grads[::2]:
        g["image_adapter.m_i_w.1.weight"] *= 10
    ours = _run_ours(cfg, params, grads, steps_per_epoch=3, total_steps=8)
    ref = _run_torch(
        lambda p: torch.optim.Adam(
            [
                {"params": [p[k] for k in text], "lr": 5e-2},
                {"params": [p[k] for k in image], "lr": 1e-1},
            ]
        ),
        params,
        grads,
        per_epoch=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.9),
        steps_per_epoch=3,
        clip=[
            ["image_adapter.m_i_w.0.weight"],
            ["image_adapter.m_i_w.1.weight"],
            ["text_adapter.m_t_w.0.weight"],
        ],
    )
    _assert_close(ours, ref, 1e-1)


def test_clipping_groups_follow_the_matched_text():
    paths = ["a.m_i_w.0.w", "a.m_i_w.0.b", "a.m_i_w.1.w", "a.fc.w"]
    assert optim.clip_groups(paths, r"m_i_w\.\d+") == {
        "a.m_i_w.0.w": "m_i_w.0",
        "a.m_i_w.0.b": "m_i_w.0",
        "a.m_i_w.1.w": "m_i_w.1",
    }
    assert set(optim.clip_groups(paths, r"m_i_w").values()) == {"m_i_w"}
    assert set(optim.clip_groups(paths, None)) == set(paths)
    # Global-norm clipping over everything equals optax's own clip_by_global_norm away from the
    # torch epsilon.
    g = {p: jnp.full((2,), 3.0) for p in paths}
    ours, _ = optim.clip_grad_norm_by_group(1.0, optim.clip_groups(paths, None)).update(g, None)
    ref, _ = optax.clip_by_global_norm(1.0).update(g, optax.clip_by_global_norm(1.0).init(g))
    for p in paths:
        np.testing.assert_allclose(ours[p], ref[p], rtol=1e-5)


@pytest.mark.torch
def test_adam_weight_decay_is_torch_l2():
    cfg = ml_collections.ConfigDict({"name": "adam", "lr": 1e-2, "weight_decay": 0.1})
    names = ["w"]
    params, grads = _params(names), _grads(names, 4, 0.5)
    ours = _run_ours(cfg, params, grads, steps_per_epoch=4, total_steps=4)
    ref = _run_torch(
        lambda p: torch.optim.Adam(p.values(), lr=1e-2, weight_decay=0.1), params, grads
    )
    _assert_close(ours, ref, 1e-2)


def test_total_steps_and_config_errors():
    cfg = base_config("af_clip").optim
    cfg.epochs = 2
    assert optim.total_train_steps(cfg, 216) == 432
    cfg.steps = 10
    assert optim.total_train_steps(cfg, 216) == 10
    with pytest.raises(ValueError, match=r"config.optim.name='sgdx'"):
        cfg.name = "sgdx"
        optim.build_optimizer(cfg, ["w"], steps_per_epoch=1, total_steps=1)
    cfg.name = "adam"
    cfg.lr_groups = [{"pattern": "nothing_here", "lr": 1.0}]
    with pytest.raises(ValueError, match=r"lr_groups\[0\].pattern='nothing_here'"):
        optim.build_optimizer(cfg, ["head.kernel"], steps_per_epoch=1, total_steps=1)
    cfg.lr_groups = []
    cfg.schedule = "cosine"
    with pytest.raises(ValueError, match="config.optim.schedule='cosine'"):
        optim.build_optimizer(cfg, ["head.kernel"], steps_per_epoch=1, total_steps=1)
