"""Compute dtypes: ``"auto"`` resolved once (``zsad_jax.nn``) per platform, one message for a bad
value wherever it is refused, and the bound of bfloat16 against float32 on the tiny configs' maps
(bench/precision.py measures the same on the synthetic benchmark, for the README)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from xla_env import xla_flags

from zsad_jax import config_check, methods
from zsad_jax.data import decode, readers, synthetic, transforms
from zsad_jax.encoders.clip import ClipTextConfig, ClipVisionConfig
from zsad_jax.encoders.dinov3 import DinoV3Config
from zsad_jax.nn import COMPUTE_DTYPES, resolve_compute_dtype

ROOT = Path(__file__).resolve().parents[1]
METHOD_CONFIGS = ("af_clip", "ava_dino", "acd_clip", "dlvp_clip")
BAD_DTYPE_MESSAGE = "config.compute_dtype='float16': must be one of float32, bfloat16, auto"

# max |map_bf16 - map_fp32| (maps in [0, 1]) over one normal and one anomalous held-out synthetic
# image per category, each tiny config at its own seed, the same weights in both dtypes. Measured
# on this 2-core CPU (2026-12-01, jax 0.10.2): af_clip 0.058, ava_dino 0.034, acd_clip 0.0014,
# dlvp_clip 0.0091 (bench/precision.py --per-label=1 gives the same; the README has the full test
# set). The bounds leave about 2x margin for other CPUs' bfloat16 kernels. The untrained heads move
# most where a small logit change is amplified: AF-CLIP's cosines / 0.07 summed over 9 token sets
# and AVA-DINO's 100 x cosine maps, both before a softmax.
TINY_MAP_BOUNDS = {"af_clip": 0.12, "ava_dino": 0.07, "acd_clip": 0.003, "dlvp_clip": 0.02}


@pytest.mark.parametrize(
    "platform, expected",
    [("cpu", "float32"), ("gpu", "bfloat16"), ("cuda", "bfloat16"), ("tpu", "bfloat16")],
)
def test_auto_is_bfloat16_on_accelerators_and_float32_on_cpu(platform, expected):
    assert resolve_compute_dtype("auto", platform) == expected
    # An explicit dtype is what it says on every platform.
    assert resolve_compute_dtype("float32", platform) == "float32"
    assert resolve_compute_dtype("bfloat16", platform) == "bfloat16"


def test_auto_follows_this_process_backend_when_no_platform_is_given():
    assert resolve_compute_dtype("auto") == resolve_compute_dtype("auto", jax.default_backend())


def test_config_check_and_every_method_refuse_a_bad_dtype_with_the_same_message():
    config = importlib.import_module("configs.af_clip").get_config("tiny")
    config.compute_dtype = "float16"
    assert BAD_DTYPE_MESSAGE in config_check.problems(config)
    with pytest.raises(ValueError, match="^" + BAD_DTYPE_MESSAGE + "$"):
        resolve_compute_dtype("float16")
    for name in METHOD_CONFIGS:
        config = importlib.import_module(f"configs.{name}").get_config("tiny")
        config.compute_dtype = "float16"
        with pytest.raises(ValueError, match="^" + BAD_DTYPE_MESSAGE + "$"):
            methods.build(config, rngs=nnx.Rngs(0), load_weights=False)


def test_config_check_accepts_every_compute_dtype():
    config = importlib.import_module("configs.af_clip").get_config("tiny")
    for value in COMPUTE_DTYPES:
        config.compute_dtype = value
        assert not [p for p in config_check.problems(config) if "compute_dtype" in p]


@pytest.mark.parametrize("config_cls", [ClipVisionConfig, ClipTextConfig, DinoV3Config])
def test_encoder_configs_take_a_resolved_dtype_only(config_cls):
    name = config_cls.__name__
    for value in ("auto", "float16"):
        with pytest.raises(ValueError, match=rf"^{name}.dtype='{value}': must be one of "):
            config_cls(dtype=value)
    assert config_cls(dtype="bfloat16").dtype == "bfloat16"


def test_torch_linear_bias_bound_is_the_same_float32_either_way():
    # zsad_jax.nn.torch_linear bounds the bias by d_in**-0.5; DLVP-CLIP's heads once used
    # 1 / math.sqrt(d_in). They differ in the last float64 bit for about 1 width in 4, but
    # jax.random.uniform rounds its bounds to float32, where they agree (checked to 2**21).
    for d_in in range(1, 1 << 16):
        assert np.float32(d_in**-0.5) == np.float32(1.0 / np.sqrt(np.float64(d_in))), d_in


@pytest.fixture(scope="module")
def heldout_records(tmp_path_factory):
    """One normal and one anomalous image of each held-out synthetic category (8 images)."""
    root = synthetic.ensure(str(tmp_path_factory.mktemp("data") / "synthetic"))
    records = readers.read_mvtec_layout(
        root, "test", synthetic.SYNTHETIC_HELDOUT_CATEGORIES, dataset="synthetic"
    )
    first = {(r.category, r.gt_label): r for r in reversed(records)}
    return [first[key] for key in sorted(first)]


def _batch(config, records) -> dict[str, jax.Array]:
    transform = transforms.make_transform(str(config.data.transform), int(config.data.image_size))
    images = [transform(decode.load_record(r))["image"] for r in records]
    classes = list(synthetic.SYNTHETIC_HELDOUT_CATEGORIES)
    class_ids = [classes.index(r.category) for r in records]
    return {"image": jnp.asarray(np.stack(images)), "class_id": jnp.asarray(class_ids, jnp.int32)}


def _tiny_map(name: str, dtype: str, records) -> np.ndarray:
    config = importlib.import_module(f"configs.{name}").get_config("tiny")
    config.compute_dtype = dtype
    model = methods.build(config, rngs=nnx.Rngs(int(config.seed)))  # the weights bench/ measures
    model.set_classes(list(synthetic.SYNTHETIC_HELDOUT_CATEGORIES))
    graphdef, state = nnx.split(model)

    @jax.jit
    def anomaly_map(state, batch):
        return nnx.merge(graphdef, state)(batch)["anomaly_map"]

    return np.asarray(anomaly_map(state, _batch(config, records)), np.float64)


@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_auto_builds_float32_on_cpu_and_keeps_auto_in_the_config(name):
    config = importlib.import_module(f"configs.{name}").get_config("tiny")
    assert config.compute_dtype == "auto"
    model = methods.build(config, rngs=nnx.Rngs(0), load_weights=False)
    assert config.compute_dtype == "auto"  # a stored config decides again where it is loaded
    encoder = model.clip if name == "dlvp_clip" else model.backbone
    assert getattr(encoder, "vision", encoder).config.dtype == "float32"


@pytest.mark.slow
@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_tiny_maps_in_bfloat16_stay_within_the_measured_bound_of_float32(name, heldout_records):
    map32, map16 = (_tiny_map(name, dtype, heldout_records) for dtype in ("float32", "bfloat16"))
    difference = float(np.abs(map16 - map32).max())
    print(f"{name}: max |map_bf16 - map_fp32| = {difference:.3g}")
    assert 0.0 < difference <= TINY_MAP_BOUNDS[name], difference  # 0: bfloat16 did not run


@pytest.mark.slow
def test_precision_bench_runs_at_its_smallest_size(heldout_records):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}  # one device
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    # The benchmark the module's fixture generated (root/category/test/defect/image.png), not a
    # second copy: the command finds it complete and generates nothing.
    data_root = Path(heldout_records[0].path).parents[3]
    proc = subprocess.run(
        [
            sys.executable, "bench/precision.py", "--configs=af_clip:tiny", "--per-label=1",
            f"--data-root={data_root}",
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generating" not in proc.stderr  # the fixture's benchmark was found
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    figures = {r["figure"]: r for r in rows}
    assert set(figures) == {
        "map_max_abs", "map_mean_abs", "score_max_abs", "image_AUROC", "pixel_AUROC", "seconds",
    }  # fmt: skip
    assert all(r["config"] == "af_clip:tiny" and r["images"] == 8 for r in rows)
    assert 0.0 < figures["map_max_abs"]["value"] <= TINY_MAP_BOUNDS["af_clip"]
    assert abs(figures["pixel_AUROC"]["difference"]) < 0.05
